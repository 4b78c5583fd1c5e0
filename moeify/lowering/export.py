"""`export_onnx`: an (MoE) PyTorch model -> an ONNX file for ONNX Runtime or any ONNX runtime.

    moeify.export_onnx(model, example_inputs, "model.onnx", target="ort", dynamic=True, dtype=torch.float32)

Targets:
  "ort"       top-k softmax token-choice layers with relu / tanh-gelu / silu / SwiGLU experts become ONNX
              Runtime's fused com.microsoft.MoE; every other layer becomes moeify.GroupedFFN /
              moeify.SoftExperts, which carry standard-op function bodies inside the model.
  "portable"  standard ai.onnx ops only (the function bodies inlined): sparse dispatch through a capacity
              buffer, never all experts on all tokens.
Batch and sequence axes are dynamic by default, so one file serves every token count.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.lowering.context import TARGETS, exporting_for

DTYPES = {torch.float32: "float32", torch.float16: "float16"}


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
    args, kwargs = _normalise_inputs(model, example_inputs, dtype)
    shapes = dynamic_shapes
    if dynamic and dynamic_shapes is None:
        args, kwargs = _widen_unit_axes(args, kwargs)
        shapes = _guess_dynamic_shapes(args, kwargs)
    from moeify.layer import MoELayer
    from moeify.lowering.functions import attach_functions, inline_functions
    from moeify.lowering.hook import plan_for
    from moeify.lowering.translate import translation_table

    was_training = model.training
    model.eval()
    try:
        plans = {id(m): plan_for(m, target) for m in model.modules() if isinstance(m, MoELayer)}
        with exporting_for(target, plans) as state, _quiet_exporter(), _no_hf_cache(model):
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
        import onnx

        onnx.checker.check_model(str(path))

    layers, reasons = {}, {}
    for name, module in model.named_modules():
        plan = state.lowerings.get(id(module)) if isinstance(module, MoELayer) else None
        if plan is not None:
            op = plan.op if target == "ort" or plan.fused else f"{plan.op} (inlined)"
            layers[name or "."], reasons[name or "."] = op, plan.reason
    return ExportResult(path=path, target=target, dtype=DTYPES[dtype], layers=layers, reasons=reasons)


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """input_ids [batch, seq] for a transformers model, from its config's vocab_size."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise MoeifyError("example inputs are needed for this model (it has no config.vocab_size to make "
                          "input_ids from); pass example_inputs")
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def _normalise_inputs(model, example_inputs, dtype) -> tuple[tuple, dict]:
    if example_inputs is None:
        args, kwargs = (), hf_example_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise MoeifyError("example_inputs must be a tensor, a tuple or a dict, "
                          f"got {type(example_inputs).__name__}")

    def cast(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _widen_unit_axes(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Repeat example inputs along dynamic axes of size 1 (to 2): torch.export specialises size-1 axes,
    and the exported graph was then silently wrong at other sizes (seen with a batch-1 example)."""

    def widen(v, spec):
        if not isinstance(v, torch.Tensor) or not spec:
            return v
        for axis in spec:
            if v.shape[axis] == 1:
                v = torch.cat([v, v], dim=axis)
        return v

    shapes = _guess_dynamic_shapes(args, kwargs)
    if isinstance(shapes, tuple):
        args = tuple(widen(a, s) for a, s in zip(args, shapes, strict=True))
    elif isinstance(shapes, dict):
        kwargs = {k: widen(v, shapes[k]) for k, v in kwargs.items()}
    return args, kwargs


def _guess_dynamic_shapes(args: tuple, kwargs: dict):
    """Batch and sequence axes: integer inputs [B, S] (ids, masks); float inputs [B, S, D] or [T, D]."""
    Dim = torch.export.Dim
    batch, seq, tokens = Dim("batch"), Dim("seq"), Dim("tokens")

    def spec(v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        if not v.is_floating_point():
            return {0: batch, 1: seq} if v.dim() == 2 else ({0: tokens} if v.dim() == 1 else {0: batch})
        if v.dim() == 2:
            return {0: tokens}
        return {0: batch, 1: seq} if v.dim() == 3 else {0: batch}

    if kwargs and not args:
        return {k: spec(v) for k, v in kwargs.items()}
    if args and not kwargs:
        return tuple(spec(a) for a in args)
    return None  # mixed positional and keyword inputs: let torch.export decide (static)


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
