"""Smoke tests of benchmarks/moe_layer.py and dispatch_choices.py: --quick runs work end to end (nothing
about speed here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_layer_benchmark_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for column in ("dense", "moeify", "loop", "floor", "moeify/dense", "loop/dense", "loop/moeify",
                   "moeify/floor"):
        assert column in proc.stdout
    assert "fwd+bwd" in proc.stdout and "forward" in proc.stdout


def test_moe_layer_benchmark_without_recycling_runs():
    script = ROOT / "benchmarks" / "moe_layer.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--no-recycle"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gradient recycling" in proc.stdout  # the title says so (rich may wrap it)


def test_dispatch_choices_benchmark_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch_choices.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "col/row" in proc.stdout and "fresh/recycled" in proc.stdout
