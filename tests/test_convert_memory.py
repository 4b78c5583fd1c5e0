"""The in-memory `convert` keeps memory down: on its own copy, each dense FFN's weights go as soon as its
MoE layer holds them; the experts are filled in their final dtype, and the fast fill (no gather or
float32 round trip where none is needed) equals the reference one."""

import copy
import importlib
from types import SimpleNamespace

import pytest
import torch

import moeify
from moeify.upcycle._common import expert_rows, fill_from_partition
from moeify.upcycle.config import DenseFFNWeights

pytest.importorskip("transformers")


def _spy_on_dense(monkeypatch, names: list[str]) -> list[list[str]]:
    """At each MoE layer built: the device of each FFN's up projection in the model being converted."""
    module = importlib.import_module("moeify.convert")  # (moeify.convert is the function)
    seen, real = [], module._build_layer

    def spy(target, site, *args, **kwargs):
        seen.append([target.get_parameter(f"{n}.up_proj.weight").device.type for n in names])
        return real(target, site, *args, **kwargs)

    monkeypatch.setattr(module, "_build_layer", spy)
    return seen


def test_each_dense_ffn_is_freed_once_its_layer_is_built(monkeypatch):
    from moeify.zoo import tiny_llama

    model = tiny_llama(num_hidden_layers=3).to(torch.bfloat16)
    seen = _spy_on_dense(monkeypatch, [m.name for m in moeify.find_ffns(model)])
    moe = moeify.convert(model, experts=4, k=2)
    assert seen == [["cpu"] * 3, ["meta", "cpu", "cpu"], ["meta", "meta", "cpu"]]
    assert all(p.device.type == "cpu" for p in model.parameters())  # the user's model: untouched
    assert all(p.device.type == "cpu" for p in moe.parameters())
    assert {moe.get_parameter("model.layers.0.mlp.w1").dtype} == {torch.bfloat16}

    seen.clear()
    in_place = moeify.convert(copy.deepcopy(model), experts=4, k=2, inplace=True)  # frees nothing early
    assert seen == [["cpu"] * 3] * 3
    got, want = moe.state_dict(), in_place.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def _reference_fill(layer, dense, partition, w2_scale, b2_scale):
    """fill_from_partition as it was: a gather and a float32 round trip for every expert."""
    H = dense.d_ff
    for e in range(layer.w1.shape[0]):
        idx = partition[e]
        rows = expert_rows(idx, H, dense.gated)
        layer.w1[e].copy_(dense.w1[rows])
        layer.w2[e].copy_(dense.w2[:, idx].float() * w2_scale)
        layer.b1[e].copy_(dense.b1[rows])
        layer.b2[e].copy_(dense.b2.float() * b2_scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("kind", ["copy", "split"])
def test_fast_fill_equals_the_reference(dtype, scales, kind):
    E, D, H = 4, 6, 8
    gen = torch.Generator().manual_seed(0)
    dense = DenseFFNWeights(w1=torch.randn(2 * H, D, generator=gen).to(dtype),
                            b1=torch.randn(2 * H, generator=gen).to(dtype),
                            w2=torch.randn(D, H, generator=gen).to(dtype),
                            b2=torch.randn(D, generator=gen).to(dtype), activation="silu", gated=True)
    if kind == "copy":
        partition = torch.arange(H).expand(E, H)
    else:
        partition = torch.randperm(H, generator=gen).view(E, H // E)
    He = partition.shape[1]

    def empty_layer():
        return SimpleNamespace(w1=torch.full((E, 2 * He, D), float("nan"), dtype=dtype),
                               w2=torch.full((E, D, He), float("nan"), dtype=dtype),
                               b1=torch.full((E, 2 * He), float("nan"), dtype=dtype),
                               b2=torch.full((E, D), float("nan"), dtype=dtype))

    fast, slow = empty_layer(), empty_layer()
    fill_from_partition(fast, dense, partition, *scales)
    _reference_fill(slow, dense, partition, *scales)
    for name in ("w1", "w2", "b1", "b2"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
