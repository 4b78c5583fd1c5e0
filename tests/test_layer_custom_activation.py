"""MoELayer with an activation given as a module (config.activation == "custom").

Shape legend: T tokens, D model width, H expert hidden width, E experts.
"""

from __future__ import annotations

import io

import pytest
import torch

import moeify
from moeify.config import ConfigError
from moeify.routing import SoftRouting
from tests.activations_zoo import SquaredReLU, learned_prelu

D, H, E = 8, 12, 4


def _config(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**dict(d_model=D, d_ff=H, num_experts=E, k=2, activation="custom"), **kw})


def _module(kind: str):
    return SquaredReLU() if kind == "squared_relu" else learned_prelu()


def _layer(kind: str, **kw) -> moeify.MoELayer:
    torch.manual_seed(0)
    layer = moeify.MoELayer(_config(**kw), activation=_module(kind))
    with torch.no_grad():
        if layer.b1 is not None:
            layer.b1.normal_()
            layer.b2.normal_()
        if layer.router.learned:
            layer.router.weight.normal_(std=0.5)
    return layer


def dense_reference(layer: moeify.MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the routing's weights as a dense [T, E] matrix: the
    layer's function written the plain way."""
    act, gated = layer.activation, layer.config.gated
    routing = layer.router(x)
    outs = []
    for e in range(E):
        h = x @ layer.w1[e].t() + (0 if layer.b1 is None else layer.b1[e])  # [T, H1]
        a = act(h[:, :H]) * h[:, H:] if gated else act(h)  # [T, H]
        outs.append(a @ layer.w2[e].t() + (0 if layer.b2 is None else layer.b2[e]))  # [T, D]
    y = torch.stack(outs, dim=1)  # [T, E, D]
    if isinstance(routing, SoftRouting):
        raise AssertionError("dense_reference is for sparse routings")
    combine = torch.zeros(x.shape[0], E + 1, dtype=x.dtype)  # [T, E+1], column E: dropped
    combine = combine.index_put((routing.token_idx, routing.expert_idx), routing.weight.to(x.dtype),
                                accumulate=True)[:, :E]
    out = (combine.unsqueeze(-1) * y).sum(1)  # [T, D]
    return out + layer.shared(x) if layer.shared is not None else out


def test_custom_needs_a_module_and_a_module_needs_custom():
    with pytest.raises(ConfigError, match="needs the module"):
        moeify.MoELayer(_config())
    with pytest.raises(ConfigError, match='config.activation must be "custom"'):
        moeify.MoELayer(_config(activation="relu"), activation=SquaredReLU())
    with pytest.raises(ConfigError, match="unknown activation"):
        _config(activation="squared_relu")


@pytest.mark.parametrize("kind", ["squared_relu", "prelu"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("extra", [{}, {"bias": False, "num_shared_experts": 1, "shared_d_ff": 6},
                                   {"capacity_factor": 0.5}])
def test_forward_equals_dense_reference_and_backward_reaches_everything(kind, gated, extra):
    layer = _layer(kind, gated=gated, **extra)
    x = torch.randn(2, 9, D, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    with torch.no_grad():
        want = dense_reference(layer, x.reshape(-1, D)).reshape(x.shape)
    assert (out - want).abs().max() <= 1e-6
    assert out.abs().max() > 0.1
    layer.dispatch_impl = "reference"  # the slow per-expert loop (its matmuls round a little differently)
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
    layer.dispatch_impl = "fast"
    (out.square().mean() + layer.last_aux_loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if kind == "prelu":
        assert "activation.weight" in dict(layer.named_parameters())


def test_soft_router_with_a_module_matches_reference():
    layer = _layer("prelu", router="soft", slots_per_expert=2, gated=True)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    layer.dispatch_impl = "reference"
    torch.testing.assert_close(layer(x), out, atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert layer.activation.weight.grad is not None


def test_the_module_is_saved_and_loaded_with_the_layer():
    layer = _layer("prelu", gated=True)
    with torch.no_grad():
        layer.activation.weight.fill_(0.3)
    assert "activation.weight" in layer.state_dict()
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = moeify.MoELayer(_config(gated=True), activation=learned_prelu())
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.activation.weight.item() == pytest.approx(0.3)
    x = torch.randn(6, D)
    torch.testing.assert_close(fresh(x), layer(x), atol=0, rtol=0)


def test_a_learned_activation_trains():
    layer = _layer("prelu")
    before = layer.activation.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(3))
    loss = (layer(x) - x).square().mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(layer.activation.weight, before)
