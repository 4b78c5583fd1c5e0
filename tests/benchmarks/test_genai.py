"""Smoke tests of benchmarks/genai.py and genai_own_route.py: --quick runs end to end and prints every row
(nothing about speed)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_quick(script: str) -> str:
    """stdout of `python benchmarks/SCRIPT --quick`, which must exit 0."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.ort
def test_genai_benchmark_quick_runs():
    stdout = run_quick("genai.py")
    for row in ("dense", "E=8 k=1 fused", "E=8 k=1 loop", "E=8 k=2 loop", "fp32", "int4", "prefill ms", "decode tok/s", "greedy = fp32"):
        assert row in stdout


@pytest.mark.slow
@pytest.mark.ort
def test_genai_own_route_benchmark_quick_runs():
    stdout = run_quick("genai_own_route.py")
    for row in ("transformers dense", "transformers MoE", "GenAI MoE fp32", "GenAI MoE int4", "prefill ms",
                "decode tok/s", "greedy = transformers MoE"):
        assert row in stdout
    rows = [line for line in stdout.splitlines() if "transformers MoE" in line and "%" in line]
    assert rows and "100%" in rows[0]  # the reference row agrees with itself: the column is computed per row
