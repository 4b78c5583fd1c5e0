"""Streamed conversion with calibration (moeify/io/layerwise.py: the calibration batch runs through the
model one module at a time) and with a shared router: the same weights, bit for bit, as the in-memory
conversion of the loaded model with the same seed."""

import weakref
from pathlib import Path

import pytest
import torch
from torch import nn

import moeify
from moeify.convert import select_sites
from moeify.convert_config import ConvertConfig
from moeify.errors import MoeifyError, UpcycleError
from moeify.io.layerwise import calibrate_lazily
from moeify.io.lazy_source import CheckpointSource, hf_structure
from moeify.io.sources import load_hf_dir
from moeify.io.streaming import TensorReader, convert_checkpoint
from tests.cli_models import leftovers
from tests.io.test_streaming import SHARD, _assert_bit_identical, _checkpoint, _tensors
from tests.zoo import ZOO

pytest.importorskip("transformers")

KMEANS = {"init": "copy", "router_init": "kmeans"}


def _options(init, **more) -> dict:
    return dict(experts=4, k=2, init=init, seed=3, **more)


def _stream_and_reference(src: Path, tmp_path: Path, options: dict, calibration) -> tuple[Path, Path]:
    streamed, memory = tmp_path / "stream", tmp_path / "memory"
    convert_checkpoint(src, streamed, max_shard_bytes=SHARD, calibration=calibration, **options)
    moeify.save(moeify.convert(load_hf_dir(src).model, calibration=calibration, **options), memory)
    return streamed, memory


def test_llama_kmeans_router_streamed_equals_in_memory(tmp_path):
    src = _checkpoint(tmp_path, "llama", torch.bfloat16)
    streamed, memory = _stream_and_reference(src, tmp_path, _options(KMEANS), ZOO["llama"].inputs())
    _assert_bit_identical(streamed, memory)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "t5", "albert", "bert"])  # decoder, enc-dec, shared layer, encoder
@pytest.mark.parametrize("init", [KMEANS, "split"], ids=["kmeans", "split"])
def test_calibrated_inits_streamed_equal_in_memory(tmp_path, name, init):
    src = _checkpoint(tmp_path, name)
    streamed, memory = _stream_and_reference(src, tmp_path, _options(init), ZOO[name].inputs())
    _assert_bit_identical(streamed, memory)


@pytest.mark.slow
def test_the_calibration_inputs_decide_the_router(tmp_path):
    """The equality above is not vacuous: other inputs give another k-means router."""
    src = _checkpoint(tmp_path, "llama")
    ids = ZOO["llama"].inputs()["input_ids"]
    convert_checkpoint(src, tmp_path / "a", calibration={"input_ids": ids}, **_options(KMEANS))
    convert_checkpoint(src, tmp_path / "b", calibration={"input_ids": ids.flip(-1)}, **_options(KMEANS))
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    name = "model.layers.1.mlp.router.weight"
    assert not torch.equal(a[name], b[name])
    assert torch.equal(a["model.layers.1.mlp.w1"], b["model.layers.1.mlp.w1"])  # copied experts: the same


class _Watched:
    """A TensorReader that records what it read and how many of those bytes are alive at once."""

    def __init__(self, reader: TensorReader):
        self.reader, self.read, self.live, self.peak = reader, [], 0, 0

    def name_in_source(self, name):
        return self.reader.name_in_source(name)

    def _watch(self, name, t):
        self.read.append(name)
        self.live += t.nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._freed, t.nbytes)
        return t

    def _freed(self, nbytes):
        self.live -= nbytes

    def get_parameter(self, name):
        return self._watch(name, self.reader.get_parameter(name))

    get = get_parameter


def test_only_the_running_module_is_in_memory_and_the_head_is_never_read(tmp_path):
    src = _checkpoint(tmp_path, "llama")
    structure, _ = hf_structure(src)
    reader = _Watched(TensorReader(CheckpointSource(src), structure, None))
    _, _, sites = select_sites(structure, ConvertConfig(experts=4))
    recorded = calibrate_lazily(structure, sites, reader, ZOO["llama"].inputs(), in_memory_hint="")
    assert set(recorded) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert "lm_head.weight" not in reader.read and "model.norm.weight" not in reader.read
    assert "model.layers.1.mlp.down_proj.weight" in reader.read
    largest = max(t.nbytes for t in structure.state_dict().values())  # one matrix, not a block
    assert reader.peak <= largest
    assert reader.live == 0
    assert all(p.device.type == "meta" for p in structure.parameters())  # left as it was


def test_kmeans_without_calibration_fails_before_writing(tmp_path):
    src = _checkpoint(tmp_path, "llama")
    with pytest.raises(UpcycleError, match="calibration="):
        convert_checkpoint(src, tmp_path / "out", **_options(KMEANS))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


class _HeadFirst(nn.Module):
    """Reads its embedding's weight outside the embedding's call: cannot run one module at a time."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.up, self.act, self.down = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, ids):
        h = self.embed.weight[ids]  # [B, T, D]
        return h + self.down(self.act(self.up(h)))


def test_a_model_that_cannot_run_module_by_module_says_what_memory_it_needs(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(MoeifyError, match=r"in memory .* needs about [0-9.]+ GiB of RAM") as err:
        convert_checkpoint(_HeadFirst(), tmp_path / "out", calibration=torch.randint(0, 16, (2, 5)),
                           **_options(KMEANS))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


# --- share_router (one router for every FFN of a width), streamed ----------------------------------


@pytest.mark.parametrize("fmt", ["moeify", "mixtral"])
def test_share_router_streamed_equals_in_memory(tmp_path, fmt):
    from moeify.io.hf_export import export_hf

    src = _checkpoint(tmp_path, "llama")
    options = _options("copy", share_router=True)
    convert_checkpoint(src, tmp_path / "stream", fmt=fmt, max_shard_bytes=SHARD, **options)
    converted = moeify.convert(load_hf_dir(src).model, **options)
    if fmt == "moeify":
        moeify.save(converted, tmp_path / "memory")
    else:
        export_hf(converted, tmp_path / "memory", fmt)
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")
    routers = [n for n in _tensors(tmp_path / "stream") if n.endswith(("router.weight", "gate.weight"))]
    if fmt == "moeify":  # written once, shared again when loaded
        assert routers == ["model.layers.0.mlp.router.weight"]
        layers = [m for m in moeify.load(tmp_path / "stream").modules() if isinstance(m, moeify.MoELayer)]
        assert len(layers) == 2 and layers[0].router is layers[1].router
    else:  # Mixtral has one gate per layer: the shared one is written for each
        assert len(routers) == 2


def test_cli_streams_share_router(run, tmp_path):
    src = _checkpoint(tmp_path, "llama")
    result = run("convert", src, "-e", "4", "--seed", "3", "--share-router", "-o", "out")
    assert result.exit_code == 0, result.output
    assert "streamed" in result.output
    moeify.save(moeify.convert(load_hf_dir(src).model, experts=4, k=2, seed=3, share_router=True),
                tmp_path / "memory")
    _assert_bit_identical(tmp_path / "out", tmp_path / "memory")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma2", "phi3", "bart"])  # per-layer masks, fused gate_up, enc-dec
def test_kmeans_streamed_equals_in_memory_on_more_architectures(tmp_path, name):
    from tests.architectures import ARCHS, build, inputs

    build(name).save_pretrained(tmp_path / "src")
    calibration = inputs(ARCHS[name][3])
    streamed, memory = _stream_and_reference(tmp_path / "src", tmp_path, _options(KMEANS), calibration)
    _assert_bit_identical(streamed, memory)
