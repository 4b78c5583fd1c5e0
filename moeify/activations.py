"""Expert activations by name.

Gating is orthogonal to the activation: a gated expert applies `act(gate) * up`, so SwiGLU is
("silu", gated) and GeGLU is ("gelu", gated). Each activation also has a derivative, which the
dispatch kernel's hand-written backward uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def _d_relu(x: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _d_gelu(x: Tensor) -> Tensor:
    # d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
    cdf = 0.5 * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + x * pdf


def _d_gelu_tanh(x: Tensor) -> Tensor:
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3 * 0.044715 * x * x)


def _d_silu(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 + x * (1.0 - s))


def _d_quick_gelu(x: Tensor) -> Tensor:
    s = torch.sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


def _d_identity(x: Tensor) -> Tensor:
    return torch.ones_like(x)


# name -> (function, derivative)
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "relu": (F.relu, _d_relu),
    "gelu": (F.gelu, _d_gelu),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), _d_gelu_tanh),
    "silu": (F.silu, _d_silu),
    "quick_gelu": (_quick_gelu, _d_quick_gelu),
    "identity": (lambda x: x, _d_identity),
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[name][0]


def activation_grad(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[name][1]


def apply_expert_activation(h: Tensor, activation: str, gated: bool) -> Tensor:
    """h [N, H] (or [N, 2H] = [gate | up] when gated) -> activated hidden [N, H]."""
    act = activation_fn(activation)
    if not gated:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up
