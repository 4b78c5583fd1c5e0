"""The fast dispatch (`moeify::grouped_ffn` and friends, the soft fast path) against the slow reference.

Shape legend: T tokens, D model width, H expert hidden width (H1 = 2H when gated), E experts, N assignments.
"""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.activations import ACTIVATIONS
from moeify.dispatch import buffers, grouped_ffn, ops, soft_experts
from moeify.dispatch.ops import grouped_ffn_backward_op, grouped_ffn_op, grouped_ffn_train_op
from moeify.dispatch.reference import reference_grouped_ffn, reference_soft_experts

T, D, H, E = 9, 6, 5, 5


def make_inputs(gated: bool, bias: bool, expert_idx: list[int], dtype=torch.float64, seed: int = 0,
                num_tokens: int = T) -> dict:
    """Inputs of `grouped_ffn` (differentiable ones as leaves requiring grad)."""
    g = torch.Generator().manual_seed(seed)
    H1 = 2 * H if gated else H
    N = len(expert_idx)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    return dict(
        x=leaf(num_tokens, D),  # [T, D]
        token_idx=torch.randint(0, max(num_tokens, 1), (N,), generator=g),  # [N]
        expert_idx=torch.tensor(expert_idx, dtype=torch.long),  # [N]
        weight=torch.rand(N, generator=g, dtype=dtype).requires_grad_(True),  # [N]
        w1=leaf(E, H1, D), b1=leaf(E, H1) if bias else None,
        w2=leaf(E, D, H), b2=leaf(E, D) if bias else None,
    )


# Uneven groups: expert 0 has 5 rows, 1 none, 2 one, 3 three, 4 two; "dropped" adds assignments to E.
UNEVEN = [0, 3, 0, 2, 4, 0, 3, 0, 4, 3, 0]
WITH_DROPPED = [0, E, 3, 0, 2, E, 4, 0, 3, E, 0, 4, 3, 0, E]


def leaves(inp: dict) -> list[torch.Tensor]:
    return [inp[k] for k in ("x", "weight", "w1", "b1", "w2", "b2") if inp[k] is not None]


def run(fn, inp: dict, activation: str, gated: bool, grad_out: torch.Tensor):
    out = fn(**inp, activation=activation, gated=gated)
    return out, torch.autograd.grad(out, leaves(inp), grad_out)


# The kernel computes a group's forward GEMMs column-major up to COLMAJOR_MAX_ROWS rows, row-major above,
# and among the column-major groups keeps the activation between the GEMMs row-major up to
# ROWMAJOR_ACT_MAX_ROWS rows. UNEVEN's groups have 0-5 rows: (0, _) puts every group on the row-major path,
# (2, _) splits them between the two paths within one call, (1000, _) puts every group on the column-major
# path, with the activation row-major (10), column-major (0) or split (2).
@pytest.fixture(params=[(0, 10), (2, 10), (1000, 10), (1000, 0), (1000, 2)],
                ids=["rowmajor", "mixed", "colmajor", "colmajor-act", "colmajor-mixed-act"])
def group_layout(request, monkeypatch):
    colmajor_max, rowmajor_act_max = request.param
    monkeypatch.setattr(ops, "COLMAJOR_MAX_ROWS", colmajor_max)
    monkeypatch.setattr(ops, "ROWMAJOR_ACT_MAX_ROWS", rowmajor_act_max)
    return request.param


@pytest.mark.parametrize("dropped", [False, True], ids=["dropless", "dropped"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fast_matches_reference(activation, gated, bias, dropped, group_layout):
    inp = make_inputs(gated, bias, WITH_DROPPED if dropped else UNEVEN)
    grad_out = torch.randn(T, D, dtype=torch.float64)
    ref, ref_grads = run(reference_grouped_ffn, inp, activation, gated, grad_out)
    # The entry point (training op under grad), the public op (backward recomputes h), and no-grad use.
    for fn in (grouped_ffn, grouped_ffn_op, lambda **kw: grouped_ffn_train_op(**kw)[0]):
        out, grads = run(fn, inp, activation, gated, grad_out)
        torch.testing.assert_close(out, ref)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(grouped_ffn(**inp, activation=activation, gated=gated), ref)


def test_empty_expert_grads_are_zero_and_dropped_weight_grad_is_zero():
    inp = make_inputs(True, True, WITH_DROPPED)
    out = grouped_ffn(**inp, activation="silu", gated=True)
    out.square().sum().backward()
    assert inp["w1"].grad[1].abs().max() == 0 and inp["w2"].grad[1].abs().max() == 0  # expert 1 got nobody
    assert inp["b1"].grad[1].abs().max() == 0 and inp["b2"].grad[1].abs().max() == 0
    assert inp["w1"].grad[0].abs().max() > 0
    dropped = inp["expert_idx"] == E
    assert inp["weight"].grad[dropped].abs().max() == 0 and inp["weight"].grad[~dropped].abs().min() > 0


@pytest.mark.parametrize("case", ["no_assignments", "no_tokens", "all_dropped"])
def test_degenerate_sizes(case):
    experts = {"no_assignments": [], "no_tokens": [], "all_dropped": [E, E, E]}[case]
    inp = make_inputs(False, True, experts, num_tokens=0 if case == "no_tokens" else T)
    for fn in (grouped_ffn, grouped_ffn_op):
        out = fn(**inp, activation="gelu", gated=False)
        assert out.shape == inp["x"].shape and (out.numel() == 0 or out.abs().max() == 0)
        grads = torch.autograd.grad(out, leaves(inp), torch.ones_like(out))
        for g, t in zip(grads, leaves(inp), strict=True):
            assert g.shape == t.shape and (g.numel() == 0 or g.abs().max() == 0)


def test_bfloat16_close_to_float64_reference():
    inp = make_inputs(True, True, WITH_DROPPED, dtype=torch.bfloat16)
    out = grouped_ffn(**inp, activation="silu", gated=True)
    ref = reference_grouped_ffn(**{k: (v.double() if torch.is_floating_point(v) else v) if v is not None
                                   else None for k, v in inp.items()}, activation="silu", gated=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)


def test_frozen_inputs_skip_their_grads():
    """A frozen x / router weight / expert weights: only the wanted grads come back, and they are right."""
    inp = make_inputs(False, True, UNEVEN)
    inp["x"].requires_grad_(False)
    inp["weight"].requires_grad_(False)
    inp["b2"].requires_grad_(False)
    grad_out = torch.randn(T, D, dtype=torch.float64)
    wanted = [inp["w1"], inp["b1"], inp["w2"]]
    ref = torch.autograd.grad(reference_grouped_ffn(**inp, activation="relu", gated=False), wanted, grad_out)
    got = torch.autograd.grad(grouped_ffn(**inp, activation="relu", gated=False), wanted, grad_out)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("activation,gated,bias", [("gelu", False, True), ("silu", True, False),
                                                   ("gelu_tanh", True, True)])
def test_gradcheck(activation, gated, bias, group_layout):
    inp = make_inputs(gated, bias, WITH_DROPPED[:9])
    names = [k for k in ("x", "weight", "w1", "b1", "w2", "b2") if inp[k] is not None]

    def f(op):
        def call(*args):
            kw = dict(inp, **dict(zip(names, args, strict=True)))
            out = op(**kw, activation=activation, gated=gated)
            return out[0] if isinstance(out, tuple) else out
        return call

    for op in (grouped_ffn_op, grouped_ffn_train_op):
        assert torch.autograd.gradcheck(f(op), tuple(inp[n] for n in names), fast_mode=True)


@pytest.mark.slow
def test_opcheck():
    """Schema, fake kernels, autograd registration and AOT dispatch of the ops. The full check runs once on
    the public op and the backward op; the training op and the variants (no bias, no dropped rows, partial
    grads, nothing saved) get the cheap checks (the compile test runs the training op through AOT)."""
    cheap = ("test_schema", "test_faketensor", "test_autograd_registration")
    for full, (dropped, bias) in ((True, (True, True)), (False, (False, False))):
        tests = "ALL" if full else cheap
        inp = make_inputs(True, bias, WITH_DROPPED if dropped else UNEVEN, dtype=torch.float32)
        args = tuple(inp.values()) + ("silu", True)
        torch.library.opcheck(grouped_ffn_op, args, test_utils=tests)
        torch.library.opcheck(grouped_ffn_train_op, args, test_utils=cheap)
        with torch.no_grad():
            saved = grouped_ffn_train_op(*args)[1:]  # h, a, y
        plain = tuple(t.detach() if t is not None else None for t in args[:8])  # no double backward
        for mask, kept in (([True] * 6, saved), ([False, True, True, False, True, False], (None,) * 3)):
            bwd_args = (torch.randn(T, D),) + plain + tuple(kept) + ("silu", True, mask)
            torch.library.opcheck(grouped_ffn_backward_op, bwd_args, test_utils=tests)
            tests = cheap


def _layer(router: str = "topk", **kw) -> moeify.MoELayer:
    torch.manual_seed(0)
    cfg = moeify.MoEConfig(d_model=8, d_ff=12, num_experts=4, k=2, router=router, activation="silu",
                           gated=True, **kw)
    return moeify.MoELayer(cfg)


def _train_step(layer, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward, loss with the aux losses, backward; returns the output and the grads of x and parameters."""
    params = list(layer.parameters())
    for t in [x] + params:
        t.grad = None
    y = layer(x)
    loss = y.square().mean() + moeify.aux_loss(layer)
    loss.backward()
    return y.detach(), [t.grad.clone() for t in [x] + params]


# Inductor is left out: compiling its C++ kernels took minutes on the shared 2-core machine. aot_eager runs
# the same AOT autograd graphs (forward through the fake kernels, backward through the backward op).
@pytest.mark.slow
@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "recycled"])
@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_training_step_matches_eager(backend, pooled, monkeypatch):
    """The compiled forward (custom ops seen through their fake kernels) and its AOT backward graph, which
    runs `moeify::grouped_ffn_backward`, give the eager numbers; also when the weight grads come from the
    recycled-buffer pool (normally only for 32 MiB and up)."""
    if pooled:
        monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    layer = _layer(capacity_factor=1.0)  # capacity factor 1.0 with k=2 drops some assignments
    x = torch.randn(2, 7, 8, requires_grad=True)
    eager_y, eager_grads = _train_step(layer, x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    y, grads = _train_step(compiled, x)
    torch.testing.assert_close(y, eager_y)
    for g, r in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, r)


def test_export_keeps_public_op_and_matches():
    layer = _layer().eval()
    x = torch.randn(11, 8)
    ep = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "moeify.grouped_ffn.default" in targets  # the op the ONNX lowering maps, not the training one
    assert not any("grouped_ffn_train" in t for t in targets)
    x2 = torch.randn(11, 8)
    torch.testing.assert_close(ep.module()(x2), layer(x2))


def test_layer_fast_matches_reference_dispatch():
    layer = _layer(bias=True)
    x = torch.randn(13, 8, requires_grad=True)
    y, grads = _train_step(layer, x)
    layer.dispatch_impl = "reference"
    y_ref, grads_ref = _train_step(layer, x)
    torch.testing.assert_close(y, y_ref)
    for g, r in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("activation,gated,bias", [("gelu", False, True), ("silu", True, False),
                                                   ("relu", True, True)])
def test_soft_fast_matches_reference(activation, gated, bias):
    S = 2
    inp = make_inputs(gated, bias, [])
    g = torch.Generator().manual_seed(1)
    dispatch = torch.softmax(torch.randn(T, E * S, generator=g, dtype=torch.float64), 0).requires_grad_(True)
    combine = torch.softmax(torch.randn(T, E * S, generator=g, dtype=torch.float64), 1).requires_grad_(True)
    args = (inp["x"], dispatch, combine, inp["w1"], inp["b1"], inp["w2"], inp["b2"], activation, gated)
    wrt = [t for t in (inp["x"], dispatch, combine, inp["w1"], inp["b1"], inp["w2"], inp["b2"])
           if t is not None]
    grad_out = torch.randn(T, D, dtype=torch.float64)
    out = soft_experts(*args)
    ref = reference_soft_experts(*args)
    torch.testing.assert_close(out, ref)
    for got, want in zip(torch.autograd.grad(out, wrt, grad_out), torch.autograd.grad(ref, wrt, grad_out),
                         strict=True):
        torch.testing.assert_close(got, want)


def test_unknown_impl_is_refused():
    inp = make_inputs(False, False, UNEVEN)
    with pytest.raises(ValueError, match="valid: fast, reference"):
        grouped_ffn(**inp, activation="gelu", gated=False, impl="triton")
