"""MoELayer behaviour: the fast dispatch against the reference for every router and expert kind, aux losses,
routing statistics, shared routers, causal refusal.

Shape legend: T tokens, D model width, H expert hidden width, E experts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moeify
from moeify.routers import ROUTERS

D, H, E = 8, 16, 4
ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "quick_gelu"]

# name -> (config fields, train?, pass token ids?). Stochastic routers run in eval mode, or in training
# with the same torch seed for both runs.
ROUTER_CASES = {
    "topk": (dict(router="topk"), True, False),
    "topk_k1_switch": (dict(router="topk", k=1, normalize=False), True, False),
    "topk_sigmoid": (dict(router="topk", score_fn="sigmoid"), True, False),
    "topk_capacity": (dict(router="topk", capacity_factor=0.5), True, False),  # drops assignments
    "expert_choice": (dict(router="expert_choice"), True, False),  # tokens with 0..E experts
    "hash_hidden": (dict(router="hash"), True, False),
    "hash_ids": (dict(router="hash"), True, True),
    "soft": (dict(router="soft", slots_per_expert=2), True, False),
    "random_train": (dict(router="random"), True, False),  # same seed for both runs
    "random_eval_hash": (dict(router="random", random_eval_rule="hash"), False, True),
    "random_eval_mean": (dict(router="random", random_eval_rule="mean"), False, False),  # N = T*E
    "balanced_train": (dict(router="balanced"), True, False),
    "balanced_eval": (dict(router="balanced"), False, False),
    "sparsemixer_train": (dict(router="sparsemixer", sparsemixer_eps=0.5), True, False),  # samples: same seed
    "sparsemixer_eval": (dict(router="sparsemixer"), False, False),
    "avg_k": (dict(router="avg_k"), True, False),  # tied to the experts' w1: gradients reach it twice
    "smile": (dict(router="smile", router_groups=2), True, False),  # node gate, then local gate
}


def test_router_cases_cover_every_router():
    """Every built-in router (a router registered by an example, such as upcycle_gpt's `topk-st`, may be
    present when the whole suite runs: the test modules importing it are collected first)."""
    builtin = {name for name, cls in ROUTERS.items() if cls.__module__.startswith("moeify.routers.")}
    assert {fields["router"] for fields, _, _ in ROUTER_CASES.values()} == builtin


def make_layer(seed: int = 0, **fields) -> moeify.MoELayer:
    base = dict(d_model=D, d_ff=H, num_experts=E, k=2)
    base.update(fields)
    torch.manual_seed(seed)
    layer = moeify.MoELayer(moeify.MoEConfig(**base))
    with torch.no_grad():
        for p in layer.parameters():  # biases start at zero: make every parameter matter
            if p.dim() <= 2 and p is not getattr(layer.router, "weight", None):
                p.normal_(0.0, 0.5)
        if getattr(layer.router, "weight", None) is not None:
            layer.router.weight.normal_(0.0, 1.0)  # decisive routing, away from ties
    return layer


def run(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, token_ids=None, seed: int = 0):
    """Forward + backward of (out * grad_out).sum() + aux loss; returns output, x grad, parameter grads."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = layer(x, token_ids=token_ids)
    # (+ 0 * x.sum(): with no tokens at all, the reference's output is not connected to the graph)
    ((out * grad_out).sum() + moeify.aux_loss(layer) + 0 * x.sum()).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def assert_fast_matches_reference(layer: moeify.MoELayer, x: torch.Tensor, token_ids=None):
    """The fast dispatch and the reference give the same output and the same gradients for x and every
    parameter (router included)."""
    fast = layer
    ref = copy.deepcopy(layer)
    fast.dispatch_impl, ref.dispatch_impl = "fast", "reference"
    grad_out = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    out_f, gx_f, g_f = run(fast, x, grad_out, token_ids)
    out_r, gx_r, g_r = run(ref, x, grad_out, token_ids)
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_f, out_r, **tol, msg=lambda m: f"forward differs: {m}")
    torch.testing.assert_close(gx_f, gx_r, **tol, msg=lambda m: f"x grad differs: {m}")
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(
            g_f[name], g_r[name], **tol, msg=lambda m, n=name: f"{n} grad differs: {m}"
        )
    # the statistics do not depend on the implementation either
    torch.testing.assert_close(fast.last_stats.tokens_per_expert, ref.last_stats.tokens_per_expert)
    assert fast.last_stats.dropped_fraction == ref.last_stats.dropped_fraction
    return out_r, gx_r


def check_case(case: str, activation: str, gated: bool, bias: bool, shared: int) -> None:
    fields, train, with_ids = ROUTER_CASES[case]
    layer = make_layer(
        **fields, activation=activation, gated=gated, bias=bias, num_shared_experts=shared, shared_d_ff=H // 2
    )
    layer.train(train)
    x = torch.randn(2, 6, D, generator=torch.Generator().manual_seed(3))  # T = 12 tokens
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(4)) if with_ids else None
    out, gx = assert_fast_matches_reference(layer, x, ids)
    assert out.shape == x.shape and out.abs().sum() > 0 and gx.abs().sum() > 0


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_fast_dispatch_matches_reference(case, activation, gated, bias):
    """Every router case x every activation x gated x bias, no shared expert."""
    check_case(case, activation, gated, bias, shared=0)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_fast_dispatch_matches_reference_with_shared_experts(case, gated):
    """The same with a shared expert on (the shared expert is independent of the activation matrix)."""
    check_case(case, "silu" if gated else "gelu", gated, bias=True, shared=1)


EDGE_CASES = {
    "one_token": (dict(router="topk"), torch.Size([1, D])),
    "no_tokens": (dict(router="topk"), torch.Size([0, D])),
    "no_tokens_expert_choice": (dict(router="expert_choice"), torch.Size([0, D])),
    "one_token_expert_choice": (dict(router="expert_choice"), torch.Size([1, D])),
    "k_equals_E": (dict(router="topk", k=E), torch.Size([5, D])),
    "heavy_drops": (dict(router="topk", k=1, capacity_factor=0.25), torch.Size([3, 7, D])),
    "many_tokens": (dict(router="topk", gated=True, activation="silu"), torch.Size([300, D])),
    "many_tokens_expert_choice": (dict(router="expert_choice", capacity_factor=2.0), torch.Size([300, D])),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
def test_fast_dispatch_matches_reference_edge_cases(case):
    fields, shape = EDGE_CASES[case]
    layer = make_layer(**fields)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    out, _ = assert_fast_matches_reference(layer, x)
    assert out.shape == shape


def test_fast_dispatch_matches_reference_when_experts_get_no_tokens():
    layer = make_layer(router="topk", k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0  # every token -> expert 2; experts 0, 1, 3 idle
    x = torch.randn(10, D).abs() + 0.1
    assert_fast_matches_reference(layer, x)
    assert layer.last_stats.tokens_per_expert.tolist() == [0, 0, 10, 0]


def test_fast_dispatch_matches_reference_on_non_contiguous_input():
    layer = make_layer(router="topk")
    x = torch.randn(D, 12).t()  # [12, D], not contiguous
    assert not x.is_contiguous()
    assert_fast_matches_reference(layer, x)


# ------------------------------------------------------------------------------------------- behaviour


def test_copied_experts_reproduce_the_dense_ffn_under_normalised_topk():
    layer = make_layer(router="topk", k=2, bias=True)
    with torch.no_grad():
        for p in (layer.w1, layer.w2, layer.b1, layer.b2):
            p.copy_(p[0:1].expand_as(p))
    dense = moeify.dense_ffn.DenseFFN(D, H, "gelu", False, True)
    with torch.no_grad():
        dense.w1.copy_(layer.w1[0])
        dense.w2.copy_(layer.w2[0])
        dense.b1.copy_(layer.b1[0])
        dense.b2.copy_(layer.b2[0])
    x = torch.randn(12, D)
    torch.testing.assert_close(layer(x), dense(x))


def test_dropped_tokens_get_zero_routed_output_and_are_reported():
    layer = make_layer(router="topk", k=1, capacity_factor=1.0, bias=True)  # capacity 3 of 12
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 5.0  # every token wants expert 0
    x = torch.randn(12, D).abs() + 0.1
    out = layer(x)
    stats = moeify.routing_stats(layer)[""]
    assert stats.tokens_per_expert.tolist() == [3, 0, 0, 0]
    assert stats.dropped_fraction == pytest.approx(9 / 12)
    assert stats.num_tokens == 12
    assert torch.all(out[:3].abs().sum(-1) > 0)
    assert torch.equal(out[3:], torch.zeros(9, D))  # no expert ran: not even its bias is added


def test_routing_stats_per_layer():
    model = nn.Sequential(
        make_layer(router="topk", seed=1), nn.ReLU(), make_layer(router="expert_choice", seed=2)
    )
    assert moeify.routing_stats(model) == {}  # nothing ran yet
    model(torch.randn(3, 4, D))
    stats = moeify.routing_stats(model)
    assert set(stats) == {"0", "2"}
    assert int(stats["0"].tokens_per_expert.sum()) == 12 * 2 and stats["0"].dropped_fraction == 0.0
    assert stats["2"].tokens_per_expert.tolist() == [6, 6, 6, 6]  # expert choice: C = ceil(12 * 2 / 4)
    torch.testing.assert_close(stats["2"].load, torch.full((E,), 0.25))
    assert all(s.num_tokens == 12 for s in stats.values())
    assert stats["0"].tokens_per_expert.device.type == "cpu"


def test_aux_loss_sums_layers_and_reaches_the_routers():
    a, b = make_layer(router="topk", seed=1), make_layer(router="topk", seed=2)
    model = nn.Sequential(a, b)
    model(torch.randn(12, D))
    total = moeify.aux_loss(model)
    torch.testing.assert_close(total, a.last_aux_loss + b.last_aux_loss)
    assert total.requires_grad and total > 0
    total.backward()
    assert a.router.weight.grad.abs().sum() > 0 and b.router.weight.grad.abs().sum() > 0
    assert b.w1.grad is None  # a layer's aux loss never reaches its own experts (a's feed b's router)


def test_aux_loss_is_the_last_forward_only_and_per_model():
    layer = make_layer(router="topk")
    other = make_layer(router="topk", seed=3)
    layer(torch.randn(12, D))
    first = moeify.aux_loss(layer).detach()
    layer(torch.randn(12, D))
    layer(torch.randn(12, D))
    torch.testing.assert_close(moeify.aux_loss(layer), layer.last_aux_loss)  # not accumulated
    assert moeify.aux_loss(layer).item() < 3 * first.item()
    assert moeify.aux_loss(other).item() == 0.0  # another model's layers are not counted


def test_aux_loss_is_zero_without_moe_layers_or_losses():
    assert moeify.aux_loss(nn.Linear(3, 3)).item() == 0.0
    assert moeify.aux_loss(nn.Sequential()).item() == 0.0
    hashed = make_layer(router="hash")
    hashed(torch.randn(5, D))
    assert moeify.aux_loss(hashed).item() == 0.0
    silent = make_layer(router="topk", aux_loss_coef=0.0, z_loss_coef=0.0)
    silent(torch.randn(5, D))
    assert moeify.aux_loss(silent).item() == 0.0


def test_token_ids_reach_the_hash_router():
    layer = make_layer(router="hash", k=1)
    x = torch.randn(2, 6, D)
    ids = torch.arange(12).reshape(2, 6)
    layer(x, token_ids=ids)
    by_ids = layer.last_stats.tokens_per_expert.clone()
    assert by_ids.tolist() == [3, 3, 3, 3]  # three whole blocks of E ids: exactly balanced
    layer(x)  # without ids: the hidden-state hash, a different assignment
    assert not torch.equal(layer.last_stats.tokens_per_expert, by_ids)
    # the same ids give the same experts whatever the hidden states
    layer(torch.randn(2, 6, D), token_ids=ids)
    assert torch.equal(layer.last_stats.tokens_per_expert, by_ids)


def test_shared_experts_add_a_dense_ffn():
    layer = make_layer(router="topk", num_shared_experts=2, shared_d_ff=4)
    assert layer.shared is not None and layer.shared.w2.shape == (D, 8)  # two experts of width 4 = one of 8
    x = torch.randn(12, D)
    routed_only = copy.deepcopy(layer)
    routed_only.shared = None
    torch.testing.assert_close(layer(x), routed_only(x) + layer.shared(x))
    assert make_layer(router="topk").shared is None


def test_eval_mode_random_and_balanced_layers_are_deterministic():
    for fields in (
        dict(router="random"),
        dict(router="random", random_eval_rule="mean"),
        dict(router="balanced"),
    ):
        layer = make_layer(**fields).eval()
        x = torch.randn(12, D)
        torch.manual_seed(0)
        a = layer(x)
        torch.manual_seed(1)
        assert torch.equal(a, layer(x)), fields


# ------------------------------------------------------------------------------------------- causal


@pytest.mark.parametrize(
    "fields",
    [
        dict(router="expert_choice"),
        dict(router="soft"),
        dict(router="balanced"),
        dict(router="topk", capacity_factor=1.25),
    ],
    ids=str,
)
def test_token_mixing_routers_are_refused_in_a_causal_decoder(fields):
    config = moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, **fields)
    with pytest.raises(moeify.ConfigError, match="causal"):
        moeify.MoELayer(config, causal=True)
    moeify.MoELayer(config, causal=False)  # fine in an encoder


@pytest.mark.parametrize("router", ["topk", "hash", "random"])
def test_token_choice_routers_are_causal_safe(router):
    config = moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, router=router)
    layer = moeify.MoELayer(config, causal=True).eval()
    x = torch.randn(10, D)
    y = x.clone()
    y[7:] += 1.0  # change the "future"
    torch.testing.assert_close(layer(x)[:7], layer(y)[:7])


# ------------------------------------------------------------------------------------------- shared router


def test_share_router_one_parameter_set_used_by_both_layers():
    a, b = make_layer(router="topk", seed=1), make_layer(router="topk", seed=2)
    model = nn.Sequential(a, nn.Tanh(), b)
    n_before = len(list(model.parameters()))
    shared = moeify.share_router([a, b])
    assert a.router is b.router is shared
    params = list(model.parameters())
    assert len(params) == n_before - 1  # b's own router weight is gone
    assert sum(p is shared.weight for p in params) == 1  # the shared weight appears once
    x = torch.randn(12, D)
    model(x).sum().backward()
    grad_both = shared.weight.grad.clone()
    # both layers route with it: its gradient is the sum of what each layer sends
    model.zero_grad()
    model[0](x).sum().backward()
    grad_a = shared.weight.grad.clone()
    assert not torch.allclose(grad_both, grad_a)
    # and changing it changes both layers' routing
    a(x), b(x)
    before = [a.last_stats.tokens_per_expert, b.last_stats.tokens_per_expert]
    with torch.no_grad():
        shared.weight.zero_()
        shared.weight[3] = 1.0
    xp = x.abs() + 0.1  # every token now prefers expert 3 in both layers
    a(xp), b(xp)
    for layer, old in zip((a, b), before, strict=True):
        counts = layer.last_stats.tokens_per_expert
        assert counts[3] == 12 and not torch.equal(counts, old)


def test_share_router_with_an_explicit_router_and_its_checks():
    a, b = make_layer(router="topk"), make_layer(router="topk", seed=1)
    router = moeify.routers.build_router(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, k=1))
    assert moeify.share_router([a, b], router=router) is router and a.router is router
    wrong = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E + 1))
    with pytest.raises(moeify.ConfigError, match="num_experts"):
        moeify.share_router([a, wrong])
    with pytest.raises(moeify.ConfigError):
        moeify.share_router([])
    with pytest.raises(moeify.ConfigError, match="MoELayer"):
        moeify.share_router([a, nn.Linear(2, 2)])
    causal = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E), causal=True)
    mixing = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, router="soft"))
    with pytest.raises(moeify.ConfigError, match="causal"):
        moeify.share_router([mixing, causal])


def test_shared_router_survives_state_dict_round_trip():
    def build():
        model = nn.Sequential(make_layer(router="topk", seed=1), make_layer(router="topk", seed=2))
        moeify.share_router(model)
        return model

    src, dst = build(), build()
    with torch.no_grad():
        src[0].router.weight.normal_()
    dst.load_state_dict(src.state_dict())
    assert dst[0].router is dst[1].router
    torch.testing.assert_close(dst[1].router.weight, src[0].router.weight)


def test_layer_deepcopies_and_pickles_after_a_training_forward():
    import io

    cfg = moeify.MoEConfig(d_model=8, d_ff=16, num_experts=4, k=2)
    layer = moeify.MoELayer(cfg)
    layer(torch.randn(5, 8, requires_grad=True))
    assert layer.last_aux_loss is not None and layer.last_aux_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    assert twin.last_aux_loss is None
    assert layer.last_aux_loss is not None  # the original keeps its loss for the backward to come
    x = torch.randn(3, 8)
    torch.testing.assert_close(twin(x), layer(x))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    assert buffer.tell() > 0
