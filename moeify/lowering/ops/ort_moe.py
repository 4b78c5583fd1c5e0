"""com.microsoft.MoE: ONNX Runtime's fused MoE kernel, for dropless softmax/sigmoid top-k token choice and
hash routing (log one-hot logits).

What the op computes (checked against a NumPy/PyTorch reference, onnxruntime 1.31 CPU):
  probs = softmax(router_probs) over E; top-k of probs; with normalize_routing_weights=1 the k weights are
  renormalised to sum to 1; out = sum_k w_k * (fc2_e(act(fc1_e x + b1_e)) + b2_e).
  fc1 [E, H1, D], fc2 [E, D, H]. It has no capacity factor and no other routing scheme (the router says
  whether it can use the op: `RouterCapabilities.lowerings`).

Activations, as measured rather than as named:
  - "gelu" in the op is the *tanh approximation*: it matches moeify's "gelu_tanh" to 1e-7 and differs from
    exact (erf) "gelu" by ~1e-4 relative, so exact gelu layers do not use the op.
  - "swiglu" is G * sigmoid(alpha * G) * (L + beta) with G, L optionally clamped at `swiglu_limit`
    (GPT-OSS form). With alpha=1, beta=0 and no limit it is SwiGLU, silu(gate) * up, and we set those
    attributes explicitly. The CPU kernel only takes the interleaved fused layout (swiglu_fusion=1:
    row 2i is gate_i, row 2i+1 is up_i), so the lowering interleaves moeify's [gate; up] rows.
    Other onnxruntime versions may differ; to stay correct everywhere, each (activation, gated, normalise)
    combination is *probed* once on the installed onnxruntime against moeify's own reference, and one
    that does not match (or that onnxruntime cannot run, or no onnxruntime) lowers to moeify ops instead.

Without renormalisation (normalize_routing_weights=0) the onnxruntime 1.31 CPU kernel returns wrong
numbers when its input is a Reshape of an intermediate value, which is exactly how an exported layer feeds
it ([B, S, D] -> [T, D] after a norm); the probe builds that surrounding, so unnormalised layers lower to
moeify ops on such builds.

Scoring: softmax scores map directly. Sigmoid scores with renormalisation map too: feeding
  router_probs = log(sigmoid(logits)) makes the op's softmax-then-renormalise give
  sigmoid_i / sum_topk sigmoid_j, and top-k of log-sigmoid is top-k of sigmoid (monotone).

Fixed rules (hash routing; the random router at inference, hash or mean rule): the router lists ORT_MOE
when every token gets exactly k = `RouterCapabilities.active_experts` distinct experts whose weights sum
to 1. The op is fed router_probs = log(weights) [T, E], NEVER_CHOSEN where a token does not go, with
normalize_routing_weights=1: softmax gives back the weights on the chosen experts (exp(-1e4) is 0), their
top k are the chosen ones and renormalising keeps them. For hash routing the weights are one-hot (1/k each)
on the experts the router gathered from the token ids (`table[input_ids]` or the permutation hash), so this
is log(one_hot(table[input_ids])), computed in the graph from the model's input_ids (convert wires them to
the layers), exact for every id. The random router's "mean" rule (every expert, weight 1/E) is the op with
k=E and equal router_probs (log(1/E) each): softmax gives 1/E, the top E are all of them. The same log
one-hot logits feed MoE/QMoE in the GenAI route (`moeify.genai.router_logits`), there as a [V, E] table.
Measured (onnxruntime 1.31 CPU): -inf instead of NEVER_CHOSEN also gives exact outputs; NEVER_CHOSEN is
kept because it is finite in fp16 too, and -inf was not measured on other providers (CUDA).

Torch side: the export-only op `moeify::topk_moe` (router logits -> top-k -> experts as ONE op), so the
translation sees the logits; its eager body is the reference, its fake kernel gives the output shape.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from onnx.defs import OpSchema

from moeify.dispatch.reference import reference_grouped_ffn
from moeify.lowering.ops.base import Lowering
from moeify.lowering.ops.portable import optional_attr, param
from moeify.routers.base import ORT_MOE
from moeify.routers.topk import topk_weights

Tensor = torch.Tensor
MSFT_DOMAIN = "com.microsoft"

# moeify (activation, gated) -> ORT activation_type
ORT_ACTIVATIONS: dict[tuple[str, bool], str] = {
    ("relu", False): "relu",
    ("gelu_tanh", False): "gelu",
    ("silu", False): "silu",
    ("identity", False): "identity",
    ("silu", True): "swiglu",
}


def swiglu_row_order(H: int) -> list[int]:
    """Rows of moeify's [gate; up] first projection (2H rows) in ORT's interleaved order: gate_0, up_0, ..."""
    return [r for i in range(H) for r in (i, H + i)]


def ort_attributes(k: int, normalize: bool, activation: str, gated: bool) -> dict:
    attrs = {"k": k, "activation_type": ORT_ACTIVATIONS[(activation, gated)],
             "normalize_routing_weights": int(normalize)}
    if gated:
        attrs.update(swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0)
    return attrs


# --- torch side

@torch.library.custom_op("moeify::topk_moe", mutates_args=())
def topk_moe(x: Tensor, logits: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
             k: int, normalize: bool, score_fn: str, activation: str, gated: bool) -> Tensor:
    """x [T, D], logits [T, E] -> [T, D]: dropless top-k token choice over the experts."""
    with torch.no_grad():
        _, top_w, top_idx = topk_weights(logits, k, normalize, score_fn)  # [T, K]
        token_idx = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)  # [T*K]
        return reference_grouped_ffn(x, token_idx, top_idx.reshape(-1), top_w.reshape(-1).to(x.dtype),
                                     w1, b1, w2, b2, activation, gated)


@topk_moe.register_fake
def _(x, logits, w1, b1, w2, b2, k, normalize, score_fn, activation, gated):
    return torch.empty_like(x)


NEVER_CHOSEN = -1e4  # router_probs of an expert a fixed rule does not pick: exp(-1e4) is 0 in fp32 and fp16


def log_weights(weights: Tensor) -> Tensor:
    """weights [T, E] (k nonzero per row, summing to 1) -> router_probs [T, E] from which the op's softmax,
    top-k and renormalisation give back `weights`: log(w) where w > 0, NEVER_CHOSEN elsewhere."""
    chosen = weights > 0  # [T, E]
    return torch.where(chosen, weights.clamp(min=1e-30).log(), torch.full_like(weights, NEVER_CHOSEN))


def experts(layer, x: Tensor, routing) -> Tensor:
    """x [T, D], the router's SparseRouting -> [T, D].

    A learned router: the op routes again from the router's logits (the router's own top-k then feeds
    nothing and the exporter drops it). A fixed rule: the op gets the log of the routing's weights and
    renormalises (see the module docstring)."""
    cfg, caps = layer.config, layer.router.caps
    if caps.learned:
        logits, normalize, score_fn, k = routing.logits, cfg.normalize, cfg.score_fn, cfg.k
    else:
        weights = routing.dense_weights(x.shape[0], cfg.num_experts)  # [T, E]
        logits, normalize, score_fn = log_weights(weights), True, "softmax"
        k = int(caps.active_experts)  # experts per token: config.k, or E for a rule using every expert
    w1, w2 = layer.expert_weights()  # [E, H1, D], [E, D, H]
    return topk_moe(x, logits, w1, layer.b1, w2, layer.b2, k, normalize,
                    score_fn, cfg.activation, cfg.gated)  # [T, D]


# --- eligibility

def eligible(layer, target: str) -> str | None:
    """None when `layer` (an MoELayer, eval mode) can lower to com.microsoft.MoE for `target`, else why."""
    cfg = layer.config
    learned = layer.router.caps.learned
    if target != "ort":
        return "portable target: standard ops only"
    if layer.router.training and not learned:
        return "the router is in training mode (a fixed rule lowers its inference rule: call model.eval())"
    if layer.router.training and cfg.jitter_noise > 0:
        return "router jitter noise is on (training mode)"
    label = cfg.activation + (" (gated)" if cfg.gated else "")
    if layer.activation is not None:
        return f"activation {type(layer.activation).__name__} is a module; com.microsoft.MoE takes names"
    if (cfg.activation, cfg.gated) not in ORT_ACTIVATIONS:
        return f"activation {label} has no exact equivalent in com.microsoft.MoE"
    return ort_moe_problem(cfg.activation, cfg.gated, cfg.normalize or not learned)


def ort_moe_matches(activation: str, gated: bool, normalize: bool = True) -> bool:
    """True when the installed onnxruntime's com.microsoft.MoE computes this variant as moeify does."""
    return ort_moe_problem(activation, gated, normalize) is None


@functools.cache
def ort_moe_problem(activation: str, gated: bool, normalize: bool = True) -> str | None:
    """Run a tiny com.microsoft.MoE on the installed onnxruntime (CPU) and compare with moeify's reference:
    None when it matches, else what went wrong (no onnxruntime, it could not run the op, or a mismatch)."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (it decides whether its MoE op matches)"
    with unset_fake_temporarily():  # real tensors even if asked from inside a torch.export trace
        model, x, want = _probe_model(activation, gated, normalize)
        try:
            options = ort.SessionOptions()
            options.log_severity_level = 4
            session = ort.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
            got = session.run(None, {"x": x[None]})[0][0] - x
        except Exception as e:  # an onnxruntime without the op, or one that rejects these attributes
            first = (str(e).strip().splitlines() or [""])[0][:200]
            return f"onnxruntime could not run com.microsoft.MoE: {type(e).__name__}: {first}"
    if np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max())):
        return None
    label = activation + (" (gated)" if gated else "")
    extra = "" if normalize else " without renormalisation"
    act = ORT_ACTIVATIONS[(activation, gated)]
    return f"the installed onnxruntime's MoE {act!r}{extra} does not match moeify's {label}"


def _probe_model(activation: str, gated: bool, normalize: bool):
    """(model, x [T, D], want [T, D]): one MoE node in the surroundings an export gives it, and what
    `topk_moe` computes.

    The surroundings matter: onnxruntime 1.31's CPU kernel with normalize_routing_weights=0 returns wrong
    numbers when its input is a Reshape of an intermediate value (as the exported layer's [B, S, D] ->
    [T, D] view is), though it is right on a graph input. So the probe feeds the op the way an export
    does: x [1, T, D] -> Mul(1) -> Reshape [T, D] -> (MatMul router -> logits) -> MoE.
    """
    from onnx import TensorProto, helper, numpy_helper

    E, H, D, T, K = 4, 8, 6, 9, 2
    H1 = 2 * H if gated else H
    g = torch.Generator().manual_seed(0)
    x, router = torch.randn(T, D, generator=g), torch.randn(D, E, generator=g)
    w1, b1 = torch.randn(E, H1, D, generator=g) * 0.5, torch.randn(E, H1, generator=g) * 0.5
    w2, b2 = torch.randn(E, D, H, generator=g) * 0.5, torch.randn(E, D, generator=g) * 0.5
    want = topk_moe(x, x @ router, w1, b1, w2, b2, K, normalize, "softmax", activation, gated).numpy()
    if gated:
        w1, b1 = w1[:, swiglu_row_order(H)], b1[:, swiglu_row_order(H)]
    weights = {"router": router, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    initializers = [numpy_helper.from_array(v.numpy(), n) for n, v in weights.items()]
    initializers += [numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
                     numpy_helper.from_array(np.array([-1, D], dtype=np.int64), "flat"),
                     numpy_helper.from_array(np.array([1, T, D], dtype=np.int64), "unflat")]
    nodes = [
        helper.make_node("Mul", ["x", "one"], ["x1"]),
        helper.make_node("Reshape", ["x1", "flat"], ["tokens"]),
        helper.make_node("MatMul", ["tokens", "router"], ["logits"]),
        helper.make_node("MoE", ["tokens", "logits", "w1", "b1", "w2", "b2"], ["moe"], domain=MSFT_DOMAIN,
                         **ort_attributes(K, normalize, activation, gated)),
        helper.make_node("Reshape", ["moe", "unflat"], ["moe3"]),
        helper.make_node("Add", ["x", "moe3"], ["y"]),  # residual, as in a transformer block
    ]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, T, D]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "probe", io[:1], io[1:], initializers)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid(MSFT_DOMAIN, 1)])
    return model, x.numpy(), want


# --- ONNX side

def translate(x, logits, w1, b1, w2, b2, k: int, normalize: bool, score_fn: str, activation: str,
              gated: bool):
    import onnxscript
    from onnxscript import opset18 as op

    if score_fn == "sigmoid":
        # log(sigmoid(l)) = -softplus(-l): the op's softmax + renormalisation then gives sigmoid weights
        # renormalised over the top k (see the module docstring).
        logits = op.Neg(op.Softplus(op.Neg(logits)))
    probs = op.CastLike(logits, x)  # [T, E] the op wants the activation dtype
    if gated:  # interleave [gate; up] rows; on initializers ONNX Runtime folds this at session start
        order = swiglu_row_order(int(w1.shape[1]) // 2)
        w1 = op.Gather(w1, order, axis=1)  # [E, H1, D]
        if b1 is not None:
            b1 = op.Gather(b1, order, axis=1)  # [E, H1]
    msft = onnxscript.values.Opset(MSFT_DOMAIN, 1)
    return msft.MoE(x, probs, w1, b1, w2, b2, **ort_attributes(k, normalize, activation, gated))


def schema() -> OpSchema:
    """ONNX Runtime's com.microsoft.MoE (version 1), as far as moeify uses it (registered only when onnx
    does not know the op yet)."""
    return OpSchema(
        "MoE", MSFT_DOMAIN, 1,
        "ONNX Runtime mixture of experts (contrib op); routes internally with softmax top-k.",
        inputs=[
            param("input", "T", "[T, D] or [B, S, D]"),
            param("router_probs", "T", "[T, E] router logits"),
            param("fc1_experts_weights", "T", "[E, fusion * H, D]"),
            param("fc1_experts_bias", "T", "[E, fusion * H]", optional=True),
            param("fc2_experts_weights", "T", "[E, D, H]"),
            param("fc2_experts_bias", "T", "[E, D]", optional=True),
            param("fc3_experts_weights", "T", "[E, H, D]", optional=True),
            param("fc3_experts_bias", "T", "[E, H]", optional=True),
        ],
        outputs=[param("output", "T", "same shape as input")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[
            optional_attr("activation_type", "relu", "relu, gelu (tanh), silu, swiglu, identity"),
            optional_attr("k", 1, "experts per token"),
            optional_attr("normalize_routing_weights", 0, "renormalise the top-k weights"),
            optional_attr("use_sparse_mixer", 0, "sparse mixer routing (k=2 only)"),
            optional_attr("swiglu_fusion", 0, "0 separate fc3, 1 interleaved, 2 concatenated"),
            OpSchema.Attribute("swiglu_limit", OpSchema.AttrType.FLOAT, "swiglu clamp (none: no clamp)",
                               required=False),
            optional_attr("activation_alpha", 1.0, "swiglu alpha"),
            optional_attr("activation_beta", 0.0, "swiglu beta"),
        ],
    )


LOWERING = Lowering(
    name=ORT_MOE,
    eligible=eligible,
    experts=experts,
    translations=lambda: {torch.ops.moeify.topk_moe.default: translate},
    schema=schema,
)
