"""The pure-torch grouped path (activations given as callables) against the slow reference."""

from __future__ import annotations

import pytest
import torch

from moeify.dispatch import grouped_ffn, soft_experts
from moeify.dispatch.reference import reference_grouped_ffn, reference_soft_experts
from moeify.dispatch.torch_path import torch_grouped_ffn
from tests.activations_zoo import SquaredReLU, learned_prelu
from tests.dispatch.test_dispatch import E, H, make_inputs

# uneven groups, an empty expert (1), dropped assignments (expert E)
EXPERTS = [0, 3, 0, 2, 4, 0, 3, E, 0, 3, 4, E, 0]


def _activation(kind: str):
    if kind == "function":
        return torch.tanh
    modules = {"squared_relu": SquaredReLU(), "prelu": learned_prelu(), "prelu_per_channel": learned_prelu(H)}
    return modules[kind].double()


@pytest.mark.parametrize("kind", ["squared_relu", "prelu", "prelu_per_channel", "function"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_torch_path_matches_reference_forward_and_backward(kind, gated, bias):
    act = _activation(kind)
    inputs = make_inputs(gated, bias, EXPERTS)
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    leaves += list(act.parameters()) if isinstance(act, torch.nn.Module) else []

    def run(fn):
        out = fn(**inputs, activation=act, gated=gated)
        grads = torch.autograd.grad((out * out.detach().sin()).sum(), leaves)
        return out, grads

    out, grads = run(torch_grouped_ffn)
    want, want_grads = run(reference_grouped_ffn)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    for got_g, want_g in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got_g, want_g, atol=1e-12, rtol=1e-10)
    assert out.abs().max() > 0


def test_grouped_ffn_sends_callables_to_the_torch_path():
    inputs = make_inputs(True, True, EXPERTS)
    act = SquaredReLU()
    got = grouped_ffn(**inputs, activation=act, gated=True)
    torch.testing.assert_close(got, torch_grouped_ffn(**inputs, activation=act, gated=True), atol=0, rtol=0)
    by_name = grouped_ffn(**inputs, activation="relu", gated=True)
    assert not torch.allclose(got, by_name)  # squared, not plain, relu


@pytest.mark.parametrize("gated", [False, True])
def test_soft_experts_with_a_module(gated):
    g = torch.Generator().manual_seed(1)
    T, D, S = 7, 6, 2
    H1 = 2 * H if gated else H
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    dispatch = torch.randn(T, E * S, generator=g, dtype=torch.float64).softmax(0)
    combine = torch.randn(T, E * S, generator=g, dtype=torch.float64).softmax(1)
    w1 = torch.randn(E, H1, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, D, H, generator=g, dtype=torch.float64)
    act = learned_prelu(H).double()
    got = soft_experts(x, dispatch, combine, w1, None, w2, None, act, gated)
    want = reference_soft_experts(x, dispatch, combine, w1, None, w2, None, act, gated)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
