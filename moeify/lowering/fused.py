"""When a layer may use ONNX Runtime's fused `com.microsoft.MoE` op, and with which settings.

What the op computes (checked against a NumPy/PyTorch reference, onnxruntime 1.31 CPU):
  probs = softmax(router_probs) over E; top-k of probs; with normalize_routing_weights=1 the k weights are
  renormalised to sum to 1; out = sum_k w_k * (fc2_e(act(fc1_e x + b1_e)) + b2_e).
  fc1 [E, H1, D], fc2 [E, D, H]. It has no capacity factor and no other routing scheme.

Activations, as measured rather than as named:
  - "gelu" in the op is the *tanh approximation*: it matches moeify's "gelu_tanh" to 1e-7 and differs from
    exact (erf) "gelu" by ~1e-4 relative, so exact gelu layers do not use the op.
  - "swiglu" is G * sigmoid(alpha * G) * (L + beta) with G, L optionally clamped at `swiglu_limit`
    (GPT-OSS form). With alpha=1, beta=0 and no limit it is SwiGLU, silu(gate) * up, and we set those
    attributes explicitly. The CPU kernel only takes the interleaved fused layout (swiglu_fusion=1:
    row 2i is gate_i, row 2i+1 is up_i), so the lowering interleaves moeify's [gate; up] rows.
    Other onnxruntime versions may differ (e.g. use GPT-OSS constants alpha 1.702, beta 1, limit 7 that
    we did not set; not verified here); to stay correct everywhere, each (activation, gated, normalise)
    combination is *probed* once on the installed onnxruntime against moeify's own reference, and one
    that does not match lowers to moeify ops instead.

Without renormalisation (normalize_routing_weights=0) the onnxruntime 1.31 CPU kernel returns wrong
numbers when its input is a Reshape of an intermediate value, which is exactly how an exported layer feeds
it ([B, S, D] -> [T, D] after a norm); the probe builds that surrounding, so unnormalised layers lower to
moeify ops on such builds.

Scoring: softmax scores map directly. Sigmoid scores with renormalisation map too: feeding
  router_probs = log(sigmoid(logits)) makes the op's softmax-then-renormalise give
  sigmoid_i / sum_topk sigmoid_j, and top-k of log-sigmoid is top-k of sigmoid (monotone). Sigmoid without
  renormalisation has no such form and lowers to moeify ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from moeify.routers.base import ORT_MOE

# moeify (activation, gated) -> ORT activation_type
ORT_ACTIVATIONS: dict[tuple[str, bool], str] = {
    ("relu", False): "relu",
    ("gelu_tanh", False): "gelu",
    ("silu", False): "silu",
    ("identity", False): "identity",
    ("silu", True): "swiglu",
}


@dataclass(frozen=True)
class FusedPlan:
    """The decision for one layer: `op` is the ONNX op its experts lower to, `reason` why."""

    fused: bool
    op: str
    reason: str


def fused_plan(layer) -> FusedPlan:
    """Whether `layer` (an MoELayer, eval mode) can lower to com.microsoft.MoE, with the reason."""
    cfg = layer.config

    def no(reason: str) -> FusedPlan:
        return FusedPlan(False, "moeify.GroupedFFN", reason)

    if ORT_MOE not in layer.router.caps.lowerings:
        return no(f"router {layer.router.name!r} with this config is not com.microsoft.MoE's top-k "
                  f"(it lowers to {', '.join(layer.router.caps.lowerings)})")
    if layer.router.training and cfg.jitter_noise > 0:
        return no("router jitter noise is on (training mode)")
    if cfg.capacity_factor is not None:
        return no(f"capacity_factor={cfg.capacity_factor} (the fused op is dropless)")
    if cfg.score_fn == "sigmoid" and not cfg.normalize:
        return no("sigmoid scores without renormalisation")
    act = ORT_ACTIVATIONS.get((cfg.activation, cfg.gated))
    label = cfg.activation + (" (gated)" if cfg.gated else "")
    if act is None:
        return no(f"activation {label} has no exact equivalent in com.microsoft.MoE")
    if not ort_moe_matches(cfg.activation, cfg.gated, cfg.normalize):
        extra = "" if cfg.normalize else " without renormalisation"
        return no(f"the installed onnxruntime's MoE {act!r}{extra} does not match moeify's {label}")
    return FusedPlan(True, "com.microsoft.MoE", f"top-{cfg.k} {cfg.score_fn}, {label}")


@functools.cache
def ort_moe_matches(activation: str, gated: bool, normalize: bool = True) -> bool:
    """Run a tiny com.microsoft.MoE on the installed onnxruntime (CPU) and compare with moeify's reference."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # real tensors even if asked from inside a torch.export trace
        return _probe(activation, gated, normalize)


def _probe(activation: str, gated: bool, normalize: bool) -> bool:
    """One MoE node in the surroundings an export gives it, checked against `topk_moe`'s eager result.

    The surroundings matter: onnxruntime 1.31's CPU kernel with normalize_routing_weights=0 returns wrong
    numbers when its input is a Reshape of an intermediate value (as the exported layer's [B, S, D] ->
    [T, D] view is), though it is right on a graph input. So the probe feeds the op the way an export
    does: x [1, T, D] -> Mul(1) -> Reshape [T, D] -> (MatMul router -> logits) -> MoE.
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return False
    from moeify.lowering.ops import topk_moe

    E, H, D, T, K = 4, 8, 6, 9, 2
    H1 = 2 * H if gated else H
    g = torch.Generator().manual_seed(0)
    x, router = torch.randn(T, D, generator=g), torch.randn(D, E, generator=g)
    w1, b1 = torch.randn(E, H1, D, generator=g) * 0.5, torch.randn(E, H1, generator=g) * 0.5
    w2, b2 = torch.randn(E, D, H, generator=g) * 0.5, torch.randn(E, D, generator=g) * 0.5
    want = topk_moe(x, x @ router, w1, b1, w2, b2, K, normalize, "softmax", activation, gated).numpy()
    fc1, fc1_b = w1, b1
    attrs = {"k": K, "activation_type": ORT_ACTIVATIONS[(activation, gated)],
             "normalize_routing_weights": int(normalize)}
    if gated:
        fc1 = w1.reshape(E, 2, H, D).transpose(1, 2).reshape(E, H1, D)  # interleave gate/up rows
        fc1_b = b1.reshape(E, 2, H).transpose(1, 2).reshape(E, H1)
        attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    weights = {"router": router, "w1": fc1, "b1": fc1_b, "w2": w2, "b2": b2}
    initializers = [numpy_helper.from_array(v.numpy(), n) for n, v in weights.items()]
    initializers += [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
                     numpy_helper.from_array(np.array([-1, D], dtype=np.int64), "flat"),
                     numpy_helper.from_array(np.array([1, T, D], dtype=np.int64), "unflat")]
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["x1"]),
        helper.make_node("Reshape", ["x1", "flat"], ["tokens"]),
        helper.make_node("MatMul", ["tokens", "router"], ["logits"]),
        helper.make_node("MoE", ["tokens", "logits", "w1", "b1", "w2", "b2"], ["moe"], domain="com.microsoft",
                         **attrs),
        helper.make_node("Reshape", ["moe", "unflat"], ["moe3"]),
        helper.make_node("Add", ["x", "moe3"], ["y"]),  # residual, as in a transformer block
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, T, D]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "probe", io[:1], io[1:], initializers)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()[None]})[0][0] - x.numpy()
    except Exception:  # an onnxruntime without the op, or one that rejects these attributes
        return False
    return bool(np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())))
