"""Upcycling strategies: preservation claims, what the non-preserving ones change, router init, config.

Tiny shapes: D=12, H=32, E=4.
"""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

import moeify
from moeify.activations import ACTIVATIONS
from moeify.config import ConfigError
from moeify.dense_ffn import DenseFFN
from moeify.upcycle import (
    INITS,
    PRESERVATION,
    DenseFFNWeights,
    UpcycleConfig,
    UpcycleError,
    expert_d_ff,
    preserves,
    preserves_config,
    upcycle_layer,
)
from moeify.upcycle.kmeans import balanced_kmeans, spherical_kmeans

D, H, E = 12, 32, 4
TOL = 1e-5


def make_dense(activation="gelu", gated=True, bias=True, seed=0) -> DenseFFN:
    torch.manual_seed(seed)
    ffn = DenseFFN(D, H, activation, gated, bias)
    if bias:  # non-zero biases, so that bias handling is actually exercised
        with torch.no_grad():
            ffn.b1.normal_(std=0.5)
            ffn.b2.normal_(std=0.5)
    return ffn.eval()


def make_layer(ucfg: UpcycleConfig, ffn: DenseFFN, **moe) -> moeify.MoELayer:
    cfg = moeify.MoEConfig(
        d_model=D,
        d_ff=expert_d_ff(ucfg, H, E),
        num_experts=E,
        activation=ffn.activation,
        gated=ffn.gated,
        bias=ffn.b1 is not None,
        **moe,
    )
    return moeify.MoELayer(cfg).eval()


def rel_err(layer, ffn, x) -> float:
    with torch.no_grad():
        y, ref = layer(x), ffn(x)
    return float((y - ref).norm() / ref.norm())


def upcycled(ucfg, ffn, calibration=None, key=0, **moe):
    layer = make_layer(ucfg, ffn, **moe)
    result = upcycle_layer(layer, DenseFFNWeights.from_module(ffn), ucfg, calibration, key=key)
    return layer, result


def clustered_points(n_per=40, clusters=E, spread=0.15, seed=1):
    """Points around `clusters` well-separated unit directions in R^D (scaled by random norms)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.linalg.qr(torch.randn(D, D, generator=g))[0][:clusters]  # orthonormal rows
    labels = torch.arange(clusters).repeat_interleave(n_per)
    x = centers[labels] + spread * torch.randn(len(labels), D, generator=g)
    x = x * (1.0 + torch.rand(len(labels), 1, generator=g) * 3)  # norms vary; directions carry clusters
    return x, labels, centers


# --- preservation -------------------------------------------------------------------------------------

# One preserving setup per strategy (the PRESERVATION table's headline case), checked for every
# activation, gated or not, with and without biases.
PRESERVING = [
    (UpcycleConfig(init="copy"), dict(k=2)),
    (UpcycleConfig(init="copy"), dict(k=1, score_fn="sigmoid")),
    (UpcycleConfig(init="noise", noise_std=0.0), dict(k=2)),
    (UpcycleConfig(init="drop", drop_rate=0.0), dict(k=2)),
    (UpcycleConfig(init="split"), dict(k=E)),
    (UpcycleConfig(init="split"), dict(k=E, normalize=False)),
    (UpcycleConfig(init="granular", granularity=2), dict(k=2)),
    (UpcycleConfig(init="granular", granularity=4), dict(k=4, normalize=False)),
]


@pytest.mark.slow
@pytest.mark.parametrize("ucfg,moe", PRESERVING, ids=lambda v: str(v) if isinstance(v, dict) else v.init)
def test_preserving_strategies_reproduce_dense_for_every_activation(ucfg, moe):
    x = torch.randn(50, D)
    for activation, gated, bias in itertools.product(sorted(ACTIVATIONS), (False, True), (False, True)):
        ffn = make_dense(activation, gated, bias)
        layer, _ = upcycled(ucfg, ffn, **moe)
        assert preserves_config(ucfg, layer.config)
        err = rel_err(layer, ffn, x)
        assert err <= TOL, (ucfg.init, moe, activation, gated, bias, err)


@pytest.mark.slow
def test_preservation_claims_hold_over_routing_grid():
    """Wherever `preserves` says yes, the upcycled layer equals the dense FFN; the rest is checked below."""
    ffn = make_dense("silu", gated=True, bias=True)
    x = torch.randn(40, D)
    calib, _, _ = clustered_points()
    claimed = 0
    inits = [
        UpcycleConfig(init="copy"),
        UpcycleConfig(init="split"),
        *[UpcycleConfig(init="granular", granularity=g) for g in (1, 2, 4)],
    ]
    for base, router_init in itertools.product(inits, ("random", "zeros", "kmeans", "avg_k")):
        if router_init == "avg_k" and base.init == "copy":
            continue  # avg_k averages the blocks of split and granular only (a config error)
        ucfg = base.replace(router_init=router_init)
        grid = itertools.product(range(1, E + 1), (True, False), ("softmax", "sigmoid"))
        for k, normalize, score_fn in grid:
            layer, _ = upcycled(ucfg, ffn, calib, k=k, normalize=normalize, score_fn=score_fn)
            if preserves_config(ucfg, layer.config):
                claimed += 1
                err = rel_err(layer, ffn, x)
                assert err <= TOL, (ucfg, k, normalize, score_fn, err)
    assert claimed > 50


@pytest.mark.parametrize(
    "ucfg,moe",
    [
        (UpcycleConfig(init="copy"), dict(k=2, normalize=False)),  # top-2 softmax weights sum to < 1
        (UpcycleConfig(init="split", router_init="random"), dict(k=E)),  # unequal expert weights
        (UpcycleConfig(init="split"), dict(k=2)),  # half the neurons missing
        (UpcycleConfig(init="granular", granularity=2), dict(k=2, normalize=False)),
        (UpcycleConfig(init="noise", noise_std=0.05), dict(k=2)),
        (UpcycleConfig(init="drop"), dict(k=2)),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else v.init,
)
def test_unclaimed_setups_differ(ucfg, moe):
    ffn = make_dense()
    layer, _ = upcycled(ucfg, ffn, **moe)
    assert not preserves_config(ucfg, layer.config)
    assert rel_err(layer, ffn, torch.randn(40, D)) > 1e-3


def test_preserves_table_and_function():
    assert set(PRESERVATION) == set(INITS)
    assert preserves("copy", "topk", 2, 8, True)
    assert not preserves("copy", "topk", 2, 8, False)
    assert preserves("copy", "topk", 8, 8, False)
    assert not preserves("copy", "topk", 2, 8, True, capacity_factor=1.25)  # drops break it
    assert preserves("copy", "hash", 1, 8, True) and preserves("copy", "random", 3, 8, False)  # weights 1/k
    assert not preserves("split", "hash", 8, 8, True)  # claimed by topk only
    assert not preserves("copy", "expert_choice", 2, 8, True)  # a token may get no expert
    assert preserves("split", "topk", 8, 8, True)  # router_init defaults to zeros for split
    assert not preserves("split", "topk", 8, 8, True, router_init="random")
    assert not preserves("split", "topk", 2, 8, True)
    assert preserves("granular", "topk", 4, 8, True, granularity=2)
    assert not preserves("granular", "topk", 3, 8, True, granularity=2)  # k not a multiple of G
    assert not preserves("granular", "topk", 4, 8, True, granularity=2, router_init="zeros")  # ties
    assert preserves(UpcycleConfig(init="granular", granularity=2), "topk", 2, 4, True)
    assert not preserves("noise", "topk", 2, 8, True)
    assert preserves("noise", "topk", 2, 8, True, noise_std=0.0)
    assert not preserves("drop", "topk", 2, 8, True)
    assert not preserves("none", "topk", 2, 8, True)


def test_shared_experts_add_nothing_at_init():
    ffn = make_dense()
    ucfg = UpcycleConfig(init="copy")
    layer, _ = upcycled(ucfg, ffn, k=2, num_shared_experts=1)
    assert preserves_config(ucfg, layer.config)
    assert rel_err(layer, ffn, torch.randn(30, D)) <= TOL


# --- what the non-preserving strategies change ----------------------------------------------------------


def test_noise_moves_weights_by_the_requested_relative_std():
    ffn = make_dense(gated=True, bias=True)
    std = 0.05
    layer, _ = upcycled(UpcycleConfig(init="noise", noise_std=std), ffn, k=2)
    for name in ("w1", "w2", "b1", "b2"):
        dense_w = getattr(ffn, name).detach()
        delta = getattr(layer, name).detach() - dense_w.unsqueeze(0)  # [E, ...]
        ratio = float(delta.std() / dense_w.std())
        slack = 4 / delta.numel() ** 0.5  # ~4 standard errors of the std estimate (48 .. 3072 samples)
        assert (1 - slack) * std < ratio < (1 + slack) * std, (name, ratio)
        assert abs(float(delta.mean())) < slack * std * float(dense_w.std())
    d = layer.w1.detach()
    assert not torch.equal(d[0], d[1])  # each expert gets its own noise
    assert rel_err(layer, ffn, torch.randn(40, D)) < 0.2  # close to, not equal to, the dense FFN


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("rate", [0.5, 0.3, 0.0, 1.0])
def test_drop_redraws_exactly_round_rH_neurons_per_expert(gated, rate):
    ffn = make_dense(gated=gated, bias=True)
    layer, result = upcycled(UpcycleConfig(init="drop", drop_rate=rate), ffn, k=2)
    n = round(rate * H)
    assert result.redrawn.shape == (E, n)
    w1, w2, b1 = layer.w1.detach(), layer.w2.detach(), layer.b1.detach()
    for e in range(E):
        rows_changed = (w1[e] != ffn.w1.detach()).any(dim=1)  # [H1]
        if gated:  # gate and up rows of a neuron are re-drawn together
            assert torch.equal(rows_changed[:H], rows_changed[H:])
        neurons = rows_changed[:H].nonzero().flatten()
        assert neurons.numel() == n
        assert torch.equal(neurons, result.redrawn[e])
        cols_changed = (w2[e] != ffn.w2.detach()).any(dim=0).nonzero().flatten()
        assert torch.equal(cols_changed, neurons)  # the matching w2 columns, nothing else
        b1_changed = (b1[e] != ffn.b1.detach()).nonzero().flatten()
        assert torch.equal(b1_changed, torch.cat([neurons, neurons + H]) if gated else neurons)
        assert torch.equal(layer.b2[e], ffn.b2)
    if 0 < n < H:
        sets = {tuple(result.redrawn[e].tolist()) for e in range(E)}
        assert len(sets) == E  # different experts, different subsets


def test_drop_redraws_from_the_dense_statistics():
    ffn = make_dense(gated=False, bias=True)
    with torch.no_grad():
        ffn.w1.mul_(3.0).add_(0.7)  # a mean and std the layer's own init would not have
    layer, _ = upcycled(UpcycleConfig(init="drop", drop_rate=1.0), ffn, k=2)
    w = layer.w1.detach()
    ref = ffn.w1.detach()
    assert abs(float(w.mean() - ref.mean())) < 0.1 * float(ref.std())
    assert abs(float(w.std() / ref.std()) - 1) < 0.1
    assert not torch.equal(w[0], w[1])


@pytest.mark.parametrize(
    "method,with_calibration", [("random", False), ("cluster", False), ("cluster", True)]
)
def test_split_partitions_every_neuron_exactly_once(method, with_calibration):
    ffn = make_dense(gated=True, bias=True)
    calib = torch.randn(3, 20, D) if with_calibration else None
    ucfg = UpcycleConfig(init="split", split_method=method)
    layer, result = upcycled(ucfg, ffn, calib, k=E)
    p = result.partition
    assert p.shape == (E, H // E)
    assert torch.equal(p.flatten().sort().values, torch.arange(H))
    if method == "cluster":
        assert result.split_features == ("activations" if with_calibration else "w1 rows")
    else:
        assert result.split_features is None
    for e in range(E):  # expert e is the dense FFN restricted to its neurons, w2 scaled by E
        idx = p[e]
        assert torch.equal(layer.w1[e], torch.cat([ffn.w1[idx], ffn.w1[H + idx]]))
        assert torch.equal(layer.b1[e], torch.cat([ffn.b1[idx], ffn.b1[H + idx]]))
        torch.testing.assert_close(layer.w2[e], ffn.w2[:, idx] * E)
    assert result.w2_scale == E and result.b2_scale == 1.0
    assert torch.count_nonzero(layer.router.weight) == 0  # split's default router: zeros


def test_split_cluster_groups_similar_neurons():
    """Neurons planted in E groups of near-identical w1 rows land in the same expert."""
    ffn = make_dense(gated=False, bias=False)
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(E, D, generator=g)
    group = torch.randperm(H, generator=g) % E  # [H]
    with torch.no_grad():
        ffn.w1.copy_(centers[group] + 0.05 * torch.randn(H, D, generator=g))
    layer, result = upcycled(UpcycleConfig(init="split", split_method="cluster"), ffn, k=E)
    for e in range(E):
        assert group[result.partition[e]].unique().numel() == 1
    assert rel_err(layer, ffn, torch.randn(30, D)) <= TOL


def test_split_refuses_indivisible_widths():
    with pytest.raises(UpcycleError, match="not divisible by 5"):
        expert_d_ff(UpcycleConfig(init="split"), 32, 5)


def test_granular_slices_groups_and_router_ties():
    ffn = make_dense(gated=True, bias=True)
    G = 2
    layer, result = upcycled(UpcycleConfig(init="granular", granularity=G), ffn, k=2)
    assert layer.config.d_ff == H // G
    Hs = H // G
    for e in range(E):
        assert torch.equal(result.partition[e], torch.arange(Hs) + (e % G) * Hs)
        torch.testing.assert_close(layer.w2[e], ffn.w2[:, result.partition[e]] * G)
    w = layer.router.weight.detach()
    assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3]) and not torch.equal(w[0], w[2])


def test_granular_refuses_bad_granularity():
    with pytest.raises(UpcycleError, match=r"num_experts \(4\) divisible by granularity \(8\)"):
        expert_d_ff(UpcycleConfig(init="granular", granularity=8), 32, 4)
    with pytest.raises(UpcycleError, match="not divisible by 3"):
        expert_d_ff(UpcycleConfig(init="granular", granularity=3), 32, 6)


def test_expert_d_ff_per_strategy():
    assert expert_d_ff(UpcycleConfig(init="copy"), 32, 4) == 32
    assert expert_d_ff(UpcycleConfig(init="noise"), 32, 4) == 32
    assert expert_d_ff(UpcycleConfig(init="drop"), 32, 4) == 32
    assert expert_d_ff(UpcycleConfig(init="none"), 32, 4) == 32
    assert expert_d_ff(UpcycleConfig(init="split"), 32, 4) == 8
    assert expert_d_ff(UpcycleConfig(init="granular", granularity=2), 32, 4) == 16


# --- router init ------------------------------------------------------------------------------------


def test_kmeans_router_rows_are_cluster_centroids():
    x, labels, centers = clustered_points()
    ffn = make_dense()
    layer, result = upcycled(UpcycleConfig(init="copy", router_init="kmeans"), ffn, x, k=1)
    assert result.router_init == "kmeans"
    w = layer.router.weight.detach()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(E))
    # top-1 expert of every calibration token is a bijection of its true cluster
    with torch.no_grad():
        top = layer.router.compute_logits(x).argmax(dim=1)
    mapping = {}
    for c in range(E):
        experts = top[labels == c].unique()
        assert experts.numel() == 1
        mapping[c] = int(experts)
    assert sorted(mapping.values()) == list(range(E))
    # each row is the (normalised) mean direction of its cluster
    xu = x / x.norm(dim=1, keepdim=True)
    for c, e in mapping.items():
        mean = xu[labels == c].mean(0)
        assert float(torch.dot(w[e], mean / mean.norm())) > 0.999


def test_kmeans_router_ties_virtual_groups_for_granular():
    x, _, _ = clustered_points(clusters=2)
    layer, _ = upcycled(
        UpcycleConfig(init="granular", granularity=2, router_init="kmeans"), make_dense(), x, k=2
    )
    w = layer.router.weight.detach()
    assert torch.equal(w[0], w[1]) and torch.equal(w[2], w[3])
    assert float(torch.dot(w[0], w[2])) < 0.5  # two different centroids


def test_kmeans_router_needs_calibration():
    with pytest.raises(UpcycleError, match="router_init='kmeans' needs calibration"):
        upcycled(UpcycleConfig(init="copy", router_init="kmeans"), make_dense(), None, k=2)


def test_random_and_zero_router_inits():
    layer, _ = upcycled(UpcycleConfig(init="copy", router_init="zeros"), make_dense(), k=2)
    assert torch.count_nonzero(layer.router.weight) == 0
    layer, _ = upcycled(UpcycleConfig(init="copy", router_std=0.5), make_dense(), k=2)
    assert 0.4 < float(layer.router.weight.detach().std()) < 0.6


@pytest.mark.slow
def test_kmeans_helpers():
    x, labels, _ = clustered_points()
    g = torch.Generator().manual_seed(0)
    centroids, got = spherical_kmeans(x, E, g)
    assert torch.equal(got, (x @ centroids.t()).argmax(1))
    assert all(got[labels == c].unique().numel() == 1 for c in range(E))
    bal = balanced_kmeans(torch.randn(40, 3), 4, torch.Generator().manual_seed(0))
    assert torch.bincount(bal).tolist() == [10, 10, 10, 10]


# --- reproducibility ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ucfg",
    [
        UpcycleConfig(init="noise"),
        UpcycleConfig(init="drop"),
        UpcycleConfig(init="split", split_method="random", router_init="random"),
        UpcycleConfig(init="split", split_method="cluster", router_init="kmeans"),
        UpcycleConfig(init="granular", granularity=2),
    ],
    ids=lambda c: f"{c.init}-{c.split_method}-{c.router_init}",
)
def test_seed_and_key_make_results_reproducible(ucfg):
    ffn = make_dense()
    calib, _, _ = clustered_points()

    def state(cfg, key=0):
        torch.manual_seed(123 + key)  # the global RNG must not matter
        layer, _ = upcycled(cfg, ffn, calib, key=key, k=E if cfg.init == "split" else 2)
        return torch.cat([p.detach().flatten() for p in (layer.w1, layer.w2, layer.b1, layer.router.weight)])

    a, b = state(ucfg), state(ucfg)
    assert torch.equal(a, b)
    if ucfg.split_method != "cluster":  # k-means may reach the same clusters from any seed
        assert not torch.equal(a, state(ucfg.replace(seed=1)))
        assert not torch.equal(a, state(ucfg, key=1))


@pytest.mark.parametrize("init", ["copy", "noise", "drop", "split", "granular"])
def test_every_strategy_overwrites_all_expert_weights(init):
    """convert() builds layers with init_experts=False (uninitialised w1/w2) before upcycling: every strategy
    must write every expert weight, so NaN-filled weights come out exactly like randomly initialised ones."""
    ffn = make_dense()
    ucfg = UpcycleConfig(init=init, granularity=2) if init == "granular" else UpcycleConfig(init=init)
    dense = DenseFFNWeights.from_module(ffn)
    normal = make_layer(ucfg, ffn, k=2)
    poisoned = moeify.MoELayer(normal.config, init_experts=False).eval()
    with torch.no_grad():
        poisoned.w1.fill_(float("nan"))
        poisoned.w2.fill_(float("nan"))
    for layer in (normal, poisoned):
        upcycle_layer(layer, dense, ucfg, key=0)
    assert torch.equal(normal.w1, poisoned.w1) and torch.equal(normal.w2, poisoned.w2)


# --- config and fit ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            dict(init="sparse"),
            "unknown upcycling init 'sparse'; valid: copy, noise, drop, split, granular, none",
        ),
        (dict(init="drop", drop_rate=1.5), r"drop_rate must be in \[0, 1\]"),
        (dict(init="drop", drop_rate=-0.1), r"drop_rate must be in \[0, 1\]"),
        (dict(init="noise", noise_std=-1.0), "noise_std must be a finite number >= 0"),
        (dict(init="noise", noise_std=float("nan")), "noise_std must be a finite number >= 0"),
        (dict(init="granular", granularity=0), "granularity must be an integer >= 1"),
        (dict(init="split", split_method="kmeans"), "unknown split_method 'kmeans'; valid: random, cluster"),
        (dict(router_init="learned"), "unknown router_init 'learned'; valid: random, zeros, kmeans, avg_k"),
        (dict(init="copy", granularity=2), "granularity=2 is only used by init='granular', not init='copy'"),
        (dict(init="split", drop_rate=0.2), "drop_rate=0.2 is only used by init='drop'"),
        (dict(seed=1.5), "seed must be an integer"),
        (dict(kmeans_iters=0), "kmeans_iters must be an integer >= 1"),
        (dict(version=99), "UpcycleConfig version 99 is not supported"),
    ],
)
def test_config_validation_messages(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        UpcycleConfig(**kwargs)


def test_config_json_round_trip():
    for cfg in (
        UpcycleConfig(),
        UpcycleConfig(init="drop", drop_rate=0.25, seed=7),
        UpcycleConfig(init="split", split_method="cluster", router_init="kmeans"),
        UpcycleConfig(init="granular", granularity=4, router_std=0.01),
    ):
        assert UpcycleConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert UpcycleConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ConfigError, match="unknown UpcycleConfig field"):
        UpcycleConfig.from_dict({"init": "copy", "rate": 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        UpcycleConfig().init = "drop"
    assert UpcycleConfig(init="split").resolved_router_init == "zeros"
    assert UpcycleConfig(init="copy").resolved_router_init == "random"


def test_layer_must_fit_the_dense_ffn():
    ffn = make_dense(gated=True, bias=True)
    dense = DenseFFNWeights.from_module(ffn)
    base = dict(d_model=D, num_experts=E, activation=ffn.activation, gated=True)
    with pytest.raises(UpcycleError, match="gives experts of width 8"):
        upcycle_layer(moeify.MoELayer(moeify.MoEConfig(d_ff=H, **base)), dense, UpcycleConfig(init="split"))
    with pytest.raises(UpcycleError, match="bias=False"):
        upcycle_layer(moeify.MoELayer(moeify.MoEConfig(d_ff=H, bias=False, **base)), dense, UpcycleConfig())
    with pytest.raises(UpcycleError, match="gated=True"):
        upcycle_layer(
            moeify.MoELayer(moeify.MoEConfig(d_ff=H, **{**base, "gated": False})), dense, UpcycleConfig()
        )
    with pytest.raises(UpcycleError, match="needs 2H"):
        DenseFFNWeights(
            w1=torch.zeros(H, D), b1=None, w2=torch.zeros(D, H), b2=None, activation="silu", gated=True
        )


def test_dense_without_bias_into_layer_with_bias():
    ffn = make_dense(bias=False)
    cfg = moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, activation=ffn.activation, gated=True)
    layer = moeify.MoELayer(cfg).eval()
    with torch.no_grad():
        layer.b1.fill_(1.0)
    upcycle_layer(layer, DenseFFNWeights.from_module(ffn), UpcycleConfig())
    assert torch.count_nonzero(layer.b1) == 0
    assert rel_err(layer, ffn, torch.randn(20, D)) <= TOL


def test_none_leaves_everything():
    ffn = make_dense()
    layer = make_layer(UpcycleConfig(init="none"), ffn, k=2)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    result = upcycle_layer(layer, DenseFFNWeights.from_module(ffn), UpcycleConfig(init="none"))
    assert result.init == "none"
    assert all(torch.equal(before[n], p) for n, p in layer.named_parameters())
