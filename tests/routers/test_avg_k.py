"""Avg-K (Liu et al. 2023): the mean-key router init for split/granular experts, and the router tied to its
experts (`router="avg_k"`): weights against a slow loop, gradients, training, convert + save/load, errors.

Shape legend: T tokens, D model width, E experts, H expert width (dense width Hd = E*H for split).
"""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.dense_ffn import DenseFFN
from moeify.routers import GROUPED_FFN, ORT_MOE, router_class
from moeify.routers.avg_k import mean_keys
from moeify.upcycle import DenseFFNWeights, UpcycleConfig, expert_d_ff, preserves, upcycle_layer
from tests.zoo import ZOO, rel_err

D, HD, E, T = 12, 32, 4, 20


def slow_mean_keys(w1: torch.Tensor, gated: bool) -> torch.Tensor:
    """[E, H1, D] -> [E, D], one expert and one key row at a time (gated: the gate rows [0, H))."""
    E_, H1, D_ = w1.shape
    H = H1 // 2 if gated else H1
    out = torch.zeros(E_, D_, dtype=torch.float64)
    for e in range(E_):
        for i in range(H):
            out[e] += w1[e, i].double()
        out[e] /= H
    return out


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_mean_keys_match_a_slow_loop(gated):
    w1 = torch.randn(E, 2 * 6 if gated else 6, D)
    torch.testing.assert_close(mean_keys(w1, gated).double(), slow_mean_keys(w1, gated))


def upcycled(ucfg: UpcycleConfig, gated: bool, router: str = "topk", k: int = 2):
    torch.manual_seed(0)
    ffn = DenseFFN(D, HD, "silu" if gated else "gelu", gated, True).eval()
    config = moeify.MoEConfig(d_model=D, d_ff=expert_d_ff(ucfg, HD, E), num_experts=E, k=k, router=router,
                              activation=ffn.activation, gated=gated, bias=True)
    layer = moeify.MoELayer(config).eval()
    result = upcycle_layer(layer, DenseFFNWeights.from_module(ffn), ucfg)
    return layer, result, ffn


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("ucfg", [UpcycleConfig(init="split", router_init="avg_k"),
                                  UpcycleConfig(init="split", split_method="cluster", router_init="avg_k"),
                                  UpcycleConfig(init="granular", granularity=2, router_init="avg_k")],
                         ids=["split", "split-cluster", "granular"])
def test_router_init_is_each_experts_mean_dense_key(ucfg, gated):
    """Row e = the mean of the dense FFN's key rows (gate rows when gated) of the units expert e holds."""
    layer, result, ffn = upcycled(ucfg, gated)
    assert result.router_init == "avg_k"
    w1 = ffn.w1.detach()  # [Hd (x2 gated), D]
    for e in range(E):
        units = result.partition[e].tolist()  # the dense hidden units of expert e
        want = sum(w1[u].double() for u in units) / len(units)  # gate row u (plain: the only row)
        torch.testing.assert_close(layer.router.weight[e].double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer.router.weight, mean_keys(layer.w1, gated))


def test_untied_avg_k_init_routes_as_the_tied_router_at_init():
    untied, _, _ = upcycled(UpcycleConfig(init="split", router_init="avg_k"), gated=True)
    tied, _, _ = upcycled(UpcycleConfig(init="split"), gated=True, router="avg_k")
    x = torch.randn(T, D)
    with torch.no_grad():
        torch.testing.assert_close(tied(x), untied(x))
    assert untied.router.caps.learned and not tied.router.caps.learned
    assert list(tied.router.parameters()) == []  # nothing of its own: the keys are the experts'


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_tied_router_follows_the_experts_and_their_gradient_reaches_the_keys(gated):
    """logits = x @ mean_keys(w1).T at every forward; d(sum of logits)/d w1 is sum_t x_t / H on each key
    row and 0 on the up rows."""
    layer, _, _ = upcycled(UpcycleConfig(init="split"), gated, router="avg_k")
    x = torch.randn(T, D)
    routing = layer.router(x, expert_w1=layer.w1)
    torch.testing.assert_close(routing.logits, x @ slow_mean_keys(layer.w1.detach(), gated).float().t())
    routing.logits.sum().backward()
    H = layer.config.d_ff
    grad = layer.w1.grad  # [E, H1, D]
    torch.testing.assert_close(grad[:, :H], (x.sum(0) / H).expand(E, H, D))
    if gated:
        assert grad[:, H:].abs().max() == 0
    with torch.no_grad():
        layer.w1[1, :H] += 5.0 * x[0]  # expert 1's keys move towards token 0
    assert layer.router(x[:1], expert_w1=layer.w1).expert_idx[0] == 1
    with pytest.raises(moeify.ConfigError, match="expert_w1=layer.w1"):
        layer.router(x)


def test_capabilities_and_preservation_claims():
    config = moeify.MoEConfig(d_model=D, d_ff=8, num_experts=E, k=2, router="avg_k")
    caps = router_class("avg_k").capabilities(config)
    assert caps.reads_expert_weights and not caps.learned and not caps.mixes_tokens
    assert caps.lowerings == (ORT_MOE, GROUPED_FFN)  # softmax top-k over its logits, as topk
    assert not router_class("topk").capabilities(config).reads_expert_weights
    assert preserves("copy", "avg_k", 2, E, True)  # identical copies: equal mean keys, weights 1/k
    assert not preserves("split", "avg_k", E, E, True)  # unequal expert weights, whatever router_init
    assert not preserves("split", "topk", E, E, True, router_init="avg_k")
    assert not preserves("granular", "topk", E, E, True, granularity=2, router_init="avg_k")
    assert preserves("granular", "topk", 2, E, True, granularity=1, router_init="avg_k")  # rows tie: copy
    assert not preserves("granular", "topk", E, E, False, score_fn="sigmoid", granularity=1,
                         router_init="avg_k")  # tied but not zero: sigmoid weights are not 1/2


@pytest.mark.parametrize("init", ["copy", "noise", "drop"])
def test_avg_k_init_needs_split_or_granular(init):
    with pytest.raises(moeify.ConfigError) as err:
        UpcycleConfig(init=init, router_init="avg_k")
    message = str(err.value)
    assert "\n" not in message and f"init={init!r}" in message and "'split' or 'granular'" in message


@pytest.fixture
def converted():
    entry = ZOO["llama"]  # SwiGLU FFNs: d_model 32, d_ff 64
    dense = entry.build()
    moe = moeify.convert(dense, experts=E, k=2, router="avg_k", init="split", seed=0)
    return entry, dense, moe


def _layers(model):
    return [m for m in model.modules() if isinstance(m, moeify.MoELayer)]


@pytest.mark.slow
def test_convert_train_save_load(converted, tmp_path):
    entry, dense, moe = converted
    layers = _layers(moe)
    assert len(layers) == len(entry.ffns) and all(m.router.name == "avg_k" for m in layers)
    with torch.no_grad():  # top-2 of 4 blocks with unequal weights: near the dense model, not equal
        assert 0 < rel_err(entry.run(moe.eval()), entry.run(dense)) < 1.0
    moe.train()
    ids = entry.inputs()["input_ids"]
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        out = moe(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        assert all(m.w1.grad is not None and m.w1.grad.abs().sum() > 0 for m in layers)
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.8 * losses[0]

    moe.eval()
    moeify.save(moe, tmp_path / "moe")
    loaded = moeify.load(tmp_path / "moe")
    assert all(m.router.name == "avg_k" for m in _layers(loaded))
    with torch.no_grad():
        assert torch.equal(entry.run(loaded), entry.run(moe))
