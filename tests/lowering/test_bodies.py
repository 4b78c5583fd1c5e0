"""The standard-op function bodies of moeify.GroupedFFN / moeify.SoftExperts against the reference.

No torch export here: each body is put in a one-node model and run by ONNX Runtime, as a function (the
"ort" target) and inlined (the "portable" target).
"""

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from moeify.activations import ACTIVATIONS
from moeify.dispatch.reference import reference_grouped_ffn, reference_soft_experts
from moeify.lowering.export import register_schemas
from moeify.lowering.ops.grouped_ffn import body as grouped_ffn_function
from moeify.lowering.ops.portable import ONNX_ACTIVATIONS
from moeify.lowering.ops.soft_experts import body as soft_experts_function

E, D, H, T = 4, 6, 8, 7


def _one_node_model(op_type, function, names, values, activation, gated, dtype):
    register_schemas()
    elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    node_inputs = [n if v is not None else "" for n, v in zip(names, values, strict=True)]
    node = onnx.helper.make_node(op_type, node_inputs, ["y"], domain="moeify", activation=activation,
                                 gated=int(gated))
    node.overload = function.overload
    graph_inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(v.dtype),
                                                       list(v.shape))
                    for n, v in zip(names, values, strict=True) if v is not None]
    graph = onnx.helper.make_graph([node], "g", graph_inputs,
                                   [onnx.helper.make_tensor_value_info("y", elem, [T, D])])
    return onnx.helper.make_model(graph, ir_version=10, functions=[ir.serde.serialize_function(function)],
                                  opset_imports=[onnx.helper.make_opsetid("", 20),
                                                 onnx.helper.make_opsetid("moeify", 1)])


def _run(model, names, values):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: v for n, v in zip(names, values, strict=True) if v is not None})[0]


def _weights(gated, has_b1, has_b2, g):
    H1 = 2 * H if gated else H
    w1, w2 = torch.randn(E, H1, D, generator=g) * 0.5, torch.randn(E, D, H, generator=g) * 0.5
    b1 = torch.randn(E, H1, generator=g) if has_b1 else None
    b2 = torch.randn(E, D, generator=g) if has_b2 else None
    return w1, b1, w2, b2


def _check_both_forms(op_type, function, names, tensors, want, activation, gated, dtype, tol):
    values = [None if t is None else t.numpy().astype(dtype if t.is_floating_point() else np.int64)
              for t in tensors]
    model = _one_node_model(op_type, function, names, values, activation, gated, dtype)
    onnx.checker.check_model(model, full_check=True)
    inlined = onnx.inliner.inline_local_functions(model)
    assert {n.domain for n in inlined.graph.node} <= {""} and not inlined.functions
    for m in (model, inlined):
        got = _run(m, names, values).astype(np.float64)
        err = np.abs(got - want).max() / max(1e-6, np.abs(want).max())
        assert err <= tol, f"{op_type} {function.overload}: relative error {err:.2e}"


def test_every_moeify_activation_has_an_onnx_lowering():
    assert set(ACTIVATIONS) <= set(ONNX_ACTIVATIONS)


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_grouped_ffn_body_matches_reference(activation, gated):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    # 3 choices per token; expert 3 gets nothing, some assignments are dropped (expert == E)
    expert_idx = torch.randint(0, 3, (T * 3,), generator=g)
    expert_idx[::5] = E
    token_idx = torch.arange(T).repeat_interleave(3)
    weight = torch.rand(T * 3, generator=g)
    for has_b1, has_b2 in [(True, True), (False, False), (True, False)]:
        w1, b1, w2, b2 = _weights(gated, has_b1, has_b2, g)
        want = reference_grouped_ffn(x.double(), token_idx, expert_idx, weight.double(), w1.double(),
                                     None if b1 is None else b1.double(), w2.double(),
                                     None if b2 is None else b2.double(), activation, gated).numpy()
        fn = grouped_ffn_function(activation, gated, has_b1, has_b2, opset=20)
        names = ["x", "token_idx", "expert_idx", "weight", "w1", "b1", "w2", "b2"]
        _check_both_forms("GroupedFFN", fn, names, [x, token_idx, expert_idx, weight, w1, b1, w2, b2], want,
                          activation, gated, np.float32, 1e-5)


def test_grouped_ffn_body_all_dropped_and_float16():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(T, D, generator=g)
    token_idx = torch.arange(T)
    w1, b1, w2, b2 = _weights(True, True, True, g)
    names = ["x", "token_idx", "expert_idx", "weight", "w1", "b1", "w2", "b2"]
    fn = grouped_ffn_function("silu", True, True, True, opset=20)
    dropped = torch.full((T,), E)  # every assignment over capacity: the output is zero
    _check_both_forms("GroupedFFN", fn, names, [x, token_idx, dropped, torch.ones(T), w1, b1, w2, b2],
                      np.zeros((T, D)), "silu", True, np.float32, 0.0)
    expert_idx = torch.randint(0, E, (T,), generator=g)
    want = reference_grouped_ffn(x.half().double(), token_idx, expert_idx, torch.ones(T, dtype=torch.double),
                                 w1.half().double(), b1.half().double(), w2.half().double(),
                                 b2.half().double(), "silu", True).numpy()
    _check_both_forms("GroupedFFN", fn, names, [x, token_idx, expert_idx, torch.ones(T), w1, b1, w2, b2],
                      want, "silu", True, np.float16, 5e-3)


@pytest.mark.parametrize("activation,gated", [("gelu", False), ("silu", True), ("relu", False)])
def test_soft_experts_body_matches_reference(activation, gated):
    g = torch.Generator().manual_seed(3)
    S = 2
    x = torch.randn(T, D, generator=g)
    logits = torch.randn(T, E * S, generator=g)
    dispatch, combine = torch.softmax(logits, dim=0), torch.softmax(logits, dim=1)
    w1, b1, w2, b2 = _weights(gated, True, True, g)
    want = reference_soft_experts(x.double(), dispatch.double(), combine.double(), w1.double(), b1.double(),
                                  w2.double(), b2.double(), activation, gated).numpy()
    fn = soft_experts_function(activation, gated, True, True, opset=20)
    names = ["x", "dispatch", "combine", "w1", "b1", "w2", "b2"]
    _check_both_forms("SoftExperts", fn, names, [x, dispatch, combine, w1, b1, w2, b2], want, activation,
                      gated, np.float32, 1e-5)
