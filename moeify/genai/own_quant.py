"""int8/int4 for the own route's graph (moeify.genai.own_route): weight-only block quantisation of an fp32
graph with explicit past/present KV.

Shape legend: T tokens (B*S), D model width, H expert width, E experts, V vocabulary.

- Experts: each `com.microsoft.MoE` node the export wrote becomes loop experts (moeify.genai.expert_loop: a
  dense MLP per expert over its routed tokens, MatMulNBits weights) or `com.microsoft.QMoE` (experts_op
  "fused"), reading the node's own inputs: x [T, D], router logits [T, E], fc1 [E, H1, D] (interleaved
  gate/up rows when swiglu_fusion=1, read back to [gate; up] for the loop), fc2 [E, D, H], optional biases,
  and its attributes (k, activation_type, normalize_routing_weights). fc1 may be a Gather of the weight
  (the ort_moe lowering interleaves gated rows that way): it is evaluated here.
- Dense linears: ONNX Runtime's `MatMulNBitsQuantizer` (block 32, symmetric; accuracy level 4 on CPU, as
  ONNX Runtime GenAI's builder) on every MatMul with a constant weight, after two rewrites that let it see
  them: Gemm with a constant weight (GPT-2's Conv1D) -> MatMul + Add, and a MatMul reading
  Transpose(initializer) (a tied lm_head) -> MatMul on the transposed copy. The lm_head is quantised like
  the builder does; the token embedding (a Gather) stays float, so a tied lm_head gets its own quantised
  copy. Router MatMuls stay float: routing picks among near ties and a changed choice moves a token's whole
  expert output.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import helper, numpy_helper

from moeify.errors import MoeifyError
from moeify.genai.expert_loop import loop_expert_nodes
from moeify.genai.quantize import BITS
from moeify.genai.surgery import MS, ExpertLayer, Graph, qmoe_node, resolve_experts_op
from moeify.lowering.ops.portable import DOMAIN as PORTABLE_DOMAIN

log = logging.getLogger(__name__)
DENSE_BLOCK = 32
ROUTER_PATH_OPS = {"Neg", "Softplus", "CastLike", "Cast", "Reshape", "Sigmoid", "Log"}


def quantize_own_graph(
    model: onnx.ModelProto, precision: str, experts_op: str = "auto", accuracy_level: int = 4
) -> onnx.ModelProto:
    """The own route's fp32 `model` at `precision` (int8 | int4): experts and dense linears weight-only
    quantised (see the module docstring). `model` is changed in place and returned quantised."""
    if precision not in BITS:
        raise MoeifyError(f"the own route quantises to {', '.join(BITS)}, not {precision!r}")
    experts_op = resolve_experts_op(experts_op, precision)
    g = Graph(model)
    moe_nodes = [n for n in g.graph.node if n.op_type == "MoE" and n.domain == MS]
    routers = {router_matmul(g, n) for n in moe_nodes} - {None}
    for index, node in enumerate(moe_nodes):  # nodes are swapped by name: the protos are copies
        _replace_moe(g, node, index, precision, experts_op, accuracy_level)
    own_ops = [n.name for n in g.graph.node if n.domain == PORTABLE_DOMAIN]
    if own_ops:  # MoE layers com.microsoft.MoE cannot compute (e.g. exact-erf gelu experts)
        log.warning(
            "--genai %s: %d node(s) of moeify's own ops keep their weights float (only com.microsoft.MoE "
            "experts and MatMul/Gemm linears are quantised)", precision, len(own_ops)
        )
    _remove_dead(g)  # e.g. the Gather that interleaved a gated fc1 for the MoE node
    _gemm_to_matmul(g)
    _fold_transposed_weights(g)
    _remove_dead(g)
    return _quantize_dense(model, BITS[precision], accuracy_level, exclude=routers)


def router_matmul(g: Graph, moe: onnx.NodeProto) -> str | None:
    """The name of the MatMul computing `moe`'s router logits (through elementwise/cast steps), or None."""
    producers = {o: n for n in g.graph.node for o in n.output}
    node = producers.get(moe.input[1])
    while node is not None and node.op_type in ROUTER_PATH_OPS:
        node = producers.get(node.input[0])
    return node.name if node is not None and node.op_type == "MatMul" else None


def _replace_moe(g: Graph, node: onnx.NodeProto, index: int, precision: str, experts_op: str,
                 accuracy_level: int) -> None:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    activation = attrs.get("activation_type", b"relu")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if attrs.get("use_sparse_mixer", 0) or (activation == "swiglu" and attrs.get("swiglu_fusion", 0) != 1):
        raise MoeifyError(f"--genai: cannot quantise {node.name}: a MoE layout moeify does not write")
    inputs = list(node.input) + [""] * (6 - len(node.input))
    w1, b1, w2, b2 = (_constant(g, name, node.name) for name in inputs[2:6])  # fc1 [E, H1, D], fc2 [E, D, H]
    x, probs, out = inputs[0], inputs[1], node.output[0]
    dtype = helper.tensor_dtype_to_np_dtype(g.initializers[inputs[4]].data_type)
    if experts_op == "loop":
        if activation == "swiglu":  # interleaved rows gate_0, up_0, ... -> [gate; up]
            w1 = _deinterleave(w1)
            b1 = None if b1 is None else _deinterleave(b1[..., None])[..., 0]
        layer = ExpertLayer(index, None, attrs.get("k", 1), w1, w2, activation,
                            bool(attrs.get("normalize_routing_weights", 0)), b1, b2)
        new = loop_expert_nodes(g, layer, x, out, dtype, precision, accuracy_level, probs=probs)
    else:
        w = f"model.layers.{index}.moe.experts"  # fc1 rows as the MoE node had them
        new = [qmoe_node(g, w, x, probs, w1, b1, w2, b2, dtype, precision, out, f"{node.name}/QMoE", attrs)]
    _swap(g, node.name, new)


def _constant(g: Graph, name: str, user: str) -> np.ndarray | None:
    """An input of a MoE node as an array: an initializer, or a Gather of one with constant indices."""
    if not name:
        return None
    if name in g.initializers:
        return numpy_helper.to_array(g.initializers[name]).astype(np.float32)
    producer = next((n for n in g.graph.node if name in n.output), None)
    constant_gather = producer is not None and producer.op_type == "Gather"
    if constant_gather and all(i in g.initializers for i in producer.input):
        data, indices = (numpy_helper.to_array(g.initializers[i]) for i in producer.input)
        axis = next((a.i for a in producer.attribute if a.name == "axis"), 0)
        return np.take(data, indices, axis=axis).astype(np.float32)
    raise MoeifyError(f"--genai: cannot quantise {user}: its weight {name} is not a constant")


def _deinterleave(w: np.ndarray) -> np.ndarray:
    """[E, 2H, ...] rows gate_0, up_0, gate_1, ... -> [E, 2H, ...] rows [gate; up]."""
    return np.ascontiguousarray(np.concatenate([w[:, 0::2], w[:, 1::2]], axis=1))


def _gemm_to_matmul(g: Graph) -> None:
    """Gemm(A, W, C) with a constant W, alpha = beta = 1, transA = 0 -> MatMul(A, W or W^T) (+ Add C)."""
    for node in [n for n in g.graph.node if n.op_type == "Gemm" and n.input[1] in g.initializers]:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            array = numpy_helper.to_array(g.initializers[weight])  # [N, K]
            weight = g.add_initializer(f"{weight}.T", np.ascontiguousarray(array.T))  # [K, N]
        has_bias = len(node.input) > 2 and node.input[2]
        y = f"{node.output[0]}/matmul" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], weight], [y], name=f"{node.name}/MatMul")]
        if has_bias:
            new.append(helper.make_node("Add", [y, node.input[2]], [node.output[0]], name=f"{node.name}/Add"))
        _swap(g, node.name, new)


def _fold_transposed_weights(g: Graph) -> None:
    """MatMul(A, Transpose(W)) with W an initializer -> MatMul(A, W^T), W^T a new initializer."""
    producers = {o: n for n in g.graph.node for o in n.output}
    for node in [n for n in g.graph.node if n.op_type == "MatMul"]:
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in g.initializers:
            continue
        array = numpy_helper.to_array(g.initializers[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        node.input[1] = g.add_initializer(f"{t.input[0]}.T", np.ascontiguousarray(np.transpose(array, perm)))


def _remove_dead(g: Graph) -> None:
    """Remove nodes none of whose outputs is used (repeatedly), and the initializers they alone read."""
    outputs = {o.name for o in g.graph.output}
    while True:
        used = {i for n in g.graph.node for i in n.input} | outputs
        dead = [n for n in g.graph.node if not any(o in used for o in n.output)]
        g.remove(dead)  # also drops initializers nothing reads any more
        if not dead:
            return


def _swap(g: Graph, old: str, new: list[onnx.NodeProto]) -> None:
    """Put `new` where the node named `old` was (initializers nothing reads go in _remove_dead)."""
    position = next(i for i, n in enumerate(g.graph.node) if n.name == old)
    del g.graph.node[position]
    for offset, n in enumerate(new):
        g.graph.node.insert(position + offset, n)


def _quantize_dense(model: onnx.ModelProto, bits: int, accuracy_level: int, exclude: set[str]):
    from onnxruntime.quantization import matmul_nbits_quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet(matmul_nbits_quantizer.logger):  # it logs every node at INFO
        return _run_quantizer(MatMulNBitsQuantizer, model, bits, accuracy_level, exclude)


@contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_quantizer(MatMulNBitsQuantizer, model: onnx.ModelProto, bits: int, accuracy_level: int,
                   exclude: set[str]) -> onnx.ModelProto:
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=DENSE_BLOCK,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        nodes_to_exclude=sorted(exclude),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantized = quantizer.model.model
    if not any(op.domain == MS for op in quantized.opset_import):
        quantized.opset_import.append(helper.make_opsetid(MS, 1))
    return quantized
