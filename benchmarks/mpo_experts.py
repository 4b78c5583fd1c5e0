"""MPO experts (expert_param="mpo", MPOE) on CPU: the two ways to run them, beside plain stacked experts.

Shape legend: T tokens, D d_model, H d_ff, E experts, k experts per token.

  stacked      MoELayer with plain [E, H1, D] / [E, D, H] expert weights (the reference point).
  materialise  MoELayer with MPO experts as moeify runs them: each forward contracts every expert's MPO
               tensors into its matrices once, then the stacked experts' grouped dispatch runs on them.
  on the fly   the same MPO layer, but each expert's tokens are multiplied through its tensors one at a time
               (`moeify.mpo.apply`), never forming a matrix (a Python loop over experts, like the HF loop).
All three at full bond (mpo_bond=None), so the MPO layers compute the stacked layer's function when
upcycled from it; the two MPO ways are checked equal before timing. `python benchmarks/moe_layer.py --mpo`
prints this table after the main one.
"""

from __future__ import annotations

import torch
from rich.table import Table
from timing import interleaved_medians
from torch import nn

import moeify
from moeify.activations import apply_expert_activation
from moeify.mpo import apply

Tensor = torch.Tensor


class OnTheFly(nn.Module):
    """An MPO MoELayer's function, each expert's tokens contracted through its tensors: x [T, D] -> [T, D]."""

    def __init__(self, layer: moeify.MoELayer):
        super().__init__()
        self.layer = layer

    def _expert(self, weight, e: int) -> list[Tensor]:
        return [g[e] if g.dim() == 5 else g for g in weight.cores()]  # [r, o, i, r'] each

    def forward(self, x: Tensor) -> Tensor:
        layer, cfg = self.layer, self.layer.config
        routing = layer.router(x)
        out = torch.zeros_like(x)  # [T, D]
        for e in range(cfg.num_experts):
            sel = routing.expert_idx == e
            tokens, w = routing.token_idx[sel], routing.weight[sel].to(x.dtype)  # [n], [n]
            if tokens.numel() == 0:
                continue
            h = apply(x[tokens], self._expert(layer.mpo.w1, e), layer.mpo.w1.layout) + layer.b1[e]  # [n, H1]
            a = apply_expert_activation(h, cfg.activation, cfg.gated)  # [n, H]
            y = apply(a, self._expert(layer.mpo.w2, e), layer.mpo.w2.layout) + layer.b2[e]  # [n, D]
            out = out.index_add(0, tokens, y * w[:, None])
        return out


def run_case(T: int, E: int, k: int, d_model: int, d_ff: int, repeats: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    cfg = moeify.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=E, k=k)
    mpo = moeify.MoELayer(cfg.replace(expert_param="mpo"))
    contenders = {"stacked": moeify.MoELayer(cfg), "materialise": mpo, "on the fly": OnTheFly(mpo)}
    x = torch.randn(T, d_model, requires_grad=True)  # [T, D]
    with torch.no_grad():
        ref, got = mpo(x), contenders["on the fly"](x)
        if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"the two MPO ways disagree by {(ref - got).abs().max().item():.3g}")
    grad = torch.randn(T, d_model)  # [T, D]

    def forward(m):
        def step():
            with torch.no_grad():
                m(x)
        return step

    def train(m):
        def step():
            m.zero_grad(set_to_none=True)
            m(x).backward(grad)
        return step

    return {"forward": interleaved_medians({n: forward(m) for n, m in contenders.items()}, repeats),
            "fwd+bwd": interleaved_medians({n: train(m) for n, m in contenders.items()}, repeats)}


def mpo_table(quick: bool, repeats: int) -> Table:
    """The table `moe_layer.py --mpo` prints."""
    if quick:
        cases, d_model, d_ff = [(64, 4)], 32, 64
    else:
        cases, d_model, d_ff = [(256, 8), (2048, 8)], 512, 2048
    table = Table(title=f"MPO experts (full bond, 3 tensors) on CPU: d={d_model}, d_ff={d_ff}, k=2, median of "
                        f"{repeats} interleaved repeats (ms)")
    columns = ("T", "E", "pass", "stacked", "materialise", "on the fly", "materialise/stacked",
               "on the fly/materialise")
    for col in columns:
        table.add_column(col, justify="right")
    for T, E in cases:
        for name, t in run_case(T, E, 2, d_model, d_ff, repeats).items():
            table.add_row(str(T), str(E), name, *(f"{t[c] * 1e3:.1f}" for c in ("stacked", "materialise",
                                                                                  "on the fly")),
                          f"{t['materialise'] / t['stacked']:.2f}", f"{t['on the fly'] / t['materialise']:.2f}")
    return table
