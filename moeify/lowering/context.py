"""The export target flag: which ONNX target the layers are being lowered for, if any.

`export_onnx` sets it for the duration of one export (a context variable, not a module global, so two
threads exporting at once do not see each other's target). `MoELayer.forward` reads it while
`torch.compiler.is_exporting()` to switch to its export-time lowering (`moeify.lowering.hook`), and the hook
records which ONNX op each layer became, for the export report. This module imports nothing heavy: the
layer imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

TARGETS = ("ort", "portable")


@dataclass
class ExportState:
    target: str
    plans: dict[int, object] = field(default_factory=dict)  # id(layer) -> FusedPlan decided before tracing
    lowerings: dict[int, object] = field(default_factory=dict)  # id(layer) -> FusedPlan actually used


_STATE: ContextVar[ExportState | None] = ContextVar("moeify_export_state", default=None)


def export_target() -> str | None:
    """"ort" or "portable" inside `exporting_for(...)`, else None."""
    state = _STATE.get()
    return None if state is None else state.target


def planned_lowering(layer):
    """The FusedPlan `export_onnx` decided for `layer` before tracing, if any."""
    state = _STATE.get()
    return None if state is None else state.plans.get(id(layer))


def record_lowering(layer, plan) -> None:
    state = _STATE.get()
    if state is not None:
        state.lowerings[id(layer)] = plan


@contextlib.contextmanager
def exporting_for(target: str, plans: dict[int, object] | None = None) -> Iterator[ExportState]:
    """Lower MoE layers for `target` ("ort" or "portable") while the block runs.

    `plans` maps id(layer) to the layer's FusedPlan (decided outside tracing: deciding may run onnxruntime).
    """
    if target not in TARGETS:
        from moeify.errors import MoeifyError

        raise MoeifyError(f"unknown export target {target!r}; valid targets: {', '.join(TARGETS)}")
    state = ExportState(target, dict(plans or {}))
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)
