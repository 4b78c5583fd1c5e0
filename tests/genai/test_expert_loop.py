"""Loop experts (moeify.genai.expert_loop) in ONNX Runtime against a NumPy MoE: exact at fp32, and at
int4/int8 against the same MoE on the dequantised weights (MatMulNBits with accuracy level 0 computes in
float; the builder's level 4 rounds activations to int8, bounded loosely)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from moeify.genai.quantize import dequantize, quantize
from moeify.genai.surgery import ExpertLayer, Graph
from moeify.genai.expert_loop import loop_expert_nodes
from moeify.genai.router_logits import RouterLogits
from tests.genai.test_quantize import swiglu_moe_reference

pytestmark = pytest.mark.ort

E, H, D, T = 4, 32, 64, 9


def run_loop(x, logits, w1, w2, k, precision, accuracy_level=0):
    """ONNX Runtime's output of the loop nodes for x [1, T, D] and router logits [T, E]."""
    import onnxruntime as ort

    graph = helper.make_graph(
        [],
        "loop",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", D]),
            helper.make_tensor_value_info("/model/layers.0/moe/router/probs", TensorProto.FLOAT, ["T", E]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", D])],
    )
    model = helper.make_model(
        graph, ir_version=8, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    )
    layer = ExpertLayer(0, RouterLogits("matmul", np.zeros((D, E), np.float32)), k, w1, w2)
    g = Graph(model)
    model.graph.node.extend(loop_expert_nodes(g, layer, "x", "y", np.float32, precision, accuracy_level))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x[None], "/model/layers.0/moe/router/probs": logits})[0][0]


def weights(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(np.float32)
    logits = rng.standard_normal((T, E)).astype(np.float32)
    logits[:, 3] -= 10  # expert 3 gets no token: an empty block must pass through
    w1 = (rng.standard_normal((E, 2 * H, D)) / 8).astype(np.float32)  # rows [gate; up]
    w2 = (rng.standard_normal((E, D, H)) / 6).astype(np.float32)
    return x, logits, w1, w2


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fp32_loop_equals_the_reference(k):
    x, logits, w1, w2 = weights(k)
    want = swiglu_moe_reference(x, logits, w1, w2, k)
    got = run_loop(x, logits, w1, w2, k, "fp32")
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("precision,bits", [("int4", 4), ("int8", 8)])
def test_quantised_loop_equals_the_dequantised_reference(k, precision, bits):
    x, logits, w1, w2 = weights(10 + k)
    deq1, deq2 = dequantize(quantize(w1, bits, 32)), dequantize(quantize(w2, bits, 32))
    want = swiglu_moe_reference(x, logits, deq1, deq2, k)
    got = run_loop(x, logits, w1, w2, k, precision)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    # the builder's accuracy level 4 (int8 activations) stays within a few percent of it
    fast = run_loop(x, logits, w1, w2, k, precision, accuracy_level=4)
    assert np.abs(fast - want).max() <= 3e-2 * np.abs(want).max()
    # and quantisation moved the output: the reference is not the fp32 one
    exact = swiglu_moe_reference(x, logits, w1, w2, k)
    assert np.abs(exact - want).max() > 1e-4 * np.abs(want).max()


def test_one_token_at_a_time_as_in_decoding():
    x, logits, w1, w2 = weights(7)
    want = swiglu_moe_reference(x, logits, w1, w2, 2)
    rows = [run_loop(x[t : t + 1], logits[t : t + 1], w1, w2, 2, "fp32")[0] for t in range(T)]
    assert np.abs(np.stack(rows) - want).max() <= 1e-5 * np.abs(want).max()
