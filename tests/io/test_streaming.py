"""Streaming conversion (moeify/io/streaming.py) against the in-memory reference, and loading without a
second copy: the same weights, bit for bit."""

import json
from pathlib import Path

import pytest
import torch

import moeify
from moeify.errors import MoeifyError
from moeify.io.safetensors_file import read_header, read_tensor
from moeify.io.sources import load_hf_dir
from moeify.io.streaming import convert_checkpoint
from moeify.io.weights import INDEX_FILE, weight_files
from tests.cli_models import leftovers
from tests.zoo import ZOO

transformers = pytest.importorskip("transformers")

INITS = {"copy": "copy", "noise": "noise", "drop": "drop", "split": "split",
         "granular": {"init": "granular", "granularity": 2}}
STREAMED = ["llama", "gpt2", "bert", "t5", "t5_gated", "distilbert", "albert"]  # vit: see the rename test
SHARD = 40_000  # bytes: several shards even for tiny models


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in weight_files(directory):
        for name, info in read_header(file)[0].items():
            out[name] = read_tensor(file, info)
    return out


def _assert_bit_identical(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) and set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _checkpoint(tmp_path: Path, name: str, dtype=torch.float32) -> Path:
    src = tmp_path / f"{name}-src"
    if not src.exists():
        ZOO[name].build().to(dtype).save_pretrained(src)
    return src


def _options(init) -> dict:
    return dict(experts=4, k=2, init=init, seed=3)


def _reference(src: Path, out: Path, options: dict, **save) -> Path:
    """The in-memory path: load, convert, save."""
    return moeify.save(moeify.convert(load_hf_dir(src).model, **options), out, **save)


def test_llama_copy_streams_bit_identical_to_in_memory(tmp_path):
    src = _checkpoint(tmp_path, "llama")
    report = convert_checkpoint(src, tmp_path / "stream", max_shard_bytes=SHARD, **_options("copy"))
    _reference(src, tmp_path / "memory", _options("copy"))
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")
    assert report.converted == ("model.layers.0.mlp", "model.layers.1.mlp")
    assert (tmp_path / "stream" / INDEX_FILE).exists()  # sharded
    recipe = json.loads((tmp_path / "stream" / "moeify.json").read_text())
    reference = json.loads((tmp_path / "memory" / "moeify.json").read_text())
    assert recipe["conversion"] == reference["conversion"]
    assert recipe["weights"]["tied"] == reference["weights"]["tied"]
    assert recipe["num_parameters"] == reference["num_parameters"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STREAMED)
@pytest.mark.parametrize("init", list(INITS))
def test_every_zoo_hf_model_and_data_free_init_bit_identical(tmp_path_factory, name, init):
    tmp = tmp_path_factory.getbasetemp() / "zoo"
    tmp.mkdir(exist_ok=True)
    src = _checkpoint(tmp, name)
    out = tmp_path_factory.mktemp(f"{name}-{init}")
    convert_checkpoint(src, out / "stream", max_shard_bytes=SHARD, **_options(INITS[init]))
    _reference(src, out / "memory", _options(INITS[init]))
    _assert_bit_identical(out / "stream", out / "memory")


def test_a_model_in_memory_is_a_source_too(tmp_path):
    model = ZOO["gpt2"].build()
    convert_checkpoint(model, tmp_path / "stream", **_options("noise"))
    moeify.save(moeify.convert(model, **_options("noise")), tmp_path / "memory")
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")
    assert not any(isinstance(m, moeify.MoELayer) for m in model.modules())  # the input is untouched


@pytest.mark.slow
@pytest.mark.parametrize("fmt,family", [("mixtral", "llama"), ("qwen2_moe", "qwen2"), ("qwen3_moe", "qwen3")])
def test_hf_formats_bit_identical_and_load_in_transformers(tmp_path, fmt, family):
    from moeify.io.hf_export import export_hf

    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
    cfg = getattr(transformers, f"{names[family]}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=family == "qwen2")
    torch.manual_seed(0)
    getattr(transformers, f"{names[family]}ForCausalLM")(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    convert_checkpoint(tmp_path / "src", tmp_path / "stream", fmt=fmt, max_shard_bytes=20_000,
                       **_options("copy"))
    export_hf(moeify.convert(load_hf_dir(tmp_path / "src").model, **_options("copy")), tmp_path / "memory", fmt)
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")
    assert json.loads((tmp_path / "stream" / "config.json").read_text())["model_type"] == fmt
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    assert next(moe.parameters()).dtype == torch.bfloat16


def test_dtype_changes_floating_tensors_only(tmp_path):
    src = _checkpoint(tmp_path, "llama")
    convert_checkpoint(src, tmp_path / "stream", dtype=torch.bfloat16, **_options("copy"))
    model = load_hf_dir(src).model.to(torch.bfloat16)
    moeify.save(moeify.convert(model, **_options("copy")), tmp_path / "memory")
    _assert_bit_identical(tmp_path / "stream", tmp_path / "memory")
    assert {t.dtype for t in _tensors(tmp_path / "stream").values()} == {torch.bfloat16}


def test_load_assigns_and_equals_the_converted_model(tmp_path):
    src = _checkpoint(tmp_path, "llama", torch.bfloat16)
    convert_checkpoint(src, tmp_path / "out", max_shard_bytes=SHARD, **_options("drop"))
    loaded = moeify.load(tmp_path / "out")
    reference = moeify.convert(load_hf_dir(src).model, **_options("drop"))
    assert next(loaded.parameters()).dtype == torch.bfloat16  # kept as saved, not widened to float32
    got, want = loaded.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not any(t.device.type == "meta" for t in list(loaded.parameters()) + list(loaded.buffers()))
    ids = ZOO["llama"].inputs()["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)
    wide = moeify.load(tmp_path / "out", dtype=torch.float32, device="cpu")
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    assert torch.equal(wide.state_dict()["model.layers.0.mlp.w1"], want["model.layers.0.mlp.w1"].float())


def test_tied_weights_stay_tied_after_load(tmp_path):
    from moeify.zoo import tiny_llama

    model = tiny_llama(tie_word_embeddings=True)
    convert_checkpoint(model, tmp_path / "out", **_options("copy"))
    loaded = moeify.load(tmp_path / "out")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# --- errors: one line, naming the file; nothing left behind -----------------------------------------


def _sharded(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    ZOO["llama"].build().save_pretrained(src, max_shard_size="20KB")
    assert (src / INDEX_FILE).exists()
    return src


def _one_line_error(src: Path, out: Path, match: str) -> str:
    with pytest.raises(MoeifyError, match=match) as err:
        convert_checkpoint(src, out, **_options("copy"))
    assert "\n" not in str(err.value)
    assert not out.exists() and leftovers(out.parent) == []
    return str(err.value)


def test_truncated_shard(tmp_path):
    src = _sharded(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert shard.name in _one_line_error(src, tmp_path / "out", "corrupt or truncated")


def test_corrupt_header(tmp_path):
    src = _sharded(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"\xff\xfe{x"
    shard.write_bytes(bytes(data))
    assert shard.name in _one_line_error(src, tmp_path / "out", "not JSON")


def test_missing_shard(tmp_path):
    src = _sharded(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert shard.name in _one_line_error(src, tmp_path / "out", "missing")


def test_config_that_disagrees_with_the_weights(tmp_path):
    src = _checkpoint(tmp_path, "llama")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    assert "model.safetensors" in _one_line_error(src, tmp_path / "out", "config and the weights disagree")


def test_renamed_checkpoint_names_say_what_to_do(tmp_path):
    src = _checkpoint(tmp_path, "vit")  # transformers 5 writes ViT under its legacy names
    from moeify.io.streaming import NotStreamable

    with pytest.raises(NotStreamable, match="--no-stream"):
        convert_checkpoint(src, tmp_path / "out", **_options("copy"))


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    src = _checkpoint(tmp_path, "llama")
    calls = []

    def boom(done, total):
        calls.append(done)
        if len(calls) > 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(src, tmp_path / "out", progress=boom, **_options("copy"))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# --- the command line --------------------------------------------------------------------------------


def test_cli_streams_a_safetensors_directory(run, tmp_path):
    src = _checkpoint(tmp_path, "llama")
    result = run("convert", src, "-e", "4", "--seed", "3", "--shard-size", "40KB", "--dtype", "bfloat16",
                 "-o", "out")
    assert result.exit_code == 0, result.output
    assert "streamed" in result.output
    assert (tmp_path / "out" / INDEX_FILE).exists()
    model = load_hf_dir(src).model.to(torch.bfloat16)
    moeify.save(moeify.convert(model, experts=4, k=2, seed=3), tmp_path / "memory")
    _assert_bit_identical(tmp_path / "out", tmp_path / "memory")


def test_cli_falls_back_to_memory_when_names_do_not_map(run, tmp_path):
    src = _checkpoint(tmp_path, "vit")
    result = run("convert", src, "-e", "4", "-o", "out")
    assert result.exit_code == 0, result.output
    assert "not streamed" in result.output
    assert any(isinstance(m, moeify.MoELayer) for m in moeify.load(tmp_path / "out").modules())
