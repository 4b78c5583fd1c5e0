"""Smoke test of benchmarks/ort_expert_gemm.py: --quick runs end to end and prints every form (nothing about
speed)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.ort
def test_ort_expert_gemm_quick_runs():
    script = ROOT / "benchmarks" / "ort_expert_gemm.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("dense", "loop W^T x^T", "loop Gemm", "loop 1 thread", "loop parallel", "batched",
                "1 row each", "x dense", "GFLOP/s", "weights GB/s"):
        assert row in proc.stdout
    dense_row = next(line for line in proc.stdout.splitlines() if "│ dense" in line)
    assert "1.00" in dense_row  # the ratios are to the dense form's own time
