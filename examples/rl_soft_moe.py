"""A deep-RL value network with a per-sample Soft MoE penultimate layer (Obando-Ceron et al. 2024,
"Mixtures of Experts Unlock Parameter Scaling for Deep RL", §3: the encoder's output is split into tokens,
per sample, and the penultimate dense layer becomes a Soft MoE).

The network: observation [B, O] -> encoder -> N tokens of width D per sample [B, N, D] -> Soft MoE (one
group of slots per sample: `soft_groups="sequence"`, normalised logits: `soft_normalize=True`) -> flatten ->
Q-values [B, A]. The dense penultimate layer is replaced *by hand* with `moeify.MoELayer` (the model is
written here, so no conversion is needed). It trains a few steps of fitted Q-iteration on a fixed batch of
random transitions of a small synthetic MDP (reward = a fixed linear function of the observation) and
prints the TD loss before and after.

    PYTHONPATH=. python examples/rl_soft_moe.py            # 300 steps
    PYTHONPATH=. python examples/rl_soft_moe.py --quick    # 40 steps (CI)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import nn

import moeify

OBS, ACTIONS, TOKENS, WIDTH = 12, 4, 4, 16


class SoftMoEValueNet(nn.Module):
    def __init__(self, experts: int = 4):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(OBS, TOKENS * WIDTH), nn.ReLU())
        config = moeify.MoEConfig(d_model=WIDTH, d_ff=2 * WIDTH, num_experts=experts, k=1, router="soft",
                                  slots_per_expert=1, soft_groups="sequence", soft_normalize=True,
                                  activation="relu", z_loss_coef=0.0)
        # the dense penultimate layer was nn.Sequential(nn.Linear(D, 2D), nn.ReLU(), nn.Linear(2D, D))
        self.penultimate = moeify.MoELayer(config)
        self.head = nn.Linear(TOKENS * WIDTH, ACTIONS)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(obs).reshape(obs.shape[0], TOKENS, WIDTH)  # [B, N, D]: tokens per sample
        tokens = tokens + self.penultimate(tokens)  # [B, N, D], slots per sample
        return self.head(tokens.flatten(1))  # [B, A]


def transitions(n: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """A fixed batch (obs, action, reward, next_obs) of a synthetic MDP."""
    obs = torch.randn(n, OBS, generator=generator)
    action = torch.randint(0, ACTIONS, (n,), generator=generator)
    mix = torch.randn(ACTIONS, OBS, OBS, generator=generator) / OBS ** 0.5
    next_obs = torch.tanh(torch.einsum("nij,nj->ni", mix[action], obs))
    reward = obs @ torch.randn(OBS, generator=generator) * 0.1
    return obs, action, reward, next_obs


def td_loss(net: nn.Module, target: nn.Module, batch, gamma: float = 0.9) -> torch.Tensor:
    obs, action, reward, next_obs = batch
    with torch.no_grad():
        bootstrap = reward + gamma * target(next_obs).max(dim=1).values  # [B]
    q = net(obs).gather(1, action[:, None]).squeeze(1)  # [B]
    return nn.functional.smooth_l1_loss(q, bootstrap)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps (CI)")
    parser.add_argument("--out", type=Path, help="folder to write result.json to (optional)")
    args = parser.parse_args(argv)
    steps = 40 if args.quick else 300
    torch.manual_seed(0)
    net = SoftMoEValueNet()
    target = SoftMoEValueNet()
    batch = transitions(256, torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    target.load_state_dict(net.state_dict())
    first = td_loss(net, target, batch).item()
    for step in range(steps):
        if step % 10 == 0:  # the target network follows every 10 steps
            target.load_state_dict(net.state_dict())
        loss = td_loss(net, target, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    target.load_state_dict(net.state_dict())
    last = td_loss(net, target, batch).item()
    print(f"TD loss: {first:.4f} -> {last:.4f} after {steps} steps "
          f"({sum(p.numel() for p in net.penultimate.parameters())} parameters in the Soft MoE layer)")
    result = {"first_loss": first, "last_loss": last, "steps": steps}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        tmp = args.out / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.out / "result.json")
    return result


if __name__ == "__main__":
    main()
