"""The grouped-GEMM dispatch (`moeify.dispatch.grouped`, `impl="grouped_mm"`; the CUDA kernels of the
dispatch ops) against the slow reference, forward and backward, on the CPU (the torch permutation and
`torch._grouped_mm`'s CPU kernel) and on CUDA where there is one.

Shape legend: T tokens, D model width, H expert hidden width (H1 = 2H when gated), E experts, N assignments.

Tolerances, stated once:
  float64  the loop over experts (`_grouped_mm` has no float64 kernel): torch's defaults (~1e-7 relative).
  float32  `_grouped_mm`: rtol = atol = 1e-5 against the float32 reference (observed <= 8e-6).
  bfloat16 / float16, against the float64 reference, every output and gradient: max error <= 3e-2 / 5e-3
           times the reference's largest magnitude (observed <= 1.2e-2 / 2.1e-3, about what the reference
           itself shows in that dtype); relu is left out there, its kink flips signs at this precision.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moeify
from moeify.activations import ACTIVATIONS
from moeify.dispatch import grouped_ffn, ops, reference_grouped_ffn
from moeify.dispatch.grouped_mm import grouped_linear, grouped_mm_runs, grouped_weight_grad
from tests.dispatch.test_dispatch import UNEVEN, WITH_DROPPED
from tests.test_layer import ROUTER_CASES, make_layer, run

T, D, H, E = 9, 8, 16, 5  # D and H multiples of 8: 16-byte strides in every dtype, as _grouped_mm needs
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
F32 = dict(rtol=1e-5, atol=1e-5)
LOW_PRECISION_TOL = {torch.bfloat16: 3e-2, torch.float16: 5e-3}
NAMES = ("x", "weight", "w1", "b1", "w2", "b2")


def make_inputs(gated: bool, bias: bool, experts: list[int], dtype=torch.float32, device="cpu",
                d_model: int = D) -> dict:
    g = torch.Generator().manual_seed(0)
    H1 = 2 * H if gated else H

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    inp = dict(x=leaf(T, d_model), weight=torch.rand(len(experts), generator=g).to(dtype).to(device),
               w1=leaf(E, H1, d_model, scale=d_model ** -0.5), b1=leaf(E, H1, scale=0.1) if bias else None,
               w2=leaf(E, d_model, H, scale=H ** -0.5), b2=leaf(E, d_model, scale=0.1) if bias else None)
    for t in inp.values():
        if t is not None:
            t.requires_grad_(True)
    inp["token_idx"] = torch.randint(0, T, (len(experts),), generator=g).to(device)  # [N]
    inp["expert_idx"] = torch.tensor(experts, dtype=torch.long, device=device)  # [N]
    return inp


def forward_backward(fn, inp: dict, activation: str, gated: bool, grad_out: torch.Tensor, **kw):
    """Output and the grads of every differentiable input (in NAMES order, absent biases skipped)."""
    out = fn(inp["x"], inp["token_idx"], inp["expert_idx"], inp["weight"], inp["w1"], inp["b1"], inp["w2"],
             inp["b2"], activation, gated, **kw)
    wrt = [inp[n] for n in NAMES if inp[n] is not None]
    return out, torch.autograd.grad(out, wrt, grad_out.to(out.dtype))


def as_double(inp: dict) -> dict:
    return {k: v if v is None or not v.is_floating_point() else v.detach().double().requires_grad_(True)
            for k, v in inp.items()}


@pytest.fixture
def grouped_mm_calls(monkeypatch) -> list[torch.dtype]:
    """The dtypes of every `torch._grouped_mm` call made (the spy proves the path really takes it)."""
    calls, real = [], torch._grouped_mm

    def spy(a, b, *args, **kw):
        calls.append(a.dtype)
        return real(a, b, *args, **kw)

    monkeypatch.setattr(torch, "_grouped_mm", spy)
    return calls


# ------------------------------------------------------------------------------------- the grouped GEMMs

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_gemms_match_the_loop(dtype, device):
    """Both GEMM shapes through `_grouped_mm` (where it runs) and through the loop agree: an empty group, and
    rows past the last group (dropped assignments) that must come out zero / be ignored."""
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([3, 3, 7, 8], dtype=torch.int32, device=device)  # group 1 empty; rows 8, 9 in none
    a = torch.randn(10, 16, generator=g).to(dtype).to(device)  # [N, K]
    w = torch.randn(4, 24, 16, generator=g).to(dtype).to(device)  # [E, P, K]
    b = torch.randn(10, 24, generator=g).to(dtype).to(device)  # [N, Q]
    a[8:] = float("nan")  # never read by either GEMM
    lin = {use: grouped_linear(a, w.transpose(1, 2), offs, use_grouped_mm=use) for use in (True, False)}
    if dtype != torch.float32:
        a32, w32 = a.float(), w.float()
        want = torch.cat([a32[s:e] @ w32[i].t() for i, (s, e) in enumerate(((0, 3), (3, 3), (3, 7), (7, 8)))])
        torch.testing.assert_close(lin[False][:8].float(), want, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lin[True], lin[False])
    assert lin[True][8:].abs().max() == 0 and lin[False][8:].abs().max() == 0
    wg = {use: grouped_weight_grad(b, a, offs, use_grouped_mm=use) for use in (True, False)}  # [E, Q, K]
    torch.testing.assert_close(wg[True], wg[False])
    assert wg[True][1].abs().max() == 0  # the empty group's gradient is zero
    want = b[7:8].float().t() @ a[7:8].float()  # [Q, K]: group 3 is row 7 alone
    torch.testing.assert_close(wg[False][3].float(), want, rtol=1e-2, atol=1e-2)


def test_grouped_mm_runs_where_it_should():
    offs_ok = torch.randn(4, 8)
    w = torch.randn(2, 8, 16)
    assert grouped_mm_runs(offs_ok, w)
    assert grouped_mm_runs(offs_ok.bfloat16(), w.bfloat16()) and grouped_mm_runs(offs_ok.half(), w.half())
    assert not grouped_mm_runs(offs_ok.double(), w.double())  # no float64 kernel
    assert not grouped_mm_runs(torch.randn(4, 6), torch.randn(2, 6, 16))  # 24-byte rows: not 16-aligned
    assert not grouped_mm_runs(torch.randn(33)[1:].view(4, 8), w)  # base address off by 4 bytes


# ------------------------------------------------------------------------------- the dispatch, op level

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropped", [False, True], ids=["dropless", "dropped"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_grouped_path_matches_reference_float32(activation, gated, bias, dropped, device, grouped_mm_calls):
    inp = make_inputs(gated, bias, WITH_DROPPED if dropped else UNEVEN, device=device)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(device)
    ref, ref_grads = forward_backward(reference_grouped_ffn, inp, activation, gated, grad_out)
    impls = ["grouped_mm"] + (["fast"] if device == "cuda" else [])  # on CUDA "fast" is this path too
    for impl in impls:
        out, grads = forward_backward(grouped_ffn, inp, activation, gated, grad_out, impl=impl)
        torch.testing.assert_close(out, ref, **F32)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **F32)
    if device == "cpu":  # forward 2 GEMMs, backward 4 (or fewer, never more than 5 with the recompute)
        assert torch.float32 in grouped_mm_calls and len(grouped_mm_calls) >= 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation,gated,bias", [("silu", True, False), ("gelu", False, True),
                                                   ("gelu_tanh", True, True)])
def test_grouped_path_low_precision(activation, gated, bias, dtype, device, grouped_mm_calls):
    inp = make_inputs(gated, bias, WITH_DROPPED, dtype=dtype, device=device)
    grad_out = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).to(device)
    ref = forward_backward(reference_grouped_ffn, as_double(inp), activation, gated, grad_out.double())
    got = forward_backward(grouped_ffn, inp, activation, gated, grad_out, impl="grouped_mm")
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1])
    names = ["out"] + [n for n in NAMES if inp[n] is not None]
    for name, g, r in zip(names, (got[0], *got[1]), (ref[0], *ref[1]), strict=True):
        err = (g.double() - r).abs().max() / r.abs().max()
        assert err <= LOW_PRECISION_TOL[dtype], f"{name}: relative error {err:.2e} in {dtype}"
    assert dtype in grouped_mm_calls or device == "cuda"  # on CUDA float16 takes the loop (documented)


def test_loop_fallback_matches_reference(grouped_mm_calls):
    """Where `_grouped_mm` cannot run (float64; 24-byte rows, where only the GEMMs whose operands are all
    16-byte aligned take it) the loop computes the same."""
    for dtype, d_model in ((torch.float64, D), (torch.float32, 6)):
        inp = make_inputs(True, True, WITH_DROPPED, dtype=dtype, d_model=d_model)
        grad_out = torch.randn(T, d_model, dtype=dtype)
        ref, ref_grads = forward_backward(reference_grouped_ffn, inp, "gelu", True, grad_out)
        out, grads = forward_backward(grouped_ffn, inp, "gelu", True, grad_out, impl="grouped_mm")
        torch.testing.assert_close(out, ref, **F32)
        for got, want in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(got, want, **F32)
    assert torch.float64 not in grouped_mm_calls and len(grouped_mm_calls) < 6  # some GEMMs looped


@pytest.mark.parametrize("experts", [[], [E, E, E]], ids=["no_assignments", "all_dropped"])
def test_degenerate_routings_give_zeros(experts):
    inp = make_inputs(True, True, experts)
    out, grads = forward_backward(grouped_ffn, inp, "silu", True, torch.ones(T, D), impl="grouped_mm")
    assert out.shape == (T, D) and out.abs().max() == 0
    for g, n in zip(grads, NAMES, strict=True):
        assert g.shape == inp[n].shape and (g.numel() == 0 or g.abs().max() == 0)


def test_partial_grads_and_the_recompute_path():
    """Frozen inputs get no gradient and the wanted ones are right; the backward without saved
    intermediates (the public op's, used by the CUDA kernel registration) recomputes h and a."""
    from moeify.dispatch import grouped

    inp = make_inputs(True, True, WITH_DROPPED)
    grad_out = torch.randn(T, D)
    args = [inp[k] for k in ("x", "token_idx", "expert_idx", "weight", "w1", "b1", "w2", "b2")]
    ref, ref_grads = forward_backward(reference_grouped_ffn, inp, "silu", True, grad_out)
    masks = ([True] * 6, [False, True, True, False, True, False], [True, False, False, False, False, True])
    for mask in masks:
        grads = grouped.backward(grad_out, *[a.detach() for a in args], None, "silu", True, mask)
        for wanted, got, want in zip(mask, grads, ref_grads, strict=True):
            if wanted:
                torch.testing.assert_close(got, want, **F32)
            else:
                assert got.numel() == 0


@pytest.mark.slow  # the first use of meta tensors imports torch's meta registrations (~4 s)
def test_no_host_reads_in_the_grouped_path():
    """Forward and backward run on meta tensors, which have no data: any `.item()`, `.tolist()`, `.cpu()`,
    boolean-mask index or data-dependent shape would raise. In bfloat16, the dtype `_grouped_mm` takes on
    CUDA."""
    inp = make_inputs(True, True, WITH_DROPPED, dtype=torch.bfloat16, device="meta")
    out, grads = forward_backward(grouped_ffn, inp, "silu", True, torch.empty(T, D, device="meta"),
                                  impl="grouped_mm")
    assert out.shape == (T, D) and [g.shape for g in grads] == [inp[n].shape for n in NAMES]


@pytest.mark.slow  # as above, when it runs first
def test_layer_records_statistics_without_reading_them():
    """A whole MoELayer step (top-k router, losses, dispatch, statistics) on meta tensors: nothing is read
    back to the host; the statistics stay on the layer's device until asked for."""
    layer = make_layer(router="topk").to("meta", torch.bfloat16)
    layer.dispatch_impl = "grouped_mm"
    x = torch.empty(2, 6, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    (layer(x).sum() + moeify.aux_loss(layer)).backward()
    stats = layer.last_stats
    assert stats.device_tokens_per_expert.device.type == "meta" and stats.num_tokens == 12
    assert stats.device_dropped_fraction.device.type == "meta"


# ------------------------------------------------------------------------------ the layer, every router

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(ROUTER_CASES))
def test_layer_grouped_mm_matches_reference_for_every_router(case, device):
    fields, train, with_ids = ROUTER_CASES[case]
    for gated, bias in ((True, False), (False, True)):
        activation = "silu" if gated else "gelu"
        layer = make_layer(**fields, activation=activation, gated=gated, bias=bias).to(device)
        layer.train(train)
        ref = copy.deepcopy(layer)
        layer.dispatch_impl, ref.dispatch_impl = "grouped_mm", "reference"
        g = torch.Generator().manual_seed(3)
        x = torch.randn(2, 6, D, generator=g).to(device)  # T = 12 tokens
        ids = torch.randint(0, 1000, (2, 6), generator=g).to(device) if with_ids else None
        grad_out = torch.randn(x.shape, generator=g).to(device)
        out, gx, grads = run(layer, x, grad_out, ids)
        out_r, gx_r, grads_r = run(ref, x, grad_out, ids)
        torch.testing.assert_close(out, out_r, **F32)
        torch.testing.assert_close(gx, gx_r, **F32)
        for name in grads_r:
            torch.testing.assert_close(grads[name], grads_r[name], **F32, msg=lambda m, n=name: f"{n}: {m}")
        assert out.abs().sum() > 0 and gx.abs().sum() > 0


# ------------------------------------------------------------------------------------- CUDA only

def test_dispatch_ops_have_cuda_kernels():
    """Importing moeify registers the grouped path as the CUDA kernel of each dispatch op (checked on any
    build: the CPU kernel is the ops' default, so only the CUDA key shows a kernel of its own)."""
    for op in ("grouped_ffn", "grouped_ffn_train", "grouped_ffn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"moeify::{op}", "CUDA"), op
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"moeify::{op}", "CPU"), op


@needs_cuda
def test_cuda_kernels_pass_opcheck():
    """The registered CUDA kernels of the dispatch ops agree with their fake kernels and autograd."""
    inp = make_inputs(True, True, WITH_DROPPED, dtype=torch.bfloat16, device="cuda")
    args = tuple(inp[k] for k in ("x", "token_idx", "expert_idx", "weight", "w1", "b1", "w2", "b2"))
    cheap = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(ops.grouped_ffn_op, args + ("silu", True), test_utils=cheap)
    torch.library.opcheck(ops.grouped_ffn_train_op, args + ("silu", True), test_utils=cheap)


@needs_cuda
def test_cuda_forward_and_backward_never_synchronise():
    """bfloat16 on CUDA: a training step of the dispatch (impl "fast": the registered kernels) with torch's
    sync debug mode set to raise on any host synchronisation."""
    inp = make_inputs(True, True, WITH_DROPPED, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    forward_backward(grouped_ffn, inp, "silu", True, grad_out)  # warm-up: first-call set-up may sync
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward_backward(grouped_ffn, inp, "silu", True, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
