"""Recycled stacked-gradient memory (`moeify.dispatch.buffers`): reused only when nothing refers to it.

The pool normally serves only buffers of 32 MiB and up; these tests lower that bound to 0 so that tiny
layers go through it.
"""

from __future__ import annotations

import pytest
import torch

from moeify.dispatch import buffers, grouped_ffn
from moeify.dispatch.reference import reference_grouped_ffn

T, D, H, E = 12, 6, 5, 3


class PoolWatch:
    """The pool is process-wide and tensors from earlier tests may still hold some of it: tests read how
    much it grew since they started."""

    def __init__(self):
        self.start = buffers.pooled_bytes()

    def grown(self) -> int:
        return buffers.pooled_bytes() - self.start


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    previous = buffers.set_grad_buffer_recycling(True)
    buffers.release_grad_buffers()
    yield PoolWatch()
    buffers.release_grad_buffers()
    buffers.set_grad_buffer_recycling(previous)


def make_layer(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(
        w1=torch.randn(E, H, D, generator=g, dtype=torch.float64).requires_grad_(True),  # [E, H, D]
        w2=torch.randn(E, D, H, generator=g, dtype=torch.float64).requires_grad_(True),  # [E, D, H]
        b1=None, b2=None)


def step_inputs(seed: int) -> dict:
    g = torch.Generator().manual_seed(100 + seed)
    return dict(x=torch.randn(T, D, generator=g, dtype=torch.float64),  # [T, D]
                token_idx=torch.arange(T), expert_idx=torch.randint(0, E, (T,), generator=g),
                weight=torch.rand(T, generator=g, dtype=torch.float64))


def backward(fn, layer: dict, seed: int) -> None:
    fn(**step_inputs(seed), **layer, activation="gelu", gated=False).square().sum().backward()


def reference_grads(layer: dict, seeds: list[int]) -> list[torch.Tensor]:
    """w1 and w2 grads accumulated over the seeds' steps, by the reference on a copy of the layer."""
    copy = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in layer.items()}
    for seed in seeds:
        backward(reference_grouped_ffn, copy, seed)
    return [copy["w1"].grad, copy["w2"].grad]


def test_set_to_none_steps_reuse_the_same_memory_and_stay_right(pool):
    layer = make_layer()
    backward(grouped_ffn, layer, seed=0)
    first_ptr = layer["w1"].grad.data_ptr()
    for seed in (1, 2):
        layer["w1"].grad = layer["w2"].grad = None  # zero_grad(set_to_none=True)
        backward(grouped_ffn, layer, seed)
        assert layer["w1"].grad.data_ptr() == first_ptr  # recycled, not a fresh allocation
        torch.testing.assert_close([layer["w1"].grad, layer["w2"].grad], reference_grads(layer, [seed]))
    assert pool.grown() == 2 * E * H * D * 8  # one w1-sized and one w2-sized buffer, nothing more


@pytest.mark.parametrize("kept", ["grad", "view"])
def test_a_gradient_still_referenced_is_never_overwritten(kept, pool):
    layer = make_layer()
    backward(grouped_ffn, layer, seed=0)
    held = layer["w1"].grad if kept == "grad" else layer["w1"].grad[1:]
    snapshot = held.clone()
    layer["w1"].grad = layer["w2"].grad = None
    backward(grouped_ffn, layer, seed=1)
    torch.testing.assert_close(held, snapshot, rtol=0, atol=0)
    assert layer["w1"].grad.data_ptr() != held.data_ptr() - (held.storage_offset() * held.element_size())
    torch.testing.assert_close([layer["w1"].grad, layer["w2"].grad], reference_grads(layer, [1]))


def test_accumulation_without_zero_grad_sums_the_steps(pool):
    layer = make_layer()
    for seed in (0, 1, 2):
        backward(grouped_ffn, layer, seed)
    torch.testing.assert_close([layer["w1"].grad, layer["w2"].grad], reference_grads(layer, [0, 1, 2]))


def test_release_gives_back_only_unused_buffers(pool):
    layer = make_layer()
    backward(grouped_ffn, layer, seed=0)
    assert pool.grown() == 2 * E * H * D * 8
    assert buffers.release_grad_buffers() == 0  # both buffers are live .grad tensors
    layer["w2"].grad = None
    assert buffers.release_grad_buffers() == E * D * H * 8
    assert pool.grown() == E * H * D * 8  # w1's, still in use, is kept


def test_recycling_off_allocates_fresh_and_empties_the_pool(pool):
    layer = make_layer()
    backward(grouped_ffn, layer, seed=0)
    layer["w1"].grad = layer["w2"].grad = None
    buffers.set_grad_buffer_recycling(False)
    assert pool.grown() == 0
    backward(grouped_ffn, layer, seed=1)
    assert pool.grown() == 0
    torch.testing.assert_close([layer["w1"].grad, layer["w2"].grad], reference_grads(layer, [1]))


def test_small_buffers_bypass_the_pool(pool, monkeypatch):
    monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 30)
    backward(grouped_ffn, make_layer(), seed=0)
    assert pool.grown() == 0


def test_saved_activations_are_recycled_between_steps(pool, monkeypatch):
    """The training forward's saved h and a come from the pool too (from SAVED_MIN_BYTES up): after the
    first step the pool stops growing, and every step's grads match the reference."""
    monkeypatch.setattr(buffers, "SAVED_MIN_BYTES", 0)
    layer = make_layer()
    sizes = []
    for seed in (0, 1, 2):
        layer["w1"].grad = layer["w2"].grad = None
        backward(grouped_ffn, layer, seed)
        torch.testing.assert_close([layer["w1"].grad, layer["w2"].grad], reference_grads(layer, [seed]))
        sizes.append(pool.grown())
    assert sizes[0] > 2 * E * H * D * 8  # more than the two weight gradients: h and a are pooled
    assert sizes[0] == sizes[1] == sizes[2]
