"""The expert permutation and its inverse (`moeify.dispatch.permute`): the torch path against plain loops,
the Triton kernels against the torch path under Triton's interpreter (in a fresh process:
`tests/dispatch/triton_cases.py`), and the same on CUDA where there is one.

Shape legend: T tokens, D row width, E experts, N assignments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeify.dispatch import permute

ROOT = Path(__file__).resolve().parents[2]
T, D, E = 7, 12, 4
EXPERTS = [2, E, 0, 2, 1, E, 0, 3, 2, 0]  # expert 1 has one row; two dropped assignments (index E)
TOKENS = [0, 1, 1, 3, 6, 6, 2, 0, 5, 0]  # token 4 gets nothing, token 0 three rows
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _plan(device: str = "cpu"):
    tokens, experts = torch.tensor(TOKENS, device=device), torch.tensor(EXPERTS, device=device)  # [N] each
    return permute.plan_by_expert(tokens, experts, E, T)


def test_plan_sorts_stably_by_expert_and_counts_on_the_device():
    plan = _plan()
    assert plan.order.tolist() == [2, 6, 9, 4, 0, 3, 8, 7, 1, 5]  # by expert, ties in assignment order
    assert plan.rows_token.tolist() == [TOKENS[i] for i in plan.order.tolist()]
    assert plan.row_expert.tolist() == [0, 0, 0, 1, 2, 2, 2, 3, E, E]
    assert plan.offs.dtype == torch.int32 and plan.offs.tolist() == [3, 4, 7, 8]
    assert plan.valid.squeeze(1).tolist() == [True] * 8 + [False] * 2


# (device, backend); the Triton kernels run on the CPU only under the interpreter: test_triton_interpreted
PATHS = [("cpu", "torch"), pytest.param("cuda", "torch", marks=needs_cuda),
         pytest.param("cuda", "triton", marks=needs_cuda)]


@pytest.mark.parametrize("device,backend", PATHS)
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "scaled"])
def test_gather_and_combine_match_loops(scaled, device, backend):
    plan = _plan(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g, dtype=torch.float64).to(device)  # [T, D]
    scale = torch.rand(len(EXPERTS), generator=g, dtype=torch.float64).to(device) if scaled else None  # [N]
    rows = permute.gather_rows(x, plan, scale, backend=backend)  # [N, D]
    for r, (t, e) in enumerate(zip(plan.rows_token.tolist(), plan.row_expert.tolist(), strict=True)):
        want = x[t] * (1 if scale is None else scale[r]) if e < E else torch.zeros_like(x[t])
        torch.testing.assert_close(rows[r], want)
    src = torch.randn(len(EXPERTS), D, generator=g, dtype=torch.float64).to(device)  # [N, D]
    out = permute.combine_rows(src, plan, scale, backend=backend)  # [T, D]
    want = torch.zeros(T, D, dtype=src.dtype, device=device)
    for r, t in enumerate(plan.rows_token.tolist()):
        want[t] += src[r] * (1 if scale is None else scale[r])
    torch.testing.assert_close(out, want)
    assert out[4].abs().max() == 0  # a token nobody routed stays zero


def test_combine_is_the_adjoint_of_gather():
    """<gather(x), g> = <x, combine(g)> over kept rows: the backward of one is the other."""
    plan = _plan()
    x, g = torch.randn(T, D, dtype=torch.float64), torch.randn(len(EXPERTS), D, dtype=torch.float64)
    g = g * plan.valid  # the combine sums every row it is given: dropped rows must be zero
    lhs = (permute.gather_rows(x, plan, backend="torch") * g).sum()
    rhs = (x * permute.combine_rows(g, plan, backend="torch")).sum()
    torch.testing.assert_close(lhs, rhs)


def test_backend_choice(monkeypatch):
    x = torch.zeros(2, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert permute.resolve_backend(x) == "torch"  # no interpreter: Triton cannot run CPU tensors
    assert permute.resolve_backend(x, "triton") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert permute.resolve_backend(x) == ("triton" if permute.triton_installed() else "torch")
    with pytest.raises(ValueError, match="valid: auto, torch, triton"):
        permute.resolve_backend(x, "cuda")


@pytest.mark.slow
@pytest.mark.skipif(not permute.triton_installed(), reason="Triton is not installed (the `triton` extra)")
def test_triton_interpreted():
    """The Triton kernels, and the whole grouped dispatch using them, under TRITON_INTERPRET=1 in a fresh
    process (Triton reads the switch when the kernels are defined, so it must be set before import)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", "from tests.dispatch.triton_cases import main; main()"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "triton cases passed" in proc.stdout
