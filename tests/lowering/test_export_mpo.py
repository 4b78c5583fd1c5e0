"""ONNX export of MPO experts (expert_param="mpo"): the lowering contracts the expert matrices in the graph
and feeds them to the layer's op; ONNX Runtime matches PyTorch on both targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import moeify
from moeify.runtime import make_session

from tests.lowering.test_export_literature import D, Residual, assert_parity


def mpo_cfg(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=16, num_experts=4, k=2, expert_param="mpo",
                                      mpo_bond=3), **kw})


@pytest.mark.slow
@pytest.mark.parametrize("target", ["ort", "portable"])
def test_mpo_experts_export_with_parity(tmp_path, target):
    torch.manual_seed(0)
    layers = [moeify.MoELayer(mpo_cfg(activation="silu", gated=True)),  # ort: com.microsoft.MoE
              moeify.MoELayer(mpo_cfg(mpo_cores=5, capacity_factor=1.0)),  # moeify.GroupedFFN
              moeify.MoELayer(mpo_cfg(router="soft", k=1, mpo_grad_mask=0.3))]  # moeify.SoftExperts
    for layer in layers:
        nn.init.normal_(layer.router.weight, std=0.5)
    model = nn.Sequential(*map(Residual, layers)).eval()
    result = moeify.export_onnx(model, torch.randn(2, 5, D), tmp_path / "mpo.onnx", target=target)
    ops = list(result.layers.values())
    assert len(ops) == 3
    if target == "ort":
        assert ops[0] == "com.microsoft.MoE"
    name = make_session(result.path).get_inputs()[0].name
    assert_parity(model, result, [{name: torch.randn(b, s, D)} for b, s in [(1, 1), (3, 17)]])
