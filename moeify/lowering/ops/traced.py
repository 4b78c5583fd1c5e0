"""Standard ONNX ops traced from PyTorch: the lowering of a layer whose activation is a module.

No named op carries an arbitrary activation (the moeify ops' `activation` attribute and ONNX Runtime's
`activation_type` are names), so such a layer's experts are exported as what the layer runs in PyTorch:
the pure-torch grouped path (`moeify.dispatch.torch_path`: sort by expert, per-expert MatMuls, the
activation module's own ops, scatter back) or the batched Soft MoE path, traced by torch.export into
standard ai.onnx ops. Same ops on both targets; still sparse (each expert multiplies only its own rows).
No torch op, schema or function body of its own.
"""

from __future__ import annotations

import torch

from moeify.lowering.ops.base import Lowering

Tensor = torch.Tensor

NAME = "standard ONNX ops (traced)"


def eligible(layer, target: str) -> str | None:
    return None  # any layer can be traced; preferred only when no named op fits


def experts(layer, x: Tensor, routing) -> Tensor:
    return layer.local_experts(x, routing)  # [T, D]


LOWERING = Lowering(name=NAME, eligible=eligible, experts=experts, any_router=True)
