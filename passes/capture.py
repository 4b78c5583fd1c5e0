"""Capture: trace the smallest modules that trace.

Whole-model tracing fails on real models (data-dependent control flow, mask building, `*args`
wrappers), but the small modules an FFN lives in trace fine. So capture walks the module tree
children-first and runs `torch.fx` on each module that could hold an FFN (two or more linear-likes, or
raw 2-D parameters, in its subtree):

- atoms (linear-likes, activations, dropouts; see atoms.py), torch.nn's own modules and every module
  that failed to trace are leaves: they show as `call_module` nodes;
- a child that traced is traced through, so a parent's graph sees an FFN split across sibling modules
  (BERT's `intermediate` + `output`) as one chain;
- a module whose `forward` fails gets a second, analysis-only try: the undecorated forward, its
  non-tensor defaults and `**kwargs` fixed, data-dependent conditions taken as False; and its other
  methods that call its children are traced on their own
  (`TransformerEncoderLayer._ff_block`, `BertLayer.feed_forward_chunk`, ALBERT's `ff_chunk`);
- a condition on tensor metadata (diffusers' `if gate.device.type != "mps"`) is decided from the module's
  own parameters (metadata.py); the graph records which (`Captured.decided`).

Tracing runs model code on proxies and touches no weights; its warnings are silenced.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from torch import fx, nn

from moeify.passes import metadata
from moeify.passes.atoms import is_atom, is_linear_module

# Method names never traced: they change state or are not computations on tensors.
_SKIP_METHODS = re.compile(
    r"^(_?init|reset|load|save|register|hook|extra_repr|state_dict|apply|to|cuda|cpu|train|eval|"
    r"parameters|buffers|modules|children|named_|zero_grad|share_memory|prune|tie|resize|set_|get_|"
    r"post_init|generate|prepare_inputs|gradient_checkpointing|enable|disable)"
)


@dataclass
class Captured:
    """One traced callable: `method` of the module at `path` ("" = the model itself)."""

    path: str
    method: str
    graph: fx.Graph
    module: nn.Module
    modules: dict[str, nn.Module]  # relative path -> submodule, for call_module targets
    concrete: bool = False  # traced with fixed defaults: good for analysis, not for rewriting
    decided: tuple[str, ...] = ()  # metadata conditions decided while tracing (the code's branch is baked)

    def full(self, rel: str) -> str:
        """A path relative to this module -> the path from the model's root."""
        return f"{self.path}.{rel}" if self.path and rel else (self.path or rel)

    @property
    def site(self) -> str:
        where = self.path or "<model>"
        return where if self.method == "forward" else f"{where}.{self.method}"


@dataclass(frozen=True)
class CaptureResult:
    """What capture produced: the graphs traced, the modules whose forward did not trace (path -> first
    line of the error), and how many modules it tried."""

    graphs: tuple[Captured, ...] = ()
    failures: Mapping[str, str] = field(default_factory=dict)
    tried: int = 0

    @property
    def traced(self) -> int:
        """Modules whose own forward traced as it is (rewritable)."""
        return len({c.path for c in self.graphs if c.method == "forward" and not c.concrete})

    @property
    def summary(self) -> str:
        methods = sum(1 for c in self.graphs if c.method != "forward")
        fixed = sum(1 for c in self.graphs if c.concrete)
        extra = [f"{fixed} more with flags fixed (analysis only)"] if fixed else []
        extra += [f"{methods} methods of modules that did not trace"] if methods else []
        counts = f"capture: traced {self.traced}/{self.tried} candidate modules"
        return counts + "".join(f", {e}" for e in extra)


@dataclass(frozen=True)
class Capture:
    """The capture pass: trace every module of the model that could hold an FFN."""

    name: ClassVar[str] = "capture"
    modifies_model: ClassVar[bool] = False
    preserves_computation: ClassVar[bool] = True

    def run(self, model: nn.Module) -> CaptureResult:
        return capture(model)


class _Tracer(fx.Tracer):
    def __init__(self, leaves: set[int], lenient: bool = False, home=None):
        super().__init__()
        self._leaves = leaves
        self._lenient = lenient
        self._home = home or (None, None)
        self.decided: list[str] = []

    def to_bool(self, obj) -> bool:
        if self._home[0] is not None:
            try:
                value = bool(metadata.decide(obj.node, *self._home))
                self.decided.append(f"{metadata.render(obj.node)} taken as {value}")
                return value
            except metadata.Undecidable:
                pass
        # Analysis-only tries take the False branch of data-dependent conditions (HF layers test
        # `hidden_states.dtype == torch.float16` before clamping): the FFN's data flow does not change.
        if self._lenient:
            return False
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self._leaves or is_atom(m):
            return True
        return super().is_leaf_module(m, qualname)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


_TRACED = "_moeify_traced_fn"


def _trace(
    module: nn.Module, leaves: set[int], method: str = "forward", concrete_args: dict | None = None, fn=None
) -> tuple[fx.Graph, tuple[str, ...]]:
    """Trace `module.<method>`, or the plain function `fn` as if it were a method of module's class;
    returns the graph and the metadata conditions decided on the way."""
    tracer = _Tracer(leaves, lenient=concrete_args is not None or fn is not None, home=metadata.home(module))
    tracer.traced_func_name = method
    cls = type(module)
    if fn is not None:  # fx traces a class attribute: lend the function one, for this call only
        setattr(cls, _TRACED, fn)
        tracer.traced_func_name = _TRACED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = tracer.trace(module, concrete_args=concrete_args)
        metadata.drop_dead(graph)
        return graph, tuple(tracer.decided)
    finally:
        if fn is not None:
            delattr(cls, _TRACED)


def _fixed(fn) -> dict | None:
    """Values to fix for a second, analysis-only try: non-tensor defaults (flags, None masks), and
    nothing for `*args` / `**kwargs` (HF 5 passes `**kwargs` everywhere; a proxy cannot be unpacked)."""
    try:
        params = list(inspect.signature(fn).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    fixed = {}
    for p in params:
        if p.kind is p.VAR_KEYWORD:
            fixed[f"**{p.name}"] = {}
        elif p.kind is p.VAR_POSITIONAL:
            fixed[f"*{p.name}"] = ()
        elif p.default is not inspect.Parameter.empty and isinstance(
            p.default, (bool, int, float, str, type(None))
        ):
            fixed[p.name] = p.default
    return fixed or None


def _methods(module: nn.Module, linear_children: set[str]) -> list[str]:
    """Methods of module's own classes that take a tensor and call a child holding linear-likes."""
    names = []
    for cls in type(module).__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith(
            ("torch.nn.modules.module", "transformers.modeling_utils", "transformers.generation")
        ):
            continue
        for name, fn in vars(cls).items():
            if (
                name in names
                or name == "forward"
                or name.startswith("__")
                or _SKIP_METHODS.match(name.lstrip("_"))
            ):
                continue
            if not inspect.isfunction(fn):
                continue
            try:
                params = list(inspect.signature(fn).parameters.values())[1:]
            except (TypeError, ValueError):
                continue
            required = [
                p
                for p in params
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            if not required or any(p.kind is p.KEYWORD_ONLY for p in required):
                continue  # needs at least one tensor, and nothing we could not pass positionally
            if not set(fn.__code__.co_names) & linear_children:
                continue
            names.append(name)
    return names


def _matrices(module: nn.Module, enough: int) -> int:
    """Linear-likes and raw 2-D parameters below `module`, counted up to `enough`."""
    count = 0
    for m in module.modules():
        if is_linear_module(m):
            count += 1
        elif not is_atom(m):
            count += sum(1 for p in m.parameters(recurse=False) if p.dim() == 2)
        if count >= enough:
            break
    return count


def _may_hold_ffn(module: nn.Module) -> bool:
    """Two matrices somewhere below (linear-likes or raw parameters): the least an FFN needs."""
    return _matrices(module, 2) >= 2


def capture(model: nn.Module) -> CaptureResult:
    """Trace every module of `model` that could hold an FFN, children first."""
    graphs: list[Captured] = []
    failures: dict[str, str] = {}
    tried = 0
    failed: set[int] = set()
    named = list(model.named_modules())
    for path, module in reversed(named):  # reversed pre-order: every module after its descendants
        if is_atom(module) or isinstance(module, (nn.ModuleList, nn.ModuleDict)) or not _may_hold_ffn(module):
            continue
        tried += 1
        modules = dict(module.named_modules())
        try:
            graph, decided = _trace(module, failed)
            graphs.append(Captured(path, "forward", graph, module, modules, decided=decided))
            continue
        except Exception as exc:  # any failure of user code under tracing makes this module a leaf
            failures[path] = _first_line(exc)
            failed.add(id(module))
        # second try, analysis-only: the undecorated forward (HF wraps it in a *args/**kwargs
        # checkpointing shim) with flags and **kwargs fixed
        forward = inspect.unwrap(type(module).forward)
        fixed = _fixed(forward)
        if fixed or forward is not type(module).forward:
            try:
                graph, decided = _trace(module, failed - {id(module)}, concrete_args=fixed, fn=forward)
                graphs.append(Captured(path, "forward", graph, module, modules, True, decided))
            except Exception:  # the second try is best effort; the first error is the one reported
                pass
        linear_children = {name for name, child in module.named_children() if _matrices(child, 1) >= 1}
        for method in _methods(module, linear_children):
            try:
                graph, decided = _trace(module, failed - {id(module)}, method=method)
            except Exception:  # a method that does not trace is simply not a capture site
                continue
            graphs.append(Captured(path, method, graph, module, modules, decided=decided))
    return CaptureResult(tuple(graphs), failures, tried)


__all__ = ["Capture", "Captured", "CaptureResult", "capture"]
