"""Expert activations by name.

Gating is orthogonal to the activation: a gated expert applies `act(gate) * up`, so SwiGLU is
("silu", gated) and GeGLU is ("gelu", gated). Each activation also has a derivative, which the
dispatch kernel's hand-written backward uses.

Each named function is the very call a dense model makes (`F.mish` for nn.Mish, `torch.square(F.relu(x))`
for transformers' ReLUSquaredActivation), so experts copied from a dense FFN compute exactly what it did.
Parametrised activations are named only at their defaults (nn.LeakyReLU(0.01), nn.ELU(1.0),
nn.Softplus(1, 20)); any other elementwise activation is "custom": the experts carry a module computing it
(see moeify.passes.activation_module).
An expert activation may also be a module or function (`MoEConfig.activation == CUSTOM`, the callable given
to `MoELayer(activation=...)`): it is applied elementwise, and the experts then run a pure-torch path with
ordinary autograd (`moeify.dispatch.torch_path`), since the fast kernel knows activations by name.
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


def _relu2(x: Tensor) -> Tensor:  # squared ReLU (Primer; Nemotron, Arcee): as ReLUSquaredActivation
    return torch.square(F.relu(x))


def _d_relu2(x: Tensor) -> Tensor:
    return 2.0 * F.relu(x)


def _d_tanh(x: Tensor) -> Tensor:
    t = torch.tanh(x)
    return 1.0 - t * t


def _d_sigmoid(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1.0 - s)


def _d_mish(x: Tensor) -> Tensor:
    # d/dx [x tanh(softplus(x))] = tanh(sp) + x (1 - tanh(sp)^2) sigmoid(x)
    t = torch.tanh(F.softplus(x))
    return t + x * (1.0 - t * t) * torch.sigmoid(x)


def _d_elu(x: Tensor) -> Tensor:  # alpha = 1
    return torch.where(x > 0, torch.ones_like(x), torch.exp(x))


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _d_selu(x: Tensor) -> Tensor:
    return _SELU_SCALE * torch.where(x > 0, torch.ones_like(x), _SELU_ALPHA * torch.exp(x))


def _d_leaky_relu(x: Tensor) -> Tensor:  # negative_slope = 0.01
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, 0.01))


def _d_softplus(x: Tensor) -> Tensor:  # beta = 1, threshold = 20: linear above the threshold
    return torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))


def _d_hardswish(x: Tensor) -> Tensor:  # x relu6(x + 3) / 6
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), (2 * x + 3) / 6))


def _d_hardsigmoid(x: Tensor) -> Tensor:  # relu6(x + 3) / 6: 1/6 inside (-3, 3)
    # aten's own backward: its 1/6 is a float constant even for float64, and the fast path's gradients must
    # equal autograd's through F.hardsigmoid (the reference) to the last bit that float64 tests see.
    return torch.ops.aten.hardsigmoid_backward(torch.ones_like(x), x)


def _d_relu6(x: Tensor) -> Tensor:
    return ((x > 0) & (x < 6)).to(x.dtype)


def _d_softsign(x: Tensor) -> Tensor:  # x / (1 + |x|)
    return 1.0 / (1.0 + x.abs()) ** 2


# name -> (function, derivative)
ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "relu": (F.relu, _d_relu),
    "gelu": (F.gelu, _d_gelu),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), _d_gelu_tanh),
    "silu": (F.silu, _d_silu),
    "quick_gelu": (_quick_gelu, _d_quick_gelu),
    "identity": (lambda x: x, _d_identity),
    "relu2": (_relu2, _d_relu2),
    "tanh": (torch.tanh, _d_tanh),
    "sigmoid": (torch.sigmoid, _d_sigmoid),
    "mish": (F.mish, _d_mish),
    "elu": (F.elu, _d_elu),
    "selu": (F.selu, _d_selu),
    "leaky_relu": (F.leaky_relu, _d_leaky_relu),
    "softplus": (F.softplus, _d_softplus),
    "hardswish": (F.hardswish, _d_hardswish),
    "hardsigmoid": (F.hardsigmoid, _d_hardsigmoid),
    "relu6": (F.relu6, _d_relu6),
    "softsign": (F.softsign, _d_softsign),
}

CUSTOM = "custom"
"""The activation name of an FFN whose elementwise activation has no name here: its experts carry a module
computing it (a copy of the dense model's own), not a function looked up in ACTIVATIONS."""


Activation = str | Callable[[Tensor], Tensor]  # a name of ACTIVATIONS, or an elementwise callable


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[name][0]


def activation_grad(name: str) -> Callable[[Tensor], Tensor]:
    return ACTIVATIONS[name][1]


def apply_expert_activation(h: Tensor, activation: Activation, gated: bool) -> Tensor:
    """h [..., H] (or [..., 2H] = [gate | up] when gated) -> activated hidden [..., H].

    A callable activation sees a 2-D [rows, H] view (so a module with per-channel parameters, such as
    nn.PReLU(H), finds its channels on dim 1 whatever the leading dims are).
    """
    act = activation_fn(activation) if isinstance(activation, str) else _rows(activation)
    if not gated:
        return act(h)
    gate, up = h.chunk(2, dim=-1)
    return act(gate) * up


def _rows(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """fn applied to a [rows, H] view of its input, reshaped back."""
    return lambda h: fn(h.reshape(-1, h.shape[-1])).reshape(h.shape)
