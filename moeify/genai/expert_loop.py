"""Experts as one small dense MLP per expert over the tokens routed to it ("loop" experts), in standard ONNX
ops plus `com.microsoft.MatMulNBits` at int4/int8.

Shape legend: N tokens (B*S), D model width, H expert width, E experts, K experts per token, M tokens routed
to one expert.

Why: ONNX Runtime 1.31's CPU `QMoE` kernel decodes at 0.4-0.5x the builder's int4 dense model and its
`MoE` prefills at ~1.6x dense (each expert gets one thread). Here every expert is the builder's own dense
MLP (MatMulNBits with its accuracy level, or MatMul at fp32) applied to a gathered [M, D] block, so a
decoded token costs one dense MLP plus a few tiny index ops per expert, and a prompt costs the dense MLP's
multi-threaded GEMMs split over the experts. Measured in benchmarks/genai.py.

Per layer, from probs [N, E] (the router logits the MoE op would take):

    x2 [N, D]        = Reshape(x, [-1, D])
    top [N, K], idx  = TopK(probs, K)             w [N, K] = Softmax(top)   (the op's renormalised weights)
    (without renormalisation: top [N, K], idx = TopK(Softmax(probs), K) and w = top)
    for each expert e:
        tok [M]      = NonZero(idx == e)[0]       the tokens that chose e (each chooses e at most once)
        h [M, 2H]    = x2[tok] @ fc1_e + b1_e     rows [gate; up] (MatMulNBits or MatMul; bias optional)
        a [M, H]     = silu(h[:, :H]) * h[:, H:]  ("swiglu"; non-gated: a = act(h), h [M, H])
        y [M, D]     = (a @ fc2_e + b2_e) * w[tok, slot]       (no weight when K == 1 and renormalised)
        acc [N, D]  += scatter(tok, y)            ScatterND(reduction="add")
    out [B, S, D]    = Reshape(acc, Shape(x))

Activations carry com.microsoft.MoE's names (`activation_type`), so a MoE node's experts map one to one:
"swiglu" (gated, w1 rows [gate; up]), "gelu" (the op's: the tanh approximation), "relu", "silu", "identity".
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from moeify.errors import MoeifyError
from moeify.genai.quantize import BITS, block_size_for, quantize
from moeify.lowering.ops.ort_moe import MSFT_DOMAIN as MS

ACTIVATIONS = ("swiglu", "gelu", "relu", "silu", "identity")
GELU_TANH_C = float(np.sqrt(2.0 / np.pi))


def loop_expert_nodes(
    g, layer, x: str, out: str, dtype, precision: str, accuracy_level: int, *, probs: str | None = None
) -> list:
    """The nodes computing `out` from `x` and the router logits `probs` [N, E] (default
    `/model/layers.i/moe/router/probs`, the builder route's) for one layer (a surgery.ExpertLayer: its
    activation, renormalisation and optional biases are honoured); weights are added to `g` (a
    surgery.Graph)."""
    p = f"/model/layers.{layer.index}/moe"
    w = f"model.layers.{layer.index}.moe.experts"
    probs = probs or f"{p}/router/probs"
    activation = layer.activation
    if activation not in ACTIVATIONS:
        raise MoeifyError(f"loop experts take the activations {', '.join(ACTIVATIONS)}, not {activation!r}")
    E, H1, D = layer.w1.shape
    H, K = layer.w2.shape[-1], layer.k
    weighted = K > 1 or not layer.normalize  # a renormalised top-1 weight is 1
    const = _Constants(g, dtype)
    scores = probs if layer.normalize else f"{p}/scores"  # [N, E] what TopK ranks
    nodes = [
        helper.make_node("Reshape", [x, const.i64("rows", [-1, D])], [f"{p}/x2"], name=f"{p}/Reshape"),
        helper.make_node("TopK", [scores, const.i64("k", [K])], [f"{p}/top", f"{p}/idx"], name=f"{p}/TopK"),
        helper.make_node("Shape", [f"{p}/x2"], [f"{p}/x2_shape"], name=f"{p}/Shape"),
        helper.make_node(
            "ConstantOfShape",
            [f"{p}/x2_shape"],
            [f"{p}/acc0"],
            name=f"{p}/Zeros",
            value=numpy_helper.from_array(np.zeros(1, dtype=dtype)),
        ),
    ]
    if not layer.normalize:  # the op's weights are the softmax over all E experts, not renormalised
        nodes.insert(0, helper.make_node("Softmax", [probs], [scores], name=f"{p}/Scores", axis=-1))
    if K > 1 and layer.normalize:
        nodes.append(helper.make_node("Softmax", [f"{p}/top"], [f"{p}/w"], name=f"{p}/Softmax", axis=-1))
    weights = f"{p}/w" if layer.normalize else f"{p}/top"  # [N, K] each chosen expert's weight
    fc1, fc2 = _expert_weights(g, layer, w, dtype, precision)
    b1, b2 = (
        [None] * E if b is None
        else [g.add_initializer(f"{w}.{e}.{tag}", b[e].astype(dtype)) for e in range(E)]  # [H1] / [D]
        for tag, b in (("b1", layer.b1), ("b2", layer.b2))
    )
    acc = f"{p}/acc0"
    for e in range(E):
        q = f"{p}/e{e}"
        nodes += [
            helper.make_node("Equal", [f"{p}/idx", const.i64(f"e{e}", [e])], [f"{q}/hit"], name=f"{q}/Equal"),
            helper.make_node("NonZero", [f"{q}/hit"], [f"{q}/nz"], name=f"{q}/NonZero"),  # [2, M]
            helper.make_node("Gather", [f"{q}/nz", const.i64("zero", 0)], [f"{q}/tok"], name=f"{q}/Tok", axis=0),
            helper.make_node("Gather", [f"{p}/x2", f"{q}/tok"], [f"{q}/xe"], name=f"{q}/Gather", axis=0),
            *_linear(fc1[e], b1[e], f"{q}/xe", f"{q}/h", f"{q}/fc1", D, H1, precision, accuracy_level),
            *_activation(activation, f"{q}/h", f"{q}/a", q, const, H),
            *_linear(fc2[e], b2[e], f"{q}/a", f"{q}/y", f"{q}/fc2", H, D, precision, accuracy_level),
        ]
        y = f"{q}/y"
        if weighted:  # the weight of expert e in each of its tokens' top-k: w[tok, slot]
            nodes += [
                helper.make_node("Transpose", [f"{q}/nz"], [f"{q}/nzT"], name=f"{q}/Transpose", perm=[1, 0]),
                helper.make_node("GatherND", [weights, f"{q}/nzT"], [f"{q}/we"], name=f"{q}/GatherND"),
                helper.make_node("Unsqueeze", [f"{q}/we", const.i64("last", [-1])], [f"{q}/we1"],
                                 name=f"{q}/Unsqueeze"),
                helper.make_node("Mul", [f"{q}/y", f"{q}/we1"], [f"{q}/yw"], name=f"{q}/Weight"),
            ]
            y = f"{q}/yw"
        nodes += [
            helper.make_node("Unsqueeze", [f"{q}/tok", const.i64("last", [-1])], [f"{q}/tok1"],
                             name=f"{q}/TokIndex"),
            helper.make_node("ScatterND", [acc, f"{q}/tok1", y], [f"{q}/acc"], name=f"{q}/ScatterND",
                             reduction="add"),
        ]
        acc = f"{q}/acc"
    nodes += [
        helper.make_node("Shape", [x], [f"{p}/x_shape"], name=f"{p}/XShape"),
        helper.make_node("Reshape", [acc, f"{p}/x_shape"], [out], name=f"{p}/Out"),
    ]
    return nodes


def _linear(weight, bias: str | None, a: str, y: str, name: str, k: int, n: int, precision: str,
            accuracy_level: int) -> list:
    """y [M, n] = a [M, k] @ W (+ bias [n])."""
    if bias is None:
        return [_matmul(weight, a, y, name, k, n, precision, accuracy_level)]
    return [
        _matmul(weight, a, f"{y}0", name, k, n, precision, accuracy_level),
        helper.make_node("Add", [f"{y}0", bias], [y], name=f"{name}/Bias"),
    ]


def _activation(activation: str, h: str, a: str, q: str, const, H: int) -> list:
    """a = act(h): [M, 2H] -> [M, H] for "swiglu" (rows [gate; up]), [M, H] -> [M, H] otherwise."""
    node = helper.make_node
    if activation == "swiglu":
        return [
            node("Split", [h, const.i64("halves", [H, H])], [f"{q}/g", f"{q}/u"], name=f"{q}/Split", axis=-1),
            node("Sigmoid", [f"{q}/g"], [f"{q}/sg"], name=f"{q}/Sigmoid"),
            node("Mul", [f"{q}/g", f"{q}/sg"], [f"{q}/silu"], name=f"{q}/Silu"),
            node("Mul", [f"{q}/silu", f"{q}/u"], [a], name=f"{q}/Gate"),
        ]
    if activation == "silu":
        return [
            node("Sigmoid", [h], [f"{q}/sg"], name=f"{q}/Sigmoid"),
            node("Mul", [h, f"{q}/sg"], [a], name=f"{q}/Silu"),
        ]
    if activation == "gelu":  # 0.5 h (1 + tanh(c (h + 0.044715 h^3))): the op's tanh approximation
        f = const.f
        return [
            node("Mul", [h, h], [f"{q}/h2"], name=f"{q}/Square"),
            node("Mul", [f"{q}/h2", f("gelu_cube", 0.044715)], [f"{q}/ch2"], name=f"{q}/Cube"),
            node("Add", [f"{q}/ch2", f("one", 1.0)], [f"{q}/poly"], name=f"{q}/Poly"),
            node("Mul", [h, f"{q}/poly"], [f"{q}/inner"], name=f"{q}/Inner"),
            node("Mul", [f"{q}/inner", f("gelu_c", GELU_TANH_C)], [f"{q}/arg"], name=f"{q}/Arg"),
            node("Tanh", [f"{q}/arg"], [f"{q}/tanh"], name=f"{q}/Tanh"),
            node("Add", [f"{q}/tanh", f("one", 1.0)], [f"{q}/tanh1"], name=f"{q}/Tanh1"),
            node("Mul", [h, f"{q}/tanh1"], [f"{q}/ht"], name=f"{q}/HTanh"),
            node("Mul", [f"{q}/ht", f("half", 0.5)], [a], name=f"{q}/Gelu"),
        ]
    op = {"relu": "Relu", "identity": "Identity"}[activation]
    return [node(op, [h], [a], name=f"{q}/{op}")]


class _Constants:
    """int64 constants shared by every layer of a graph (one initializer per value)."""

    def __init__(self, g, dtype):
        self.g = g
        self.dtype = dtype

    def f(self, tag: str, value: float) -> str:
        """A scalar of the activations' dtype."""
        name = f"moeify.loop.{tag}.{np.dtype(self.dtype).name}"
        return self.g.add_initializer(name, np.array(value, self.dtype))

    def i64(self, tag: str, value) -> str:
        array = np.array(value, dtype=np.int64)
        key = "_".join(str(v) for v in array.reshape(-1)) or "scalar"
        return self.g.add_initializer(f"moeify.loop.{tag}.{key}", array)


def _expert_weights(g, layer, w: str, dtype, precision: str):
    """Per expert: fc1 [H1, D] (H1 = 2H rows [gate; up] or H) and fc2 [D, H] as the tensors `_matmul` takes
    (names)."""
    E, H1, D = layer.w1.shape
    if precision not in BITS:  # MatMul takes B as [K, N]
        fc1 = [g.add_initializer(f"{w}.{e}.fc1", np.ascontiguousarray(layer.w1[e].T).astype(dtype))
               for e in range(E)]
        fc2 = [g.add_initializer(f"{w}.{e}.fc2", np.ascontiguousarray(layer.w2[e].T).astype(dtype))
               for e in range(E)]
        return fc1, fc2
    bits, block = BITS[precision], block_size_for(D, layer.w2.shape[-1])
    out = []
    for name, weight in (("fc1", layer.w1), ("fc2", layer.w2)):
        q = quantize(weight, bits, block)  # packed [E, N, K*bits/8], scales [E, N, K/B]
        E, N, _ = q.packed.shape
        blocks = q.scales.shape[-1]
        out.append([
            (
                g.add_initializer(f"{w}.{e}.{name}.q", q.packed[e].reshape(N, blocks, -1)),  # [N, K/B, B*bits/8]
                g.add_initializer(f"{w}.{e}.{name}.scales", q.scales[e].astype(dtype)),  # [N, K/B]
                block,
            )
            for e in range(E)
        ])
    return out[0], out[1]


def _matmul(weight, a: str, y: str, name: str, k: int, n: int, precision: str, accuracy_level: int):
    """y [M, n] = a [M, k] @ W: MatMul at fp32/fp16, MatMulNBits (bits, block, accuracy level) at int4/int8."""
    if precision not in BITS:
        return helper.make_node("MatMul", [a, weight], [y], name=name)
    packed, scales, block = weight
    return helper.make_node(
        "MatMulNBits",
        [a, packed, scales],
        [y],
        name=name,
        domain=MS,
        K=k,
        N=n,
        bits=BITS[precision],
        block_size=block,
        accuracy_level=accuracy_level,
    )
