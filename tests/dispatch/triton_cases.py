"""Checks of the Triton permutation kernels run by `test_permute.test_triton_interpreted` in a fresh process
with TRITON_INTERPRET=1 (not a test module: pytest does not collect it).

Shape legend: T tokens, D row width, E experts, N assignments.

Each check raises AssertionError with what differed; `main()` prints "triton cases passed" at the end.
Tolerances: float32 results must match the torch path to float32 rounding; bfloat16/float16 to one unit
in the last place of the larger operand (the interpreter converts through numpy, and the combine sums in
float32 where the torch path sums in the row dtype).
"""

from __future__ import annotations

import os

import torch

from moeify.dispatch import grouped_ffn, reference_grouped_ffn
from moeify.dispatch.permute import combine_rows, gather_rows, plan_by_expert, resolve_backend

T, D, H, E = 6, 8, 16, 3
TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
       torch.float16: dict(rtol=1e-3, atol=1e-3)}


def check_permutation(dtype: torch.dtype, experts: list[int], scaled: bool) -> None:
    g = torch.Generator().manual_seed(len(experts))
    tokens = torch.randint(0, T, (len(experts),), generator=g)  # [N]
    plan = plan_by_expert(tokens, torch.tensor(experts, dtype=torch.long), E, T)
    x = torch.randn(T, D, generator=g).to(dtype)  # [T, D]
    scale = torch.rand(len(experts), generator=g) if scaled else None  # [N]
    rows = {b: gather_rows(x, plan, scale, backend=b) for b in ("torch", "triton")}  # [N, D] each
    torch.testing.assert_close(rows["triton"], rows["torch"], **TOL[dtype])
    src = rows["torch"]
    out = {b: combine_rows(src, plan, scale, backend=b) for b in ("torch", "triton")}  # [T, D] each
    torch.testing.assert_close(out["triton"], out["torch"], **TOL[dtype])


def check_grouped_dispatch(gated: bool, bias: bool) -> None:
    """The grouped path with the Triton permutation against the reference, forward and backward (float32)."""
    g = torch.Generator().manual_seed(1)
    experts = torch.tensor([0, E, 2, 0, 2, 1, E, 0, 2])  # [N]
    tokens = torch.randint(0, T, (len(experts),), generator=g)  # [N]
    H1 = 2 * H if gated else H
    leaves = dict(x=torch.randn(T, D, generator=g), weight=torch.rand(len(experts), generator=g),
                  w1=torch.randn(E, H1, D, generator=g), b1=torch.randn(E, H1, generator=g) if bias else None,
                  w2=torch.randn(E, D, H, generator=g), b2=torch.randn(E, D, generator=g) if bias else None)
    grad_out = torch.randn(T, D, generator=g)  # [T, D]
    results = []
    for fn, kw in ((reference_grouped_ffn, {}), (grouped_ffn, dict(impl="grouped_mm"))):
        t = {k: None if v is None else v.clone().requires_grad_() for k, v in leaves.items()}
        out = fn(t["x"], tokens, experts, t["weight"], t["w1"], t["b1"], t["w2"], t["b2"], "silu", gated,
                 **kw)
        wrt = [v for v in t.values() if v is not None]
        results.append((out, torch.autograd.grad(out, wrt, grad_out)))
    (ref, ref_grads), (got, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    assert resolve_backend(torch.zeros(1)) == "triton", "the interpreter should make Triton the CPU backend"
    cases = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for experts in ([0, E, 2, 0, 1, 2, E, 0], []):  # with dropped rows; no assignments at all
            for scaled in (False, True):
                check_permutation(dtype, experts, scaled)
                cases += 1
    for gated, bias in ((False, True), (True, False)):
        check_grouped_dispatch(gated, bias)
        cases += 1
    print(f"triton cases passed: {cases}")


if __name__ == "__main__":
    main()
