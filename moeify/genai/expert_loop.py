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
    for each expert e:
        tok [M]      = NonZero(idx == e)[0]       the tokens that chose e (each chooses e at most once)
        h [M, 2H]    = x2[tok] @ fc1_e            rows [gate; up] (MatMulNBits or MatMul)
        y [M, D]     = (silu(h[:, :H]) * h[:, H:]) @ fc2_e * w[tok, slot]     (no weight when K == 1)
        acc [N, D]  += scatter(tok, y)            ScatterND(reduction="add")
    out [B, S, D]    = Reshape(acc, Shape(x))
"""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from moeify.genai.quantize import BITS, block_size_for, quantize

MS = "com.microsoft"


def loop_expert_nodes(g, layer, x: str, out: str, dtype, precision: str, accuracy_level: int) -> list:
    """The nodes computing `out` from `x` and `/model/layers.i/moe/router/probs` for one layer; weights
    are added to `g` (a surgery.Graph)."""
    p = f"/model/layers.{layer.index}/moe"
    w = f"model.layers.{layer.index}.moe.experts"
    E, H2, D = layer.w1.shape
    H, K = H2 // 2, layer.k
    const = _Constants(g, dtype)
    nodes = [
        helper.make_node("Reshape", [x, const.i64("rows", [-1, D])], [f"{p}/x2"], name=f"{p}/Reshape"),
        helper.make_node(
            "TopK", [f"{p}/router/probs", const.i64("k", [K])], [f"{p}/top", f"{p}/idx"], name=f"{p}/TopK"
        ),
        helper.make_node("Shape", [f"{p}/x2"], [f"{p}/x2_shape"], name=f"{p}/Shape"),
        helper.make_node(
            "ConstantOfShape",
            [f"{p}/x2_shape"],
            [f"{p}/acc0"],
            name=f"{p}/Zeros",
            value=numpy_helper.from_array(np.zeros(1, dtype=dtype)),
        ),
    ]
    if K > 1:
        nodes.append(helper.make_node("Softmax", [f"{p}/top"], [f"{p}/w"], name=f"{p}/Softmax", axis=-1))
    fc1, fc2 = _expert_weights(g, layer, w, dtype, precision)
    acc = f"{p}/acc0"
    for e in range(E):
        q = f"{p}/e{e}"
        nodes += [
            helper.make_node("Equal", [f"{p}/idx", const.i64(f"e{e}", [e])], [f"{q}/hit"], name=f"{q}/Equal"),
            helper.make_node("NonZero", [f"{q}/hit"], [f"{q}/nz"], name=f"{q}/NonZero"),  # [2, M]
            helper.make_node("Gather", [f"{q}/nz", const.i64("zero", 0)], [f"{q}/tok"], name=f"{q}/Tok", axis=0),
            helper.make_node("Gather", [f"{p}/x2", f"{q}/tok"], [f"{q}/xe"], name=f"{q}/Gather", axis=0),
            _matmul(fc1[e], f"{q}/xe", f"{q}/h", f"{q}/fc1", D, H2, precision, accuracy_level),
            helper.make_node("Split", [f"{q}/h", const.i64("halves", [H, H])], [f"{q}/g", f"{q}/u"],
                             name=f"{q}/Split", axis=-1),
            helper.make_node("Sigmoid", [f"{q}/g"], [f"{q}/sg"], name=f"{q}/Sigmoid"),
            helper.make_node("Mul", [f"{q}/g", f"{q}/sg"], [f"{q}/silu"], name=f"{q}/Silu"),
            helper.make_node("Mul", [f"{q}/silu", f"{q}/u"], [f"{q}/a"], name=f"{q}/Gate"),
            _matmul(fc2[e], f"{q}/a", f"{q}/y", f"{q}/fc2", H, D, precision, accuracy_level),
        ]
        y = f"{q}/y"
        if K > 1:  # the weight of expert e in each of its tokens' top-k: w[tok, slot]
            nodes += [
                helper.make_node("Transpose", [f"{q}/nz"], [f"{q}/nzT"], name=f"{q}/Transpose", perm=[1, 0]),
                helper.make_node("GatherND", [f"{p}/w", f"{q}/nzT"], [f"{q}/we"], name=f"{q}/GatherND"),
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


class _Constants:
    """int64 constants shared by every layer of a graph (one initializer per value)."""

    def __init__(self, g, dtype):
        self.g = g

    def i64(self, tag: str, value) -> str:
        array = np.array(value, dtype=np.int64)
        key = "_".join(str(v) for v in array.reshape(-1)) or "scalar"
        return self.g.add_initializer(f"moeify.loop.{tag}.{key}", array)


def _expert_weights(g, layer, w: str, dtype, precision: str):
    """Per expert: fc1 [2H, D] rows [gate; up] and fc2 [D, H] as the tensors `_matmul` takes (names)."""
    E, H2, D = layer.w1.shape
    if precision not in BITS:  # MatMul takes B as [K, N]
        fc1 = [g.add_initializer(f"{w}.{e}.fc1", np.ascontiguousarray(layer.w1[e].T).astype(dtype))
               for e in range(E)]
        fc2 = [g.add_initializer(f"{w}.{e}.fc2", np.ascontiguousarray(layer.w2[e].T).astype(dtype))
               for e in range(E)]
        return fc1, fc2
    bits, block = BITS[precision], block_size_for(D, H2 // 2)
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
