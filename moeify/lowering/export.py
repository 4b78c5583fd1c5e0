"""`export_onnx`: an (MoE) PyTorch model -> an ONNX file for ONNX Runtime or any ONNX runtime.

    moeify.export_onnx(model, example_inputs, "model.onnx", target="ort", dynamic=True, dtype=torch.float32)

Targets:
  "ort"       top-k softmax token-choice layers and hash-routed layers with relu / tanh-gelu / silu / SwiGLU
              experts become ONNX Runtime's fused com.microsoft.MoE; every other layer becomes moeify.GroupedFFN /
              moeify.SoftExperts, which carry standard-op function bodies inside the model.
  "portable"  standard ai.onnx ops only (the function bodies inlined): sparse dispatch through a capacity
              buffer, never all experts on all tokens.
A layer whose activation is a module exports as standard ops traced from PyTorch on both targets.
Batch and sequence axes are dynamic by default, so one file serves every token count.

Assembly: `LOWERINGS` lists the lowerings (`moeify.lowering.ops`) in order of preference. Before tracing,
each layer gets the first one its router declares (`RouterCapabilities.lowerings`; the traced fallback is
open to all) whose eligibility check passes (`plan_for`); while tracing, `MoELayer.experts` calls that
lowering's `experts` (`lowered_experts`); the lowerings' translations map their torch ops to ONNX nodes,
and their function bodies are attached to the model (or inlined for the portable target).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.lowering.context import TARGETS, exporting_for, planned_lowering, record_lowering
from moeify.lowering.inputs import guess_dynamic_shapes, hf_example_inputs, normalise_inputs, widen_unit_axes
from moeify.lowering.ops import grouped_ffn, ort_moe, soft_experts, traced
from moeify.lowering.ops.base import Lowering, Plan

DTYPES = {torch.float32: "float32", torch.float16: "float16"}

# in order of preference
LOWERINGS: tuple[Lowering, ...] = (ort_moe.LOWERING, grouped_ffn.LOWERING, soft_experts.LOWERING,
                                   traced.LOWERING)

__all__ = ["ExportResult", "export_onnx", "hf_example_inputs", "LOWERINGS", "plan_for"]


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote: the file, and which ONNX op each MoE layer became."""

    path: Path
    target: str
    dtype: str
    layers: dict[str, str] = field(default_factory=dict)  # module path -> ONNX op
    reasons: dict[str, str] = field(default_factory=dict)  # module path -> why that op

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for op in self.layers.values():
            counts[op] = counts.get(op, 0) + 1
        total = len(self.layers)
        parts = ", ".join(f"{n}/{total} -> {op}" for op, n in sorted(counts.items())) or "no MoE layers"
        return f"{self.path} ({self.target}, {self.dtype}): MoE layers {parts}"


def export_onnx(model: nn.Module, example_inputs=None, path: str | Path = "model.onnx", target: str = "ort",
                dynamic: bool = True, dtype: torch.dtype = torch.float32, *, dynamic_shapes=None,
                check: bool = True) -> ExportResult:
    """Export `model` to ONNX at `path` (see the module docstring for the targets).

    Args:
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs. None for a
            transformers model: a small batch of input_ids is made from its config.
        dynamic: make batch and sequence axes dynamic (every leading axis of float inputs, every axis of
            integer inputs); `dynamic_shapes` overrides the guess in torch.export's format.
        dtype: torch.float32 or torch.float16 (the model is exported from a converted copy; router math
            stays in the router dtype, float32, as in PyTorch).
        check: run `onnx.checker.check_model` on the file.
    """
    if target not in TARGETS:
        raise MoeifyError(f"unknown export target {target!r}; valid targets: {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise MoeifyError(f"unsupported export dtype {dtype}; use torch.float32 or torch.float16")
    if not isinstance(model, nn.Module):
        raise MoeifyError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise MoeifyError(f"output folder {path.parent} does not exist")

    param = next(model.parameters(), None)
    if param is not None and param.dtype != dtype:
        model = copy.deepcopy(model).to(dtype)
    args, kwargs = normalise_inputs(model, example_inputs, dtype)
    shapes = dynamic_shapes
    if dynamic and dynamic_shapes is None:
        args, kwargs = widen_unit_axes(args, kwargs)
        shapes = guess_dynamic_shapes(args, kwargs)
    from moeify.layer import MoELayer

    register_schemas()
    was_training = model.training
    model.eval()
    try:
        layers = {name or ".": m for name, m in model.named_modules() if isinstance(m, MoELayer)}
        plans = {name: plan_for(m, target) for name, m in layers.items()}
        with exporting_for(target, plans, layers) as state, _quiet_exporter(), _no_hf_cache(model):
            try:
                program = torch.onnx.export(model, args, kwargs=kwargs, dynamo=True, verbose=False,
                                            custom_translation_table=translation_table(),
                                            dynamic_shapes=shapes, optimize=True)
            except MoeifyError:
                raise
            except Exception as e:  # torch.export / translation failures: one line, cause chained
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise MoeifyError(f"ONNX export failed ({type(e).__name__}): {first[:300]}") from e
    finally:
        model.train(was_training)

    ir_model = program.model
    attach_functions(ir_model)
    if target == "portable":
        inline_functions(ir_model)
        foreign = sorted({n.domain for n in ir_model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
        if foreign:  # a bug, not a user error
            raise RuntimeError(f"portable export left non-standard ops from domains {foreign}")
    ir_model.metadata_props["moeify.target"] = target
    ir_model.metadata_props["moeify.dtype"] = DTYPES[dtype]
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        ir_model.metadata_props["moeify.vocab_size"] = str(vocab)
    program.save(str(path))
    if check:
        onnx.checker.check_model(str(path))

    used = {name: state.lowerings[name] for name in layers if name in state.lowerings}
    return ExportResult(path=path, target=target, dtype=DTYPES[dtype],
                        layers={name: plan.label(target) for name, plan in used.items()},
                        reasons={name: plan.reason for name, plan in used.items()})


def plan_for(layer, target: str) -> Plan:
    """The lowering of `layer`'s experts for `target`: the first of `LOWERINGS` its router declares (or open
    to any router) that is eligible. Call outside tracing: eligibility may run onnxruntime."""
    caps = layer.router.caps
    rejected: dict[str, str] = {}
    for lowering in LOWERINGS:
        if not (lowering.any_router or lowering.name in caps.lowerings):
            continue
        why = lowering.eligible(layer, target)
        if why is None:
            reason = "; ".join(f"not {name}: {r}" for name, r in rejected.items())
            return Plan(lowering, reason or f"router {layer.router.name!r} prefers {lowering.name}", rejected)
        rejected[lowering.name] = why
    raise RuntimeError(f"no lowering for {layer!r}: {rejected}")  # unreachable: the traced one takes any


def lowered_experts(layer, x: torch.Tensor, routing) -> torch.Tensor:
    """`MoELayer.experts` while exporting: x [T, D] -> [T, D] through the op of the layer's lowering."""
    plan = planned_lowering(layer)
    if plan is None:  # a layer export_onnx did not see before tracing (not a submodule of the model)
        from moeify.lowering.context import export_target

        plan = plan_for(layer, export_target())
    record_lowering(layer, plan)
    return plan.lowering.experts(layer, x, routing)


@functools.cache
def register_schemas() -> None:
    """Register the lowerings' op schemas with onnx (onnxscript looks ops up there; onnx.checker validates
    against them); a schema onnx already knows (com.microsoft.MoE in some versions) is left alone."""
    for lowering in LOWERINGS:
        if lowering.schema is not None:
            schema = lowering.schema()
            if not onnx.defs.has(schema.name, schema.domain):
                onnx.defs.register_schema(schema)


def translation_table() -> dict:
    """torch op overload -> onnxscript function, for torch.onnx.export's custom_translation_table."""
    return {op: fn for lowering in LOWERINGS for op, fn in lowering.translations().items()}


def attach_functions(model: ir.Model) -> int:
    """Give every node of a function-bodied lowering the overload of its variant (activation, gating, which
    biases are present) and the model one function per overload used, so the model stands alone: a runtime
    that has never heard of moeify runs it through the bodies. Returns how many such nodes were found."""
    bodied = {(lw.domain, lw.op_type): lw for lw in LOWERINGS if lw.body is not None}
    opset = model.opset_imports.get("", 18)
    count = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        lowering = bodied.get((node.domain, node.op_type))
        if lowering is None:
            continue
        count += 1
        i1, i2 = lowering.bias_inputs
        has_b1 = len(node.inputs) > i1 and node.inputs[i1] is not None
        has_b2 = len(node.inputs) > i2 and node.inputs[i2] is not None
        function = lowering.body(node.attributes["activation"].as_string(),
                                 bool(node.attributes["gated"].as_int()), has_b1, has_b2, opset)
        node.overload = function.overload
        model.functions.setdefault(function.identifier(), function)
        model.opset_imports.setdefault(node.domain, 1)
    return count


def inline_functions(model: ir.Model) -> None:
    """Replace every function call by its body; drop functions and opsets no longer used."""
    common_passes.InlinePass()(model)
    common_passes.RemoveUnusedFunctionsPass()(model)
    common_passes.RemoveUnusedOpsetsPass()(model)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a warning per missing optional package and emits deprecation warnings; hide them."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=FutureWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            # convert's token-id hooks keep the call's input_ids on the layers: fine while exporting
            warnings.filterwarnings("ignore", message=r"The tensor attribute self\._moeify_token_ids")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _no_hf_cache(model):
    """transformers models: export without the KV cache (its objects do not export as plain tensors)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    old = config.use_cache
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = old
