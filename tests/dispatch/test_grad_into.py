"""Gradient accumulation straight into `.grad` (`moeify::grouped_ffn_backward_into`): when autograd would add
the stacked weight gradients into existing `.grad` tensors in place, the backward does the add itself.

Every test compares against the slow reference dispatch (plain autograd ops, float64), and checks which path
ran: the into-op when autograd would accumulate in place, the plain backward otherwise (hooks,
`torch.autograd.grad`, `backward(inputs=...)` leaving the weights out, `create_graph`).
"""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.dispatch import ops
from tests.dispatch.test_dispatch import WITH_DROPPED, D, T, make_inputs


def make_layer(impl: str, bias: bool = False, gated: bool = False) -> moeify.MoELayer:
    torch.manual_seed(0)
    cfg = moeify.MoEConfig(d_model=8, d_ff=12, num_experts=4, k=2, activation="gelu", gated=gated, bias=bias)
    layer = moeify.MoELayer(cfg).double()
    layer.dispatch_impl = impl
    return layer


@pytest.fixture
def into_calls(monkeypatch) -> list[tuple[bool, bool]]:
    """Records, per backward of the fast op, which of (w1, w2) were added into `.grad` by the backward."""
    calls: list[tuple[bool, bool]] = []
    original = ops._backward

    def spy(*args, into=(None, None), **kwargs):
        calls.append((into[0] is not None, into[1] is not None))
        return original(*args, into=into, **kwargs)

    monkeypatch.setattr(ops, "_backward", spy)
    return calls


def steps(layer: moeify.MoELayer, x: torch.Tensor, grads: list[torch.Tensor]) -> None:
    """Backward of several steps with no zero_grad between them (gradient accumulation)."""
    for g in grads:
        layer(x).backward(g)


@pytest.mark.parametrize("bias,gated", [(False, False), (True, True)])
def test_accumulated_grads_equal_the_reference(into_calls, bias, gated):
    x = torch.randn(10, 8, dtype=torch.float64)  # [T, D]
    grads = [torch.randn(10, 8, dtype=torch.float64) for _ in range(3)]  # [T, D] each
    fast, ref = make_layer("fast", bias, gated), make_layer("reference", bias, gated)
    steps(fast, x, grads)
    steps(ref, x, grads)
    for (name, got), want in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, msg=name)
    assert into_calls == [(False, False), (True, True), (True, True)]  # the first step has no .grad yet


def test_grad_tensor_is_updated_in_place(into_calls):
    layer, x = make_layer("fast"), torch.randn(10, 8, dtype=torch.float64)
    steps(layer, x, [torch.randn(10, 8, dtype=torch.float64)])
    held = layer.w1.grad
    before = held.clone()
    steps(layer, x, [torch.randn(10, 8, dtype=torch.float64)])
    assert layer.w1.grad is held and not torch.equal(held, before)


def test_autograd_grad_leaves_dot_grad_alone(into_calls):
    layer, x = make_layer("fast"), torch.randn(10, 8, dtype=torch.float64)
    g = torch.randn(10, 8, dtype=torch.float64)
    steps(layer, x, [g])
    kept = layer.w1.grad.clone()
    (got,) = torch.autograd.grad(layer(x), [layer.w1], g)
    torch.testing.assert_close(got, kept)  # same input, same gradient
    torch.testing.assert_close(layer.w1.grad, kept)
    assert into_calls[-1] == (False, False)


def test_backward_with_inputs_leaving_out_the_weights(into_calls):
    layer = make_layer("fast")
    x = torch.randn(10, 8, dtype=torch.float64, requires_grad=True)  # [T, D]
    g = torch.randn(10, 8, dtype=torch.float64)
    steps(layer, x, [g])
    kept = layer.w2.grad.clone()
    layer(x).backward(g, inputs=[x])
    torch.testing.assert_close(layer.w2.grad, kept)
    assert into_calls[-1] == (False, False)


def test_a_hook_on_a_weight_sees_its_gradient(into_calls):
    layer, x = make_layer("fast"), torch.randn(10, 8, dtype=torch.float64)
    grads = [torch.randn(10, 8, dtype=torch.float64) for _ in range(2)]
    seen = []
    layer.w1.register_hook(lambda g: seen.append(g.clone()))
    steps(layer, x, grads)
    assert len(seen) == 2
    torch.testing.assert_close(layer.w1.grad, seen[0] + seen[1])
    assert into_calls[-1] == (False, True)  # w2 has no hook


def test_create_graph_builds_the_graph_of_the_sum(into_calls):
    layer, x = make_layer("fast"), torch.randn(10, 8, dtype=torch.float64)
    g = torch.randn(10, 8, dtype=torch.float64)
    steps(layer, x, [g])
    kept = layer.w2.grad.clone()
    layer(x).backward(g, create_graph=True)
    torch.testing.assert_close(layer.w2.grad, 2 * kept)
    assert into_calls[-1] == (False, False)
    for p in layer.parameters():  # break the parameter <-> gradient reference cycle create_graph makes
        p.grad = None


def test_into_op_adds_exactly_the_backward_op_grads():
    """The into-op (with dropped assignments, an empty expert, bias, gated) adds into acc_w1/acc_w2 what the
    plain backward op returns, and returns the other grads unchanged; schema and fake kernel checked."""
    inp = make_inputs(True, True, WITH_DROPPED)
    args = tuple(t.detach() if t is not None else None for t in inp.values())
    with torch.no_grad():
        saved = ops.grouped_ffn_train_op(*args, "silu", True)[1:]  # h, a, y
    grad_out, mask = torch.randn(T, D, dtype=torch.float64), [True] * 6
    common = (grad_out, *args, *saved, "silu", True, mask)
    want = ops.grouped_ffn_backward_op(*common)
    acc_w1, acc_w2 = torch.randn_like(inp["w1"]), torch.randn_like(inp["w2"])
    start_w1, start_w2 = acc_w1.clone(), acc_w2.clone()
    got = ops.grouped_ffn_backward_into_op(*common, acc_w1, acc_w2)
    torch.testing.assert_close(acc_w1, start_w1 + want[2])
    torch.testing.assert_close(acc_w2, start_w2 + want[4])
    assert got[2].numel() == 0 and got[4].numel() == 0
    for i in (0, 1, 3, 5):
        torch.testing.assert_close(got[i], want[i])
    torch.library.opcheck(ops.grouped_ffn_backward_into_op, (*common, acc_w1, acc_w2),
                          test_utils=("test_schema", "test_faketensor"))
