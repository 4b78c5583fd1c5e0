"""When onnxruntime is missing or cannot run com.microsoft.MoE, the export plan says so (not "does not
match"), and the layer lowers to moeify.GroupedFFN."""

from __future__ import annotations

import sys

import pytest

import moeify
from moeify.lowering.export import plan_for
from moeify.lowering.ops import ort_moe


@pytest.fixture
def fresh_probe():
    """The probe's answers are cached per process; these tests change onnxruntime under it."""
    ort_moe.ort_moe_problem.cache_clear()
    yield
    ort_moe.ort_moe_problem.cache_clear()


def _layer():
    return moeify.MoELayer(moeify.MoEConfig(d_model=8, d_ff=12, num_experts=4, k=2, activation="silu")).eval()


def test_probe_passes_with_the_installed_onnxruntime(fresh_probe):
    plan = plan_for(_layer(), "ort")
    assert plan.lowering.name == "com.microsoft.MoE", plan.reason


def test_missing_onnxruntime_is_reported_as_missing(fresh_probe, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
    plan = plan_for(_layer(), "ort")
    assert plan.lowering.name == "moeify.GroupedFFN"
    assert "onnxruntime is not installed" in plan.reason
    assert "does not match" not in plan.reason


def test_onnxruntime_failing_is_reported_with_its_error(fresh_probe, monkeypatch):
    import onnxruntime

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for MoE here")

    monkeypatch.setattr(onnxruntime, "InferenceSession", broken)
    plan = plan_for(_layer(), "ort")
    assert plan.lowering.name == "moeify.GroupedFFN"
    assert "onnxruntime could not run com.microsoft.MoE: RuntimeError: no kernel for MoE here" in plan.reason
    assert not ort_moe.ort_moe_matches("silu", False)
