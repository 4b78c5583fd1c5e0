"""What every ONNX lowering of an MoE layer's experts provides (`Lowering`), and the choice for one layer
(`Plan`). One file per lowering in this folder fills a `Lowering`; `moeify.lowering.export` lists them in
order of preference.

A lowering replaces only the *experts* step of `MoELayer.forward` (route -> experts -> + shared): while
exporting, `MoELayer.experts` calls the chosen lowering's `experts`, which emits the torch op its
translation maps to one ONNX node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class Lowering:
    """One way to express a layer's experts in ONNX.

    Fields:
        name: the ONNX op as "domain.OpType" (the name routers list in `RouterCapabilities.lowerings`), or a
            description for a lowering that emits standard ops.
        eligible: (layer, target) -> None when this lowering can express the layer for `target` ("ort" or
            "portable"), else the reason it cannot (shown in the export report). Called outside tracing.
        experts: (layer, x [T, D], routing) -> [T, D], the experts step while exporting (torch ops).
        translations: () -> {torch op overload: onnxscript function}, for torch.onnx.export's
            custom_translation_table.
        schema: () -> onnx OpSchema of the op (None for a standard-op lowering).
        body: (activation, gated, has_b1, has_b2, opset) -> onnx_ir Function, the op's standard-op body
            attached to the model (inlined for the portable target); None when the op has none.
        bias_inputs: positions of b1 and b2 among the op's inputs (to pick the body's overload).
        any_router: offered to every layer, not only to routers that list `name` (the standard-op fallback).
    """

    name: str
    eligible: Callable[[object, str], str | None]
    experts: Callable[[object, Tensor, object], Tensor]
    translations: Callable[[], dict] = dict
    schema: Callable[[], object] | None = None
    body: Callable[..., object] | None = None
    bias_inputs: tuple[int, int] | None = None
    any_router: bool = False

    @property
    def domain(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def op_type(self) -> str:
        return self.name.rpartition(".")[2]


@dataclass(frozen=True)
class Plan:
    """The lowering chosen for one layer and why (the rejections of the ones preferred to it)."""

    lowering: Lowering
    reason: str
    rejected: dict[str, str] = field(default_factory=dict)  # lowering name -> why not

    def label(self, target: str) -> str:
        """The op as the export report shows it: a function-bodied op is inlined on the portable target."""
        inlined = target == "portable" and self.lowering.body is not None
        return f"{self.lowering.name} (inlined)" if inlined else self.lowering.name
