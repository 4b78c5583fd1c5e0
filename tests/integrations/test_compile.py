"""`torch.compile` (default inductor backend, CPU) on a converted model's training step: the eager numbers,
and no graph break inside the MoE layer. Inductor compiles C++ on CPU (needs a C++ compiler)."""

import copy
import shutil

import pytest
import torch

import moeify
from moeify.zoo import tiny_mlp

pytestmark = pytest.mark.slow  # inductor codegen + a C++ build: minutes on 2 shared cores


def _model():
    torch.manual_seed(0)
    model = moeify.convert(tiny_mlp(), experts=4, k=2).train()
    with torch.no_grad():  # experts that differ and a router that matters, so a wrong dispatch would show
        for m in model.modules():
            if isinstance(m, moeify.MoELayer):
                for p in (m.w1, m.w2, m.router.weight):
                    p.add_(torch.randn(p.shape) * p.std() * 0.5)
    return model


def _step(model, forward, ids, opt):
    """One training step: forward (eager or compiled), loss + aux loss, backward, SGD. Returns loss, grads."""
    opt.zero_grad(set_to_none=True)
    logits = forward(ids)  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss = loss + moeify.aux_loss(model)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return loss.detach(), grads


def test_no_graph_break_inside_the_moe_layer():
    layer = next(m for m in _model().modules() if isinstance(m, moeify.MoELayer))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(torch.randn(2, 16, 32))  # [B, S, D]
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU needs a C++ compiler")
def test_compiled_training_steps_match_eager():
    eager = _model()
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    forward = torch.compile(compiled)  # default backend: inductor
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    for step in range(2):  # the second step runs the cached graphs on updated weights
        ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(step))
        loss_e, grads_e = _step(eager, eager, ids, opt_e)
        loss_c, grads_c = _step(compiled, forward, ids, opt_c)
        assert moeify.aux_loss(compiled).item() > 0  # the compiled layers recorded their aux losses
        torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e, strict=True):
            torch.testing.assert_close(g_c, g_e, rtol=0, atol=1e-5)
