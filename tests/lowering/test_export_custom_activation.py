"""Layers whose activation is a module export as standard ONNX ops traced from PyTorch, on both targets,
and match PyTorch in ONNX Runtime."""

from __future__ import annotations

import onnx
import pytest
import torch

import moeify
from tests.activations_zoo import SquaredReLU, learned_prelu
from tests.lowering.test_export import D, E, Chain, _compare, cfg

H = 24


class CustomChain(Chain):
    """Chain's x -> x + layer(norm(x)), with layers built from (config, activation module) pairs."""

    def __init__(self, specs):
        torch.nn.Module.__init__(self)
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(moeify.MoELayer(c, activation=a) for c, a in specs)
        for layer in self.layers:
            if layer.router.learned:
                torch.nn.init.normal_(layer.router.weight, std=0.5)


SPECS = [
    (cfg(activation="custom"), SquaredReLU()),
    (cfg(activation="custom", gated=True, num_shared_experts=1, shared_d_ff=8), learned_prelu()),
    (cfg(activation="custom", gated=True, bias=False), learned_prelu(H)),  # per-channel slopes
    (cfg(activation="custom", router="soft", slots_per_expert=2), SquaredReLU()),
    (cfg(activation="silu", gated=True), None),  # a named activation beside them keeps its fused op
]


@pytest.mark.slow
def test_custom_activations_export_as_traced_standard_ops(tmp_path):
    model = CustomChain(SPECS).eval()
    for target in ("ort", "portable"):
        result = moeify.export_onnx(model, torch.randn(2, 5, D), tmp_path / f"{target}.onnx", target=target)
        _compare(model, result.path, tol=1e-5)
        traced = [f"layers.{i}" for i in range(4)]
        assert [result.layers[n] for n in traced] == ["standard ONNX ops (traced)"] * 4
        for name in traced:
            assert "is a module" in result.reasons[name], result.reasons[name]
        assert result.layers["layers.4"] == ("com.microsoft.MoE" if target == "ort" else
                                             "moeify.GroupedFFN (inlined)")
        graph = onnx.load(result.path).graph
        if target == "portable":
            assert {n.domain for n in graph.node} <= {"", "ai.onnx"}
        # still sparse: the traced top-k layers multiply each expert's own rows (no MatMul takes a whole
        # expert stack [E, ., .]); only the Soft MoE layer's two batched MatMuls (each expert on its own
        # S slots) do
        stacks = {i.name for i in graph.initializer if len(i.dims) == 3 and i.dims[0] == E}
        on_stacks = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and stacks & set(n.input)]
        assert len(on_stacks) == 2, [n.name for n in on_stacks]
