"""Smoke test of benchmarks/convert.py: --quick writes a synthetic checkpoint, converts it (moeify and
mixtral formats streamed, and in memory), copies and loads the output, and prints the table (nothing
about speed here)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_convert_benchmark_quick_runs(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert.py"), "--quick", "--dir",
                           str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    for row in ("runtime (imports)", "copy output bytes", "convert (moeify format)", "convert --format mixtral",
                "in memory (load+convert+save)", "moeify.load"):
        assert row in proc.stdout
    assert list(tmp_path.iterdir()) == []  # the checkpoint and outputs are removed
