"""ONNX parity of the literature's routers and options that test_export.py's generic chains do not pin:
SparseMixer (moeify ops on both targets, never com.microsoft.MoE), the balanced hash table."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moeify
from moeify.runtime import make_session, run

D, E = 8, 4


def cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=16, num_experts=E, k=2), **kw})


def assert_parity(model, result, inputs_list) -> None:
    session = make_session(result.path)
    for inputs in inputs_list:
        with torch.no_grad():
            want = model(*inputs.values()).numpy()
        got = next(iter(run(session, {k: v.numpy() for k, v in inputs.items()}).values()))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["portable", "ort"])
def test_sparsemixer_parity(tmp_path, target):
    torch.manual_seed(0)
    layer = moeify.MoELayer(cfg(router="sparsemixer", activation="silu", gated=True))  # fusable if it were topk
    model = nn.Sequential(nn.LayerNorm(D), layer).eval()
    nn.init.normal_(model[1].router.weight, std=0.5)
    result = moeify.export_onnx(model, torch.randn(2, 5, D), tmp_path / "sm.onnx", target=target)
    assert set(result.layers.values()) <= {"moeify.GroupedFFN", "moeify.GroupedFFN (inlined)"}
    name = make_session(result.path).get_inputs()[0].name
    assert_parity(model, result, [{name: torch.randn(b, s, D)} for b, s in [(1, 1), (3, 17)]])
