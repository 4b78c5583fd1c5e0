"""SparseMixer: Phi-3.5-MoE's routing rule, the mid-point gradient by hand, training (ONNX parity:
tests/lowering/test_export_literature.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import moeify
from moeify.routers import build_router
from moeify.routers.base import GROUPED_FFN
from moeify.routers.sparsemixer import SparseMixerGrad, sparsity_mask

D, E = 8, 4


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=16, num_experts=E, k=2, router="sparsemixer"), **kw})


def phimoe_sparsemixer():
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    return sparsemixer


def router_with_logits(logits: torch.Tensor, **kw):
    """A router whose logits are exactly `logits` [T, E] for x = identity rows (D = E)."""
    router = build_router(cfg(d_model=logits.shape[1], num_experts=logits.shape[1], **kw))
    with torch.no_grad():
        router.weight.copy_(torch.eye(logits.shape[1]))
    return router, logits.clone()


def test_mask_and_weights_by_hand():
    # eps 0.1: expert 1 is within 2 eps of the best (1.0986 / 11.0986 = 0.099), expert 2 is not (1.0)
    scores = torch.tensor([[10.0 + math.log(3.0), 10.0, 0.0]])
    masked, best = sparsity_mask(scores, scores, eps=0.1)
    assert best.item() == 0 and torch.isinf(masked[0, 2]) and masked[0, 1] == 10.0
    router, x = router_with_logits(scores, sparsemixer_eps=0.1)
    r = router.eval()(x)
    # round 1: softmax over {0, 1} = [3/4, 1/4] -> expert 0, weight 3/4; round 2: expert 1 alone -> weight 1
    assert r.expert_idx.tolist() == [0, 1]
    torch.testing.assert_close(r.weight, torch.tensor([0.75, 1.0]))


def test_midpoint_gradient_by_hand():
    # probs over the kept experts {0, 1} = [3/4, 1/4]; dL/dw = 1. Formula: g * pi_D * (1[i = D] - pi_i)
    scores = torch.tensor([[10.0 + math.log(3.0), 10.0, 0.0]], requires_grad=True)
    probs = torch.tensor([[0.75, 0.25, 0.0]])
    for chosen, scale, want in [(0, 1.0, [3 / 16, -3 / 16, 0.0]), (1, 1 / 3, [-3 / 16, 3 / 16, 0.0])]:
        scores.grad = None
        idx = torch.tensor([[chosen]])
        w = SparseMixerGrad.apply(scores, probs.gather(1, idx), idx, probs, torch.tensor([[scale]]))
        assert w.item() == pytest.approx(probs[0, chosen].item() * scale)  # forward: pi_D * c
        w.sum().backward()
        torch.testing.assert_close(scores.grad, torch.tensor([want]))  # backward: c left out


@pytest.mark.slow  # imports transformers
def test_inference_equals_phi35_moe():
    sparsemixer = phimoe_sparsemixer()
    torch.manual_seed(0)
    router = build_router(cfg()).eval()
    nn.init.normal_(router.weight, std=1.0)
    x = torch.randn(64, D)
    r = router(x)
    logits = x @ router.weight.t()
    want_w, want_idx = sparsemixer(logits, jitter_eps=0.01, training=False, top_k=2)
    assert torch.equal(r.expert_idx.reshape(64, 2), want_idx)
    torch.testing.assert_close(r.weight.reshape(64, 2), want_w)


@pytest.mark.slow  # imports transformers
def test_training_forward_and_gradient_equal_phi35_moe():
    # same RNG draws in the same order (Gumbel, then the mid-point coin, per round): same samples and the
    # same gradient. Phi draws its second-round coin twice (rand_like(...).uniform_()), so only the first
    # round's forward scale c is comparable draw for draw; the second round's may differ by the factor 3.
    sparsemixer = phimoe_sparsemixer()
    torch.manual_seed(0)
    router = build_router(cfg(sparsemixer_eps=0.2)).train()
    nn.init.normal_(router.weight, std=0.3)
    x = torch.randn(256, D)
    up = torch.randn(256, 2)
    torch.manual_seed(5)
    r = router(x)
    (r.weight.reshape(256, 2) * up).sum().backward()
    ours = router.weight.grad.clone()
    logits = x @ router.weight.detach().t()
    logits.requires_grad_(True)
    torch.manual_seed(5)
    want_w, want_idx = sparsemixer(logits, jitter_eps=0.2, training=True, top_k=2)
    (want_w * up).sum().backward()
    assert torch.equal(r.expert_idx.reshape(256, 2), want_idx)
    assert (want_idx[:, 0] != logits.argmax(-1)).any()  # sampling did pick non-greedy experts
    ours_w = r.weight.detach().reshape(256, 2)
    torch.testing.assert_close(ours_w[:, 0], want_w[:, 0].detach(), rtol=1e-4, atol=1e-4)  # 0.3333 vs 1/3
    ratio = (ours_w[:, 1] / want_w[:, 1].detach()).tolist()
    assert all(min(abs(q - v) for v in (1.0, 3.0, 1 / 3)) < 1e-3 for q in ratio)
    torch.testing.assert_close(ours, logits.grad.t() @ x)


@pytest.mark.slow
def test_router_learns_from_the_expert_choice():
    # reward = the weight given to expert 0 (whichever round chose it): the router learns to rank expert 0
    # first for most tokens, through the sampled choices' mid-point gradient
    torch.manual_seed(0)
    router = build_router(cfg(aux_loss_coef=0.0, z_loss_coef=0.0, sparsemixer_eps=0.5))
    x = torch.randn(128, D)
    opt = torch.optim.SGD(router.parameters(), lr=2.0)

    def first_choice_share() -> float:  # eval rule
        with torch.no_grad():
            r = router.eval()(x)
        router.train()
        return (r.expert_idx.reshape(-1, 2)[:, 0] == 0).float().mean().item()

    before = first_choice_share()
    for _ in range(30):
        r = router(x)
        loss = -(r.weight * (r.expert_idx == 0)).sum() / x.shape[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before < 0.35 and first_choice_share() > 0.55


def test_capabilities_never_claim_the_fused_op():
    caps = build_router(cfg()).caps
    assert caps.lowerings == (GROUPED_FFN,) and caps.learned and not caps.mixes_tokens
    assert build_router(cfg(capacity_factor=1.0)).caps.mixes_tokens


def test_bad_eps_is_a_config_error():
    with pytest.raises(moeify.ConfigError, match="sparsemixer_eps"):
        cfg(sparsemixer_eps=-0.1)
