"""ONNX parity of the literature's routers and options that test_export.py's generic chains do not pin:
SparseMixer (moeify ops on both targets, never com.microsoft.MoE), the balanced hash table, Avg-K (tied and
untied)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moeify
from moeify.runtime import make_session, run

D, E = 8, 4


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=16, num_experts=E, k=2), **kw})


def assert_parity(model, result, inputs_list) -> None:
    session = make_session(result.path)
    for inputs in inputs_list:
        with torch.no_grad():
            want = model(*inputs.values()).numpy()
        got = next(iter(run(session, {k: v.numpy() for k, v in inputs.items()}).values()))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


class Residual(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.norm, self.layer = nn.LayerNorm(D), layer

    def forward(self, x):
        return x + self.layer(self.norm(x))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_literature_layers_parity(tmp_path, target):
    # SparseMixer (fusable activation if it were topk: must still not fuse); ST-MoE options in eval mode:
    # the eval capacity factor decides the drops, expert dropout is off
    torch.manual_seed(0)
    layers = [moeify.MoELayer(cfg(router="sparsemixer", activation="silu", gated=True)),
              moeify.MoELayer(cfg(activation="silu", capacity_factor=0.5, eval_capacity_factor=1.0,
                                  expert_dropout=0.3))]
    for layer in layers:
        nn.init.normal_(layer.router.weight, std=0.5)
    model = nn.Sequential(*map(Residual, layers)).eval()
    result = moeify.export_onnx(model, torch.randn(2, 5, D), tmp_path / "lit.onnx", target=target)
    assert set(result.layers.values()) <= {"moeify.GroupedFFN", "moeify.GroupedFFN (inlined)"}
    name = make_session(result.path).get_inputs()[0].name
    assert_parity(model, result, [{name: torch.randn(b, s, D)} for b, s in [(1, 1), (3, 17)]])


class TokenIdModel(nn.Module):
    """Embedding -> hash-routed MoE layer fed the token ids, with a balanced lookup table."""

    def __init__(self, vocab: int):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab + 10, D)
        self.moe = moeify.MoELayer(cfg(router="hash", activation="relu", hash_vocab_size=vocab))

    def forward(self, input_ids):
        x = self.embed(input_ids)
        return x + self.moe(x, token_ids=input_ids)


@pytest.mark.slow
def test_balanced_hash_table_parity(tmp_path):
    from moeify.routers import balanced_hash_table, set_hash_table

    vocab = 30
    model = TokenIdModel(vocab).eval()
    set_hash_table(model, balanced_hash_table((100.0 / torch.arange(1, vocab + 1)).long(), E))
    ids = torch.randint(0, vocab + 10, (2, 6))
    result = moeify.export_onnx(model, {"input_ids": ids}, tmp_path / "hash.onnx", target="portable")
    gen = torch.Generator().manual_seed(3)
    # ids past the table (>= vocab) take the permutation hash: both paths run
    assert_parity(model, result, [{"input_ids": torch.randint(0, vocab + 10, (b, s), generator=gen)}
                                  for b, s in [(1, 1), (3, 17)]])


@pytest.mark.slow
def test_soft_moe_per_sequence_normalised_parity(tmp_path):
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(router="soft", slots_per_expert=2, soft_groups="sequence",
                                soft_normalize=True, activation="gelu"))
    model = Residual(layer).eval()
    result = moeify.export_onnx(model, torch.randn(2, 5, D), tmp_path / "soft.onnx", target="portable")
    name = make_session(result.path).get_inputs()[0].name
    assert_parity(model, result, [{name: torch.randn(b, s, D)} for b, s in [(1, 1), (3, 17)]])


def avg_k_layers(tied: bool) -> list[moeify.MoELayer]:
    """Two SwiGLU layers split from dense FFNs: routed by the tied Avg-K router, or by a plain learned
    top-k router initialised at the same mean keys (router_init="avg_k")."""
    from moeify.dense_ffn import DenseFFN
    from moeify.upcycle import DenseFFNWeights, UpcycleConfig, expert_d_ff, upcycle_layer

    ucfg = UpcycleConfig(init="split", router_init=None if tied else "avg_k")
    layers = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        dense = DenseFFN(D, 32, "silu", True, False)
        layer = moeify.MoELayer(cfg(router="avg_k" if tied else "topk", activation="silu", gated=True,
                                    d_ff=expert_d_ff(ucfg, 32, E)))
        upcycle_layer(layer, DenseFFNWeights.from_module(dense), ucfg)
        with torch.no_grad():  # as if trained a little: the experts' keys (and the routing) move apart
            layer.w1.add_(0.3 * torch.randn(layer.w1.shape))
        layers.append(layer)
    return layers


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_avg_k_parity(tmp_path, target, tied):
    """Both forms lower as topk does (com.microsoft.MoE on the ort target, where the tied router's logits
    are a MatMul with the ReduceMean of w1's gate rows); ONNX Runtime matches PyTorch."""
    model = nn.Sequential(*map(Residual, avg_k_layers(tied))).eval()
    result = moeify.export_onnx(model, torch.randn(2, 5, D), tmp_path / "avg_k.onnx", target=target)
    want = {"portable": {"moeify.GroupedFFN (inlined)"}, "ort": {"com.microsoft.MoE"}}[target]
    assert set(result.layers.values()) == want
    name = make_session(result.path).get_inputs()[0].name
    assert_parity(model, result, [{name: torch.randn(b, s, D)} for b, s in [(1, 1), (3, 17)]])
