"""The SMILE bi-level router (node gate, then local gate) against a slow per-token loop of the paper's
formula: routing, output, the two-level balance loss and every gradient; config checks; convert + save/load;
ONNX export parity.

Shape legend: T tokens, D model width, H expert hidden width, E experts, N nodes, M = E / N, K experts a
token.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moeify
from moeify.routers import GROUPED_FFN, router_class

D, H, E, T = 8, 12, 8, 16


def make_layer(nodes: int, k: int, seed: int = 0, **fields) -> moeify.MoELayer:
    fields = {"activation": "silu", "gated": True, "bias": True, "z_loss_coef": 0.01, **fields}
    cfg = moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, k=k, router="smile", router_groups=nodes,
                           **fields)
    torch.manual_seed(seed)
    layer = moeify.MoELayer(cfg)
    with torch.no_grad():
        layer.b1.normal_(std=0.1)
        layer.b2.normal_(std=0.1)
        layer.router.weight.normal_(std=1.0)  # decisive routing, away from ties
    return layer


def reference(layer: moeify.MoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Token by token, from the layer's parameters: (output [T, D], aux loss, [(expert, weight)] per token).

    Node gate: softmax over the N node rows, top-1 node n; local gate: softmax over the M local rows, the K
    best slots j; combine weight p_node[n] * p_local[j]; expert n*M + j. Loss: coef * (N sum_n f_n P_n +
    M sum_j f_j P_j) + z_coef * (mean lse(node logits)^2 + mean lse(local logits)^2).
    """
    cfg = layer.config
    N, K = cfg.router_groups, cfg.k
    M = E // N
    W = layer.router.weight  # [N + M, D]
    out, routes = [], []
    node_count, slot_count = [0.0] * N, [0.0] * M
    node_prob, slot_prob = [0.0] * N, [0.0] * M
    z_node = z_local = 0.0
    for t in range(x.shape[0]):
        logits = [W[r] @ x[t] for r in range(N + M)]
        node_e = [torch.exp(v) for v in logits[:N]]
        local_e = [torch.exp(v) for v in logits[N:]]
        p_node = [v / sum(node_e) for v in node_e]
        p_local = [v / sum(local_e) for v in local_e]
        n = max(range(N), key=lambda i: float(p_node[i].detach()))
        slots = sorted(range(M), key=lambda j: -float(p_local[j].detach()))[:K]
        y = torch.zeros(D)
        route = []
        for j in slots:
            e, w = n * M + j, p_node[n] * p_local[j]
            h = F.silu(layer.w1[e, :H] @ x[t] + layer.b1[e, :H]) * (layer.w1[e, H:] @ x[t] + layer.b1[e, H:])
            y = y + w * (layer.w2[e] @ h + layer.b2[e])
            route.append((e, float(w.detach())))
            slot_count[j] += 1
        node_count[n] += 1
        for i in range(N):
            node_prob[i] = node_prob[i] + p_node[i]
        for j in range(M):
            slot_prob[j] = slot_prob[j] + p_local[j]
        z_node = z_node + torch.log(sum(node_e)) ** 2
        z_local = z_local + torch.log(sum(local_e)) ** 2
        out.append(y)
        routes.append(route)
    T_ = x.shape[0]
    node_loss = N * sum(node_count[i] / T_ * node_prob[i] / T_ for i in range(N)) if N > 1 else 0.0
    local_loss = M * sum(slot_count[j] / (T_ * K) * slot_prob[j] / T_ for j in range(M))
    aux = cfg.aux_loss_coef * (node_loss + local_loss) + cfg.z_loss_coef * (z_node + z_local) / T_
    return torch.stack(out), aux, routes


def grads(layer: moeify.MoELayer, x: torch.Tensor, cot: torch.Tensor, fast: bool):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    if fast:
        out, aux = layer(x), None
        aux = moeify.aux_loss(layer)
    else:
        out, aux, _ = reference(layer, x)
    ((out * cot).sum() + aux).backward()
    return out.detach(), aux.detach(), [x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize("nodes, k", [(2, 1), (2, 2), (4, 1), (4, 2), (1, 3)])
def test_matches_the_slow_reference_forward_and_backward(nodes, k):
    layer = make_layer(nodes, k)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    cot = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    routing = layer.router(x)
    _, _, routes = reference(layer, x)
    got = sorted(zip(routing.token_idx.tolist(), routing.expert_idx.tolist(), routing.weight.tolist(),
                     strict=True))
    want = sorted((t, e, w) for t, route in enumerate(routes) for e, w in route)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert np.allclose([g[2] for g in got], [w[2] for w in want], atol=1e-6)
    out_f, aux_f, g_f = grads(layer, x, cot, fast=True)
    out_r, aux_r, g_r = grads(layer, x, cot, fast=False)
    torch.testing.assert_close(out_f, out_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux_f, aux_r, atol=1e-6, rtol=1e-5)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_a_token_stays_in_one_node_and_its_weight_is_the_product_of_the_gates():
    layer = make_layer(nodes=4, k=2)  # M = 2: both of a token's experts are its node's
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3))
    r = layer.router(x)
    experts = r.expert_idx.reshape(64, 2)
    assert torch.equal(experts[:, 0] // 2, experts[:, 1] // 2)
    assert len(set((experts[:, 0] // 2).tolist())) > 1  # the node gate does choose between nodes
    logits = x @ layer.router.weight.t()
    p_node, p_local = logits[:, :4].softmax(-1), logits[:, 4:].softmax(-1)
    want = p_node.max(-1).values.unsqueeze(1) * p_local.gather(1, experts % 2)
    torch.testing.assert_close(r.weight.reshape(64, 2), want)
    assert set(r.losses) == {"node_balance", "local_balance", "z_loss"}
    assert layer.router.weight.shape == (4 + 2, D)  # N + M rows, not E


def test_uniform_gates_give_a_balance_loss_of_one_per_level():
    layer = make_layer(nodes=2, k=1, z_loss_coef=0.0)
    with torch.no_grad():
        layer.router.weight.zero_()
    r = layer.router(torch.randn(10, D))
    coef = layer.config.aux_loss_coef
    assert float(r.losses["node_balance"].detach()) == pytest.approx(coef)
    assert float(r.losses["local_balance"].detach()) == pytest.approx(coef)


def test_capacity_drops_only_what_does_not_fit():
    free = make_layer(nodes=2, k=2)
    capped = make_layer(nodes=2, k=2, capacity_factor=0.5)
    assert capped.router.caps.mixes_tokens and not free.router.caps.mixes_tokens
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(5))
    a, b = free.router(x), capped.router(x)
    dropped = b.expert_idx == E
    assert bool(dropped.any())
    assert torch.equal(b.expert_idx[~dropped], a.expert_idx[~dropped])
    assert torch.bincount(b.expert_idx[~dropped], minlength=E).max() <= int(np.ceil(0.5 * T * 2 / E))
    assert torch.equal(b.losses["node_balance"], a.losses["node_balance"])  # counts decisions, not fits


def test_declares_its_groups():
    cfg = make_layer(nodes=4, k=2).config
    caps = router_class("smile").capabilities(cfg)
    assert (caps.expert_groups, caps.active_experts, caps.lowerings) == (4, 2.0, (GROUPED_FFN,))
    assert caps.learned and not caps.mixes_tokens
    assert not router_class("smile").preserves_dense(moeify.upcycle.UpcycleConfig(init="copy"), cfg)


@pytest.mark.parametrize("fields, needle", [
    (dict(router_groups=3), "divisible by router_groups (3)"),
    (dict(router_groups=4, k=3), "k (3) must be <= the experts of one group"),
    (dict(router="topk", router_groups=2), "does not route by expert groups"),
    (dict(router_groups=0), "router_groups must be an integer >= 1"),
])
def test_bad_groups_are_refused_with_a_reason(fields, needle):
    base = dict(d_model=D, d_ff=H, num_experts=E, k=1, router="smile")
    with pytest.raises(moeify.ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        moeify.MoEConfig(**{**base, **fields})


def test_kmeans_router_init_is_refused_even_when_the_rows_count_matches():
    """N + M = E here (2 + 2 = 4): the rows are gates over nodes and over a node's experts, not centroids."""
    from moeify.upcycle import DenseFFNWeights, UpcycleConfig, UpcycleError, upcycle_layer

    cfg = moeify.MoEConfig(d_model=D, d_ff=H, num_experts=4, k=1, router="smile", router_groups=2,
                           activation="gelu", bias=False)
    layer = moeify.MoELayer(cfg)
    assert layer.router.weight.shape[0] == 4
    dense = DenseFFNWeights(w1=torch.randn(H, D), b1=None, w2=torch.randn(D, H), b2=None, activation="gelu",
                            gated=False)
    with pytest.raises(UpcycleError, match="one row per expert"):
        upcycle_layer(layer, dense, UpcycleConfig(init="copy", router_init="kmeans"),
                      calibration=torch.randn(32, D))


@pytest.fixture(scope="module")
def converted():
    from tests.zoo import ZOO

    entry = ZOO["llama"]
    moe = moeify.convert(entry.build(), experts=4, k=1, router="smile", init="copy", seed=0,
                         layer={"router_groups": 2})
    with torch.no_grad():  # decisive routing and distinct experts, so the export must route right
        for m in moe.modules():
            if isinstance(m, moeify.MoELayer):
                m.router.weight.normal_(generator=torch.Generator().manual_seed(3))
                m.w1.add_(0.1 * torch.randn(m.w1.shape, generator=torch.Generator().manual_seed(4)))
    return entry, moe.eval()


@pytest.mark.slow
def test_convert_trains_and_saves(converted, tmp_path):
    entry, moe = converted
    layers = [m for m in moe.modules() if isinstance(m, moeify.MoELayer)]
    assert layers and all(m.config.router_groups == 2 for m in layers)
    ids = entry.inputs()["input_ids"]
    moe.train()
    try:
        out = moe(input_ids=ids, labels=ids)
        (out.loss + moeify.aux_loss(moe)).backward()
    finally:
        moe.eval()
    assert all(float(m.router.weight.grad.abs().sum()) > 0 for m in layers)
    moe.zero_grad(set_to_none=True)
    moeify.save(moe, tmp_path / "moe")
    loaded = moeify.load(tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(entry.run(loaded), entry.run(moe))


@pytest.mark.ort
@pytest.mark.slow
def test_portable_onnx_export_matches_pytorch(tmp_path):
    from moeify.runtime import make_session, run

    layer = make_layer(nodes=2, k=2).eval()
    result = moeify.export_onnx(layer, torch.randn(2, 5, D), tmp_path / "smile.onnx", target="portable")
    assert set(result.layers.values()) == {"moeify.GroupedFFN (inlined)"}
    session = make_session(result.path)
    for batch, seq in [(1, 3), (3, 11)]:
        x = torch.randn(batch, seq, D, generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = layer(x).numpy()
        got = next(iter(run(session, [x.numpy()]).values()))
        assert got.shape == want.shape
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{batch}x{seq}: relative error {err:.2e}"
