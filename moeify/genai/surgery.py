"""Swap the builder's dense MLPs for router + `com.microsoft.MoE` (fp32/fp16) or `com.microsoft.QMoE`
(int8/int4).

Shape legend: B batch, S new positions, D model width, H expert width, E experts, V vocabulary.

The builder names each LLaMA-style MLP's nodes `/model/layers.N/mlp/...` (gate/up/down MatMul or
MatMulNBits, the SiLU as Sigmoid + Mul, the gate Mul); they read one tensor (the post-attention norm's
output, x [B, S, D]) and one tensor leaves them (the down projection's output). We delete those nodes and
their now unused weights and write, under the same output name so the residual add downstream is untouched:

    logits [B, S, E] = MatMul(x, W_r) | Log(Sigmoid(MatMul(x, W_r))) | Gather(table, input_ids)
    probs  [B*S, E]  = Reshape(logits, [-1, E])
    out    [B, S, D] = MoE(x, probs, fc1 [E, 2H, D], -, fc2 [E, D, H])                          (fp32/fp16)
                     | QMoE(x, probs, fc1_q, fc1_scales, -, fc2_q, fc2_scales)                  (int8/int4)

fc1 interleaves moeify's [gate; up] rows (row 2i gate_i, row 2i+1 up_i: swiglu_fusion=1, the only layout
the CPU kernel takes); SwiGLU is the op's swiglu with alpha=1, beta=0 and no clamp.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moeify.errors import MoeifyError
from moeify.genai.expert_loop import loop_expert_nodes
from moeify.genai.quantize import BITS, block_size_for, quantize
from moeify.genai.router_logits import RouterLogits
from moeify.lowering.ops.ort_moe import MSFT_DOMAIN as MS


@dataclass(frozen=True)
class ExpertLayer:
    """What surgery needs of one MoE layer: decoder index, routing, k and the expert weights
    (w1 [E, 2H, D] rows [gate; up], w2 [E, D, H], float32).

    Loop experts (moeify.genai.expert_loop) also read the optional fields: the activation by
    com.microsoft.MoE's name (non-gated ones have w1 [E, H, D]), whether the top-k weights are
    renormalised, and biases b1 [E, H1], b2 [E, D]. `router` is None where the graph already holds the
    router (the own route, moeify.genai.own_quant)."""

    index: int
    router: RouterLogits | None
    k: int
    w1: np.ndarray
    w2: np.ndarray
    activation: str = "swiglu"
    normalize: bool = True
    b1: np.ndarray | None = None
    b2: np.ndarray | None = None


def interleave_gate_up(w1: np.ndarray) -> np.ndarray:
    """[E, 2H, D] with rows [gate; up] -> [E, 2H, D] with rows gate_0, up_0, gate_1, up_1, ..."""
    E, H2, D = w1.shape
    return np.ascontiguousarray(w1.reshape(E, 2, H2 // 2, D).transpose(0, 2, 1, 3).reshape(E, H2, D))


class Graph:
    """A model's graph with the lookups surgery needs (producers, consumers, initializers by name)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}

    def mlp_nodes(self, index: int) -> list[onnx.NodeProto]:
        prefix = f"/model/layers.{index}/mlp/"
        return [n for n in self.graph.node if n.name.startswith(prefix)]

    def boundary(self, nodes: list[onnx.NodeProto], index: int) -> tuple[str, str]:
        """(the one activation the nodes read from outside, the one tensor they produce for outside)."""
        inside = {o for n in nodes for o in n.output}
        names = {n.name for n in nodes}
        reads = {i for n in nodes for i in n.input if i and i not in inside and i not in self.initializers}
        used_outside = {i for n in self.graph.node if n.name not in names for i in n.input}
        used_outside |= {o.name for o in self.graph.output}
        leaves = {o for o in inside if o in used_outside}
        if len(reads) != 1 or len(leaves) != 1:
            raise MoeifyError(
                f"--genai: the builder's MLP of layer {index} reads {sorted(reads)} and gives "
                f"{sorted(leaves)}; expected one input and one output (an unknown builder "
                "version?)"
            )
        return reads.pop(), leaves.pop()

    def elem_type(self, x: str) -> int:
        """The element type of activation `x`: that of the weight of the norm node producing it."""
        for node in self.graph.node:
            if x in node.output:
                for name in node.input:
                    if name in self.initializers:
                        return self.initializers[name].data_type
        raise MoeifyError(f"--genai: cannot tell the dtype of {x} in the builder's graph")

    def remove(self, nodes: list[onnx.NodeProto]) -> None:
        gone = {id(n) for n in nodes}
        kept = [n for n in self.graph.node if id(n) not in gone]
        del self.graph.node[:]
        self.graph.node.extend(kept)
        used = {i for n in kept for i in n.input}
        for name in [t.name for t in self.graph.initializer if t.name not in used]:
            self.graph.initializer.remove(self.initializers.pop(name))

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        if name not in self.initializers:
            tensor = numpy_helper.from_array(array, name)
            self.graph.initializer.append(tensor)
            self.initializers[name] = tensor
        return name


EXPERT_OPS = ("auto", "fused", "loop")


LOOP_MIN_WIDTH_FP32 = 1024  # from this model width up, "auto" takes loop experts at fp32 too


def resolve_experts_op(experts_op: str, precision: str, d_model: int | None = None) -> str:
    """"auto" -> "loop" at int4/int8, and at fp32 for models of width >= LOOP_MIN_WIDTH_FP32; "fused"
    otherwise (fp16 is CUDA's, whose fused kernels were not measured against the loop).

    Measured with benchmarks/genai.py (LLaMA, 4 layers, E=8, k=1, 128-token prompt, quiet 2-core CPU): at
    d=2048 QMoE decodes at 0.36x the builder's int4 dense model and loop experts at 1.04x (prefill 1.66x vs
    1.09x); at fp32 fused MoE decodes at 1.12x and prefills at 1.73x dense, loop at 1.01x and 1.29x. At d=512
    fused decodes slightly faster than the loop at fp32 (0.96x vs 0.92x; prefill 1.60x vs 1.12x), and at d=64
    at every precision (the loop's ~12 small ops per expert dominate)."""
    if experts_op not in EXPERT_OPS:
        raise MoeifyError(f"--genai: experts must be one of {', '.join(EXPERT_OPS)}, got {experts_op!r}")
    if experts_op != "auto":
        return experts_op
    if precision in BITS:
        return "loop"
    wide = d_model is not None and d_model >= LOOP_MIN_WIDTH_FP32
    return "loop" if precision == "fp32" and wide else "fused"


def replace_mlps(
    model: onnx.ModelProto, layers: list[ExpertLayer], precision: str, experts_op: str = "auto"
) -> onnx.ModelProto:
    """Replace the MLP of each of `layers` in the builder's `model` (in place); returns it.

    experts_op: "loop" (one dense MLP per expert over its tokens, moeify.genai.expert_loop), "fused"
    (`com.microsoft.MoE` / `QMoE`) or "auto" (`resolve_experts_op`).
    """
    g = Graph(model)
    for layer in layers:
        nodes = g.mlp_nodes(layer.index)
        if not nodes:
            raise MoeifyError(f"--genai: no /model/layers.{layer.index}/mlp/ nodes in the builder's graph")
        x, out = g.boundary(nodes, layer.index)
        dtype = helper.tensor_dtype_to_np_dtype(g.elem_type(x))
        insert_at = min(i for i, n in enumerate(g.graph.node) if n.name in {m.name for m in nodes})
        accuracy_level = _accuracy_level(nodes)
        g.remove(nodes)
        if resolve_experts_op(experts_op, precision, layer.w1.shape[2]) == "loop":
            experts = loop_expert_nodes(g, layer, x, out, dtype, precision, accuracy_level)
        else:
            experts = [_experts_node(g, layer, x, out, dtype, precision)]
        new = _router_nodes(g, layer, x, dtype) + experts
        for offset, node in enumerate(new):
            g.graph.node.insert(insert_at + offset, node)
    if not any(op.domain == MS for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
    return model


def _accuracy_level(nodes: list[onnx.NodeProto]) -> int:
    """The builder's MatMulNBits accuracy level in the dense MLP (4, int8 compute, on CPU); 0 when none."""
    for node in nodes:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                return attr.i
    return 0


def _router_nodes(g: Graph, layer: ExpertLayer, x: str, dtype) -> list[onnx.NodeProto]:
    p = f"/model/layers.{layer.index}/moe/router"
    E = layer.w1.shape[0]
    plan = layer.router
    if plan.kind == "token_table":  # layers with the same rule share one table
        digest = hashlib.sha1(plan.array.tobytes()).hexdigest()[:12]
        table = g.add_initializer(f"moeify.router_table.{digest}", plan.array.astype(dtype))
        nodes = [helper.make_node("Gather", [table, "input_ids"], [f"{p}/logits"], name=f"{p}/Gather")]
    else:
        weight = g.add_initializer(f"model.layers.{layer.index}.moe.router.weight", plan.array.astype(dtype))
        nodes = [helper.make_node("MatMul", [x, weight], [f"{p}/MatMul/output_0"], name=f"{p}/MatMul")]
        if plan.kind == "log_sigmoid":
            nodes += [
                helper.make_node(
                    "Sigmoid", [f"{p}/MatMul/output_0"], [f"{p}/Sigmoid/output_0"], name=f"{p}/Sigmoid"
                ),
                helper.make_node("Log", [f"{p}/Sigmoid/output_0"], [f"{p}/logits"], name=f"{p}/Log"),
            ]
        else:
            nodes[0].output[0] = f"{p}/logits"
    shape = g.add_initializer(f"moeify.router_shape.{E}", np.array([-1, E], dtype=np.int64))
    nodes.append(helper.make_node("Reshape", [f"{p}/logits", shape], [f"{p}/probs"], name=f"{p}/Reshape"))
    return nodes


def _experts_node(g: Graph, layer: ExpertLayer, x: str, out: str, dtype, precision: str) -> onnx.NodeProto:
    p = f"/model/layers.{layer.index}/moe"
    w = f"model.layers.{layer.index}.moe.experts"
    fc1 = interleave_gate_up(layer.w1)  # [E, 2H, D]
    attrs = dict(
        k=layer.k,
        activation_type="swiglu",
        normalize_routing_weights=1,
        swiglu_fusion=1,
        activation_alpha=1.0,
        activation_beta=0.0,
    )
    if precision not in BITS:
        inputs = [
            x,
            f"{p}/router/probs",
            g.add_initializer(f"{w}.fc1", fc1.astype(dtype)),
            "",
            g.add_initializer(f"{w}.fc2", layer.w2.astype(dtype)),
        ]
        return helper.make_node("MoE", inputs, [out], name=f"{p}/MoE", domain=MS, **attrs)
    return qmoe_node(g, w, x, f"{p}/router/probs", fc1, None, layer.w2, None, dtype, precision, out,
                     f"{p}/QMoE", attrs)


def qmoe_node(g: Graph, w: str, x: str, probs: str, fc1: np.ndarray, b1: np.ndarray | None,
              fc2: np.ndarray, b2: np.ndarray | None, dtype, precision: str, out: str, name: str,
              attrs: dict) -> onnx.NodeProto:
    """`com.microsoft.QMoE` computing `out` from x and the router logits `probs`: fc1 [E, H1, D] (rows as
    the node's attributes say) and fc2 [E, D, H] block-quantised at `precision`, optional biases b1 [E, H1],
    b2 [E, D]; initializers named `w`.fc1.q, ...; `attrs` are the MoE attributes (k, activation, ...)."""
    block = block_size_for(fc1.shape[-1], fc2.shape[-1])
    q1, q2 = (quantize(weight, BITS[precision], block) for weight in (fc1, fc2))

    def add(tag: str, array: np.ndarray | None) -> str:
        return "" if array is None else g.add_initializer(f"{w}.{tag}", array)

    inputs = [
        x,
        probs,
        add("fc1.q", q1.packed),
        add("fc1.scales", q1.scales.astype(dtype)),
        add("fc1.b", None if b1 is None else b1.astype(dtype)),
        add("fc2.q", q2.packed),
        add("fc2.scales", q2.scales.astype(dtype)),
        add("fc2.b", None if b2 is None else b2.astype(dtype)),
    ]
    while inputs[-1] == "":  # trailing optional inputs left out
        inputs.pop()
    return helper.make_node(
        "QMoE", inputs, [out], name=name, domain=MS, expert_weight_bits=BITS[precision], block_size=block,
        **attrs,
    )
