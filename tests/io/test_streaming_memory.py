"""Streaming conversion holds one expert at a time: the [E, ...] expert tensors are written in pieces of
one expert each (ShardWriter.write_part), never built whole, so the memory does not grow with E."""

import math
import sys

import pytest
import torch

import moeify
from moeify.io.shard_writer import ShardWriter, Slot
from moeify.io.sources import load_hf_dir
from moeify.io.streaming import convert_checkpoint
from tests.io.test_streaming import _assert_bit_identical, _checkpoint, _reference

transformers = pytest.importorskip("transformers")

INITS = {"copy": "copy", "noise": "noise", "drop": "drop", "split": "split",
         "granular": {"init": "granular", "granularity": 2}}
EXPERT_SUFFIXES = (".w1", ".w2", "gate_up_proj", "down_proj")


def _expert_pieces(monkeypatch) -> list[tuple[str, int, tuple[int, ...]]]:
    """Every write_part of an expert tensor: (name, bytes handed over, the tensor's planned shape); and
    the whole-layer fill and storage made unusable, so a streamed layer cannot fall back to them."""
    pieces = []
    original = ShardWriter.write_part

    def recording(self, name, tensor, start):
        if name.endswith(EXPERT_SUFFIXES):
            pieces.append((name, tensor.numel() * tensor.element_size(), self._place[name][2].shape))
        return original(self, name, tensor, start)

    def forbidden(*args, **kwargs):
        raise AssertionError("a whole [E, ...] expert tensor was built")

    monkeypatch.setattr(ShardWriter, "write_part", recording)
    monkeypatch.setattr(sys.modules["moeify.convert"], "_final_storage", forbidden)
    monkeypatch.setattr(sys.modules["moeify.upcycle.strategies"], "fill_experts", forbidden)
    return pieces


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["moeify", "mixtral"])
@pytest.mark.parametrize("init", list(INITS))
def test_largest_expert_piece_is_one_expert_whatever_e(tmp_path, monkeypatch, init, fmt):
    src = _checkpoint(tmp_path, "llama")
    largest = {}
    pieces = _expert_pieces(monkeypatch)
    for experts in (2, 8):
        pieces.clear()
        convert_checkpoint(src, tmp_path / f"e{experts}", fmt=fmt, experts=experts, k=2, init=INITS[init],
                           seed=3)
        assert pieces, "no expert tensor written in pieces"
        for name, nbytes, shape in pieces:
            assert shape[0] == experts and nbytes == math.prod(shape[1:]) * 4, name  # float32: one expert
        per_tensor = {name: sum(1 for n, _, _ in pieces if n == name) for name, _, _ in pieces}
        assert set(per_tensor.values()) == {experts}
        largest[experts] = max(nbytes for _, nbytes, _ in pieces)
    if init == "split":  # experts of d_ff / E: narrower as E grows
        assert largest[8] == largest[2] // 4
    else:  # d_ff (copy, noise, drop) or d_ff / G: the same whatever E
        assert largest[2] == largest[8]


def test_router_init_reading_the_experts_builds_the_layer_whole_and_matches(tmp_path):
    """avg_k reads every expert: that layer is built whole (the documented fallback), same bytes."""
    src = _checkpoint(tmp_path, "llama")
    options = dict(experts=4, k=2, init={"init": "split", "router_init": "avg_k"}, seed=3)
    convert_checkpoint(src, tmp_path / "stream", **options)
    _reference(src, tmp_path / "memory", options)
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")


def test_streamed_experts_equal_the_in_memory_layer(tmp_path):
    """upcycle_layer_lazily's experts, written piecewise, are what upcycle_layer fills (noise: RNG drawn
    in the same order)."""
    src = _checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    options = dict(experts=4, k=2, init="noise", seed=5)
    convert_checkpoint(src, tmp_path / "stream", max_shard_bytes=30_000, **options)
    moeify.save(moeify.convert(load_hf_dir(src).model, **options), tmp_path / "memory")
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")


def test_writer_pieces_in_any_order_equal_whole_writes(tmp_path):
    t = torch.arange(24, dtype=torch.float32).view(4, 2, 3)  # [E, 2, 3]
    small = torch.ones(5, dtype=torch.bfloat16)
    layout = [Slot("a", (4, 2, 3), torch.float32), Slot("b", (5,), torch.bfloat16)]
    for name in ("whole", "pieces"):
        (tmp_path / name).mkdir()
    whole = ShardWriter(tmp_path / "whole", layout, 64)
    whole.write("a", t)
    whole.write("b", small)
    pieces = ShardWriter(tmp_path / "pieces", layout, 64)
    pieces.write("b", small)  # another tensor first, and the experts backwards
    for e in reversed(range(4)):
        pieces.write_part("a", t[e], e * t[e].numel() * 4)
    assert whole.files() == pieces.files()
    for file in whole.files():
        assert (tmp_path / "whole" / file).read_bytes() == (tmp_path / "pieces" / file).read_bytes()


def test_writer_refuses_a_piece_outside_its_tensor_and_a_missing_piece(tmp_path):
    writer = ShardWriter(tmp_path, [Slot("a", (4, 3), torch.float32)], 1 << 20)
    with pytest.raises(RuntimeError, match="do not fit"):
        writer.write_part("a", torch.zeros(3), 40)
    writer.write_part("a", torch.zeros(3), 0)
    with pytest.raises(RuntimeError, match="not \\(or not exactly\\) written"):
        writer.files()
    writer.abort()
