"""The export target flag: which ONNX target the layers are being lowered for, if any.

`export_onnx` sets it for the duration of one export (a context variable, not a module global, so two
threads exporting at once do not see each other's target), with the `Plan` it chose for each layer.
`MoELayer.experts` reads it while `torch.compiler.is_exporting()` to run its lowering's op instead
(`moeify.lowering.export.lowered_experts`), which records the plan each layer used, for the export report.
This module imports nothing heavy: the layer imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

TARGETS = ("ort", "portable")


# The attribute that names a layer during one export: torch.export may trace a *copy* of the model (seen
# with activation modules), so plans are found by this name, which copies keep, not by id(layer).
_NAME_ATTR = "_moeify_export_name"


@dataclass
class ExportState:
    target: str
    plans: dict[str, object] = field(default_factory=dict)  # layer name -> Plan decided before tracing
    lowerings: dict[str, object] = field(default_factory=dict)  # layer name -> Plan actually used


_STATE: ContextVar[ExportState | None] = ContextVar("moeify_export_state", default=None)


def export_target() -> str | None:
    """"ort" or "portable" inside `exporting_for(...)`, else None."""
    state = _STATE.get()
    return None if state is None else state.target


def planned_lowering(layer):
    """The Plan `export_onnx` decided for `layer` before tracing, if any."""
    state = _STATE.get()
    return None if state is None else state.plans.get(getattr(layer, _NAME_ATTR, None))


def record_lowering(layer, plan) -> None:
    state = _STATE.get()
    if state is not None:
        state.lowerings[getattr(layer, _NAME_ATTR, f"<layer {id(layer)}>")] = plan


@contextlib.contextmanager
def exporting_for(target: str, plans: dict[str, object] | None = None,
                  layers: dict[str, object] | None = None) -> Iterator[ExportState]:
    """Lower MoE layers for `target` ("ort" or "portable") while the block runs.

    `layers` maps a name to each MoE layer, `plans` the same names to the layers' Plans (decided outside
    tracing: deciding may run onnxruntime). The layers carry their names while the block runs.
    """
    if target not in TARGETS:
        from moeify.errors import MoeifyError

        raise MoeifyError(f"unknown export target {target!r}; valid targets: {', '.join(TARGETS)}")
    layers = dict(layers or {})
    state = ExportState(target, dict(plans or {}))
    token = _STATE.set(state)
    try:
        for name, layer in layers.items():
            setattr(layer, _NAME_ATTR, name)
        yield state
    finally:
        for layer in layers.values():
            if hasattr(layer, _NAME_ATTR):
                delattr(layer, _NAME_ATTR)
        _STATE.reset(token)
