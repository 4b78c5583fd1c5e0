"""Smoke tests of benchmarks/moe_layer.py and dispatch_choices.py: --quick runs work end to end (nothing
about speed here)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_moe_layer_benchmark_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for column in ("dense", "moeify", "loop", "experts", "floor", "moeify/dense", "loop/dense", "loop/moeify",
                   "experts/dense", "moeify/experts", "moeify/floor"):
        assert column in proc.stdout
    assert "fwd+bwd" in proc.stdout and "forward" in proc.stdout
    assert "fwd+bwd acc" in proc.stdout  # both training protocols by default


def test_moe_layer_benchmark_one_protocol():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--quick", "--protocol",
                           "accumulate"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "fwd+bwd" in line]
    assert len(rows) == 4 and all("fwd+bwd acc" in row for row in rows)  # 2 shapes x k in (1, 2)


def test_accumulate_protocol_adds_into_the_gradients():
    """The accumulation step leaves the grads of two steps (twice one step's), the set_to_none step one's."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import moe_layer
    import torch

    import moeify

    torch.manual_seed(0)
    layer = moeify.MoELayer(moeify.MoEConfig(d_model=8, d_ff=16, num_experts=4, k=2))
    x, grad = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8)  # [T, D]
    moe_layer._train_step(layer, x, grad)()
    once = layer.w1.grad.clone()
    accumulate = moe_layer._accumulate_step(layer, x, grad)
    accumulate()
    torch.testing.assert_close(layer.w1.grad, 2 * once)
    moe_layer._train_step(layer, x, grad)()
    torch.testing.assert_close(layer.w1.grad, once)


@pytest.mark.slow
def test_moe_layer_benchmark_without_recycling_runs():
    script = ROOT / "benchmarks" / "moe_layer.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--no-recycle"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "gradient recycling" in proc.stdout  # the title says so (rich may wrap it)


@pytest.mark.slow
def test_dispatch_choices_benchmark_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dispatch_choices.py"), "--quick"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "col/row" in proc.stdout and "fresh/recycled" in proc.stdout


def test_experts_column_runs_the_loops_expert_work():
    """The `experts` contender runs exactly the loop's experts on exactly the loop's rows: weighting and
    scattering its outputs reproduces the loop's output."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import moe_layer
    import torch

    import moeify

    torch.manual_seed(0)
    T, k = 24, 2
    cfg = moeify.MoEConfig(d_model=16, d_ff=32, num_experts=4, k=k, router="topk", activation="gelu")
    loop = moe_layer.LoopMoE(moeify.MoELayer(cfg))
    x = torch.randn(T, 16)  # [T, D]
    experts = moe_layer.ExpertsOnly(loop, x)
    assert sum(rows.shape[0] for rows in experts.rows) == T * k
    top_w, groups = loop.route(x)
    out = torch.zeros_like(x)  # [T, D]
    with torch.no_grad():
        for (_, slot, tokens), expert, rows in zip(groups, experts.experts, experts.rows, strict=True):
            out.index_add_(0, tokens, expert(rows) * top_w[tokens, slot, None])
        torch.testing.assert_close(out, loop(x))


@pytest.mark.slow
def test_gpu_table_code_runs_on_cpu():
    """The `--device cuda` table's code (bfloat16, TFLOP/s columns, the loop check) on tiny CPU shapes: it is
    ready for a GPU run. Nothing about speed."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import moe_layer_gpu
    from rich.console import Console

    table = moe_layer_gpu.run_table("cpu", quick=True, repeats=1, activation="silu", gated=True)
    console = Console(width=250, record=True)
    console.print(table)
    text = console.export_text()
    for column in moe_layer_gpu.COLUMNS:
        assert column in text
    assert "gemm [64, 32] @ [32, 128]" in text and text.count("fwd+bwd") == 2


def test_mpo_benchmark_ways_agree_and_time_all_contenders():
    """benchmarks/mpo_experts.py: the on-the-fly MPO contraction computes the MPO layer's function (run_case
    raises otherwise) and every contender is timed in both passes."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import mpo_experts

    result = mpo_experts.run_case(T=16, E=4, k=2, d_model=8, d_ff=12, repeats=1)
    assert set(result) == {"forward", "fwd+bwd"}
    for times in result.values():
        assert set(times) == {"stacked", "materialise", "on the fly"} and all(t > 0 for t in times.values())


@pytest.mark.slow
def test_moe_layer_benchmark_mpo_table_quick_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe_layer.py"), "--quick", "--protocol",
                           "set_to_none", "--mpo"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "MPO experts" in proc.stdout and "on the fly/materialise" in proc.stdout


@pytest.mark.slow
def test_compile_step_benchmark_quick_runs():
    """benchmarks/compile_step.py --quick: inductor compiles the converted model's training step and the
    compiled losses match eager (the script prints the largest difference)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_step.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    assert "compile: first compiled step" in proc.stdout and "compiled/eager" in proc.stdout
    diff = float(proc.stdout.rsplit("max |loss diff| over", 1)[1].split(":")[1])
    assert diff <= 1e-5
