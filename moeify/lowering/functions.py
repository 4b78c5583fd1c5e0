"""After export: give every moeify op its function body, or inline them all (portable target).

Each moeify node gets the overload of its variant (activation, gating, which biases are present), and the
model gets one function per overload used, so the model stands alone: a runtime that has never heard of
moeify runs it through the bodies (ONNX Runtime inlines model-local functions when loading).
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from moeify.lowering.bodies import BIAS_INPUTS, FUNCTION_BUILDERS
from moeify.lowering.schemas import DOMAIN


def _moeify_nodes(model: ir.Model):
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain == DOMAIN and node.op_type in FUNCTION_BUILDERS:
            yield node


def attach_functions(model: ir.Model) -> int:
    """Set overloads and add function bodies; returns how many moeify nodes were found."""
    opset = model.opset_imports.get("", 18)
    count = 0
    for node in _moeify_nodes(model):
        count += 1
        activation = node.attributes["activation"].as_string()
        gated = bool(node.attributes["gated"].as_int())
        i1, i2 = BIAS_INPUTS[node.op_type]
        has_b1 = len(node.inputs) > i1 and node.inputs[i1] is not None
        has_b2 = len(node.inputs) > i2 and node.inputs[i2] is not None
        function = FUNCTION_BUILDERS[node.op_type](activation, gated, has_b1, has_b2, opset)
        node.overload = function.overload
        model.functions.setdefault(function.identifier(), function)
    if count:
        model.opset_imports[DOMAIN] = model.opset_imports.get(DOMAIN, 1)
    return count


def inline_functions(model: ir.Model) -> None:
    """Replace every function call by its body; drop functions and opsets no longer used."""
    common_passes.InlinePass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)
