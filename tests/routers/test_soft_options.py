"""Soft MoE's normalised logits (soft_normalize) and per-sequence slots (soft_groups="sequence")."""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.routers import build_router

D, E, S = 8, 4, 2


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=16, num_experts=E, k=1, router="soft",
                                      slots_per_expert=S), **kw})


def test_normalised_logits_are_scaled_cosines():
    torch.manual_seed(0)
    router = build_router(cfg(soft_normalize=True))
    with torch.no_grad():
        router.scale.fill_(3.0)
    x = torch.randn(10, D)
    want = 3.0 * torch.nn.functional.cosine_similarity(x[:, None, :], router.weight[None], dim=-1)  # [T, E*S]
    torch.testing.assert_close(router(x).logits, want)
    big = router(100.0 * x)  # invariant to the tokens' norm
    torch.testing.assert_close(big.dispatch, router(x).dispatch)
    assert build_router(cfg()).scale is None  # default: the plain logits, no extra parameter


def test_normalised_scale_trains():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(soft_normalize=True))
    layer(torch.randn(2, 6, D)).square().mean().backward()
    assert layer.router.scale.grad is not None and layer.router.scale.grad != 0


def test_sequence_groups_equal_one_call_per_sequence():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(soft_groups="sequence", soft_normalize=True))
    x = torch.randn(3, 5, D)
    per_sequence = torch.stack([layer(x[b:b + 1])[0] for b in range(3)])  # one group each
    torch.testing.assert_close(layer(x), per_sequence)
    batch_layer = moeify.MoELayer(cfg(soft_normalize=True))
    batch_layer.load_state_dict(layer.state_dict())
    assert not torch.allclose(batch_layer(x), per_sequence)  # the default mixes sequences


def test_sequence_groups_routing_shape_and_training():
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(soft_groups="sequence"))
    x = torch.randn(2, 3, 4, D)  # groups = 2*3 sequences of 4 tokens
    out = layer(x)
    assert out.shape == x.shape
    routing = layer.router(x.reshape(-1, D), groups=6)
    assert routing.dispatch.shape == (24, E * 6 * S)
    # each slot's dispatch sums to 1 over its own sequence's tokens and is zero elsewhere
    d = routing.dispatch.reshape(6, 4, E, 6, S)
    torch.testing.assert_close(d.sum(dim=1), torch.eye(6)[:, None, :, None].expand(6, E, 6, S))
    out.square().mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_bad_groups_is_a_config_error():
    with pytest.raises(moeify.ConfigError, match="soft_groups"):
        cfg(soft_groups="token")
    with pytest.raises(moeify.ConfigError, match="soft_normalize"):
        cfg(soft_normalize=1)
