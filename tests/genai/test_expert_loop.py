"""Loop experts (moeify.genai.expert_loop) in ONNX Runtime against a NumPy MoE: exact at fp32, and at
int4/int8 against the same MoE on the dequantised weights (MatMulNBits with accuracy level 0 computes in
float; the builder's level 4 rounds activations to int8, bounded loosely)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from moeify.genai.expert_loop import loop_expert_nodes
from moeify.genai.quantize import dequantize, quantize
from moeify.genai.router_logits import RouterLogits
from moeify.genai.surgery import ExpertLayer, Graph
from tests.genai.test_quantize import swiglu_moe_reference

pytestmark = pytest.mark.ort

E, H, D, T = 4, 32, 64, 9


def run_loop(x, logits, w1, w2, k, precision, accuracy_level=0, **options):
    """ONNX Runtime's output of the loop nodes for x [1, T, D] and router logits [T, E]; options: the
    ExpertLayer's activation, normalize, b1, b2."""
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
    layer = ExpertLayer(0, RouterLogits("matmul", np.zeros((D, E), np.float32)), k, w1, w2, **options)
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


# --- non-gated experts with biases (the own route's GPT-2 / Falcon experts), without renormalisation


def ungated_moe_reference(x, logits, w1, b1, w2, b2, k, activation, normalize):
    """x [T, D], logits [T, E], w1 [E, H, D], b1 [E, H], w2 [E, D, H], b2 [E, D]: com.microsoft.MoE's
    non-gated experts (its "gelu" is the tanh approximation), top-k of softmax(logits), renormalised or
    not."""
    act = {
        "gelu": lambda h: 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3))),
        "relu": lambda h: np.maximum(h, 0),
        "silu": lambda h: h / (1 + np.exp(-h)),
        "identity": lambda h: h,
    }[activation]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[:k]
        weights = probs[t, top] / (probs[t, top].sum() if normalize else 1)
        for e, w in zip(top, weights, strict=True):
            out[t] += w * (w2[e] @ act(w1[e] @ x[t] + b1[e]) + b2[e])
    return out


def ungated_weights(seed):
    rng = np.random.default_rng(seed)
    x, logits, _, w2 = weights(seed)
    w1 = (rng.standard_normal((E, H, D)) / 8).astype(np.float32)  # [E, H, D]
    b1 = (rng.standard_normal((E, H)) / 2).astype(np.float32)
    b2 = (rng.standard_normal((E, D)) / 2).astype(np.float32)
    return x, logits, w1, b1, w2, b2


@pytest.mark.parametrize("activation", ["gelu", "relu", "silu", "identity"])
@pytest.mark.parametrize("k, normalize", [(1, True), (2, True), (2, False), (1, False)])
def test_fp32_ungated_loop_equals_the_reference(activation, k, normalize):
    x, logits, w1, b1, w2, b2 = ungated_weights(20 + k)
    want = ungated_moe_reference(x, logits, w1, b1, w2, b2, k, activation, normalize)
    got = run_loop(x, logits, w1, w2, k, "fp32", activation=activation, normalize=normalize, b1=b1, b2=b2)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("precision,bits", [("int4", 4), ("int8", 8)])
def test_quantised_ungated_loop_equals_the_dequantised_reference(precision, bits):
    x, logits, w1, b1, w2, b2 = ungated_weights(30)
    deq1, deq2 = dequantize(quantize(w1, bits, 32)), dequantize(quantize(w2, bits, 32))
    want = ungated_moe_reference(x, logits, deq1, b1, deq2, b2, 2, "gelu", True)
    got = run_loop(x, logits, w1, w2, 2, precision, activation="gelu", b1=b1, b2=b2)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
    exact = ungated_moe_reference(x, logits, w1, b1, w2, b2, 2, "gelu", True)
    assert np.abs(exact - want).max() > 1e-4 * np.abs(want).max()


def test_unknown_activation_is_refused():
    from moeify.errors import MoeifyError

    x, logits, w1, b1, w2, b2 = ungated_weights(40)
    with pytest.raises(MoeifyError, match="loop experts take the activations .* not 'tanh'"):
        run_loop(x, logits, w1, w2, 1, "fp32", activation="tanh")


def test_auto_takes_the_loop_where_it_was_measured_faster():
    from moeify.errors import MoeifyError
    from moeify.genai.surgery import resolve_experts_op

    assert resolve_experts_op("auto", "int4", 64) == "loop" and resolve_experts_op("auto", "int8") == "loop"
    assert resolve_experts_op("auto", "fp32", 512) == "fused" and resolve_experts_op("auto", "fp32", 2048) == "loop"
    assert resolve_experts_op("auto", "fp16", 4096) == "fused"  # CUDA: not measured
    assert resolve_experts_op("fused", "int4", 4096) == "fused" and resolve_experts_op("loop", "fp32", 8) == "loop"
    with pytest.raises(MoeifyError, match="must be one of auto, fused, loop"):
        resolve_experts_op("qmoe", "int4")
