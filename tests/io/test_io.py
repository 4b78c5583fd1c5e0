"""Model files: loading every kind of input, save/load round trips, atomic outputs, HF MoE export."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

import moeify
from moeify.compare import compare_outputs, example_inputs, run_model
from moeify.errors import MoeifyError
from moeify.io import load_model
from moeify.io.weights import INDEX_FILE
from tests.cli_models import leftovers, user_model

transformers = pytest.importorskip("transformers")


def _same(a, b, atol=0.0):
    inputs = example_inputs(a, seq=8)
    worst = max(d.max_abs for d in compare_outputs(run_model(a, inputs), run_model(b, inputs)))
    assert worst <= atol, worst


# --------------------------------------------------------------------------- inputs


def test_callable_source():
    loaded = load_model("moeify.zoo:tiny_mlp")
    assert loaded.source == {"kind": "callable", "target": "moeify.zoo:tiny_mlp"}
    assert isinstance(loaded.model, torch.nn.Module)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_with_arch(tmp_path, suffix):
    model = user_model()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file(model.state_dict(), str(path))
    with pytest.raises(MoeifyError, match="pass --arch"):
        load_model(str(path))
    loaded = load_model(str(path), arch="tests.cli_models:user_model")
    assert loaded.source["target"] == "tests.cli_models:user_model"
    _same(model, loaded.model)


def test_state_dict_wrapped_in_checkpoint_dict(tmp_path):
    model = user_model()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    _same(model, load_model(str(tmp_path / "ckpt.pt"), arch="tests.cli_models:user_model").model)


def test_state_dict_shape_mismatch(tmp_path):
    torch.save(user_model().state_dict(), tmp_path / "w.pt")
    with pytest.raises(MoeifyError, match=r"fc1\.weight has shape \(32, 16\) in the file but \(48, 16\)"):
        load_model(str(tmp_path / "w.pt"), arch="tests.cli_models:wider_model")


def test_pickled_user_module_needs_trust(tmp_path):
    torch.save(user_model(), tmp_path / "m.pt")
    with pytest.raises(MoeifyError, match=r"runs code when loaded \(it calls tests\.cli_models\.UserModel\)"):
        load_model(str(tmp_path / "m.pt"))
    loaded = load_model(str(tmp_path / "m.pt"), trust_pickle=True)
    assert loaded.source["kind"] == "pickle"
    _same(user_model(), loaded.model)


def test_pickled_torch_nn_module_loads_without_trust(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4))
    torch.save(model, tmp_path / "seq.pt")
    _same(model, load_model(str(tmp_path / "seq.pt")).model)


def test_hf_directory(tmp_path):
    from moeify.zoo import tiny_bert

    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    loaded = load_model(str(tmp_path / "bert"))
    assert type(loaded.model).__name__ == "BertModel" and loaded.source["kind"] == "hf"
    _same(model, loaded.model)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"\x00garbage" * 10), "not a readable PyTorch file"),
    (lambda p: p.write_bytes(b""), "not a readable PyTorch file"),
])
def test_corrupt_pt(tmp_path, make, message):
    make(tmp_path / "bad.pt")
    with pytest.raises(MoeifyError, match=message):
        load_model(str(tmp_path / "bad.pt"))


def test_truncated_pt(tmp_path):
    torch.save(user_model().state_dict(), tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MoeifyError, match="corrupt or truncated"):
        load_model(str(tmp_path / "w.pt"), arch="tests.cli_models:user_model")


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(MoeifyError, match="not a readable safetensors file"):
        load_model(str(tmp_path / "w.safetensors"), arch="tests.cli_models:user_model")


@pytest.mark.parametrize("spec, message", [
    ("nope.pt", "no such file or directory: nope.pt"),
    ("no_such_pkg_xyz:build", "cannot import module 'no_such_pkg_xyz'"),
    ("moeify.zoo:no_such_fn", "has no attribute 'no_such_fn'"),
    ("tests.cli_models:raises", r"tests.cli_models:raises\(\) failed: RuntimeError: boom"),
    ("tests.cli_models:not_a_module", "returned int, not a torch.nn.Module"),
])
def test_bad_specs(spec, message):
    with pytest.raises(MoeifyError, match=message):
        load_model(spec)


def test_unknown_format_and_bare_directory(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(MoeifyError, match="unknown model format '.onnx'"):
        load_model(str(tmp_path / "model.onnx"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoeifyError, match="without config.json"):
        load_model(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- save / load


def _converted(spec="moeify.zoo:tiny_mlp", **options):
    loaded = load_model(spec)
    options = {"experts": 4, "k": 2, **options}
    return moeify.convert(loaded.model, **options, inplace=True), loaded.source


def _perturb(model, seed=1):
    """Make experts differ and the router matter, so a wrong layout or routing would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, moeify.MoELayer):
                for p in (m.w1, m.w2, m.router.weight):
                    p.add_(torch.randn(p.shape, generator=gen) * p.std() * 0.5)
    return model


def test_round_trip_callable_source(tmp_path):
    model, source = _converted()
    _perturb(model)
    out = moeify.save(model, tmp_path / "out", source=source)
    recipe = json.loads((out / "moeify.json").read_text())
    assert recipe["format"] == "moeify.recipe" and recipe["version"] == 2
    assert recipe["moeify_version"] == moeify.__version__
    assert recipe["source"] == {"kind": "callable", "target": "moeify.zoo:tiny_mlp"}
    assert recipe["conversion"]["config"]["experts"] == 4
    assert recipe["conversion"]["converted"] == ["blocks.0.mlp", "blocks.1.mlp", "blocks.2.mlp"]
    again = moeify.load(out)
    _same(model, again)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)


@pytest.mark.slow
def test_round_trip_hf_source_needs_no_source_files(tmp_path):
    from moeify.zoo import tiny_llama

    model = _perturb(moeify.convert(tiny_llama(tie_word_embeddings=True), experts=4, k=2, inplace=True))
    out = moeify.save(model, tmp_path / "out")  # an HF model: its config goes into the recipe
    recipe = json.loads((out / "moeify.json").read_text())
    assert recipe["source"]["kind"] == "hf" and recipe["source"]["architecture"] == "LlamaForCausalLM"
    assert recipe["weights"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    again = moeify.load(out)
    assert again.lm_head.weight is again.model.embed_tokens.weight or torch.equal(
        again.lm_head.weight, again.model.embed_tokens.weight)
    _same(model, again)


def test_sharded_weights(tmp_path):
    model, source = _converted()
    out = moeify.save(model, tmp_path / "out", source=source, max_shard_bytes=20_000)
    index = json.loads((out / INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((out / f).exists() for f in files)
    umask = os.umask(0)
    os.umask(umask)
    assert all((out / f).stat().st_mode & 0o777 == 0o666 & ~umask for f in files)  # not safetensors' 0600
    _same(model, moeify.load(out))


def test_unknown_source_needs_model(tmp_path):
    model = moeify.convert(user_model(), experts=2, k=1)
    out = moeify.save(model, tmp_path / "out")
    with pytest.raises(MoeifyError, match="pass model="):
        moeify.load(out)
    _same(model, moeify.load(out, model=user_model()))


def test_save_pt(tmp_path):
    model = moeify.convert(user_model(), experts=2, k=1)
    path = moeify.save(model, tmp_path / "m.pt")
    with pytest.raises(MoeifyError, match="--trust-pickle"):
        moeify.load(path)
    _same(model, moeify.load(path, trust_pickle=True))


def test_recipe_mismatch_is_reported(tmp_path):
    model, source = _converted()
    out = moeify.save(model, tmp_path / "out", source=source)
    recipe = json.loads((out / "moeify.json").read_text())
    recipe["conversion"]["config"]["experts"] = 3
    (out / "moeify.json").write_text(json.dumps(recipe))
    with pytest.raises(MoeifyError, match=r"has shape \(4, .*\) in model.safetensors but \(3, "):
        moeify.load(out)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"format": "other"}', "is not a moeify recipe"),
    ('{"format": "moeify.recipe", "version": 99}', "newer than this moeify reads"),
])
def test_bad_recipe(tmp_path, text, message):
    model, source = _converted()
    out = moeify.save(model, tmp_path / "out", source=source)
    (out / "moeify.json").write_text(text)
    with pytest.raises(MoeifyError, match=message):
        moeify.load(out)


def test_truncated_weights(tmp_path):
    model, source = _converted()
    out = moeify.save(model, tmp_path / "out", source=source)
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[:1000])
    with pytest.raises(MoeifyError, match="corrupt or truncated"):
        moeify.load(out)


def test_existing_output_needs_force_and_inputs_are_never_overwritten(tmp_path):
    model, source = _converted()
    out = moeify.save(model, tmp_path / "out", source=source)
    with pytest.raises(MoeifyError, match="already exists; pass --force"):
        moeify.save(model, out, source=source)
    moeify.save(model, out, source=source, force=True)
    with pytest.raises(MoeifyError, match="would overwrite the input"):
        moeify.save(model, out, source=source, force=True, inputs=(out,))
    assert leftovers(tmp_path) == []


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import moeify.io.recipe as recipe

    model, source = _converted()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recipe, "write_safetensors", boom)
    with pytest.raises(MoeifyError, match="No space left on device"):
        moeify.save(model, tmp_path / "deep" / "out", source=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- Hugging Face MoE export


def _hf_logits_match(model, out_dir, cls_name):
    cls = getattr(transformers, cls_name)
    hf = cls.from_pretrained(str(out_dir), local_files_only=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, hf(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    return hf


@pytest.mark.slow
def test_mixtral_export_same_logits(tmp_path):
    from moeify.io.hf_export import export_hf
    from moeify.zoo import tiny_llama

    model = _perturb(moeify.convert(tiny_llama(), experts=4, k=2, inplace=True))
    export_hf(model, tmp_path / "mixtral", "mixtral")
    config = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    hf = _hf_logits_match(model, tmp_path / "mixtral", "MixtralForCausalLM")
    assert hf.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 2 * 176, 64)


@pytest.mark.slow
def test_mixtral_export_of_mpo_experts_writes_their_contracted_weights(tmp_path):
    from moeify.io.hf_export import export_hf
    from moeify.zoo import tiny_llama

    model = moeify.convert(tiny_llama(), experts=4, k=2, inplace=True, layer={"expert_param": "mpo"})
    torch.manual_seed(0)
    with torch.no_grad():  # move the experts apart: each expert's auxiliary tensors differ
        for name, p in model.named_parameters():
            if ".mpo." in name or "router" in name:
                p.add_(0.05 * torch.randn_like(p))
    export_hf(model, tmp_path / "mixtral", "mixtral")
    _hf_logits_match(model, tmp_path / "mixtral", "MixtralForCausalLM")


def test_mixtral_export_refuses_partial_conversion(tmp_path):
    from moeify.io.hf_export import export_hf
    from moeify.zoo import tiny_llama

    model = moeify.convert(tiny_llama(), experts=4, k=2, every=2, inplace=True)
    converted = moeify.conversion_report(model).converted
    dense_layers = [i for i in range(4) if f"model.layers.{i}.mlp" not in converted]
    message = f"needs an MoE block in every layer, but layer(s) {dense_layers} stay dense"
    with pytest.raises(MoeifyError, match=re.escape(message)):
        export_hf(model, tmp_path / "mixtral", "mixtral")
    assert not (tmp_path / "mixtral").exists()


def test_mixtral_export_refuses_other_families(tmp_path):
    from moeify.io.hf_export import export_hf
    from moeify.zoo import tiny_bert

    model = moeify.convert(tiny_bert(), experts=4, k=2, inplace=True)
    with pytest.raises(MoeifyError, match="needs a llama or mistral model, got bert"):
        export_hf(model, tmp_path / "x", "mixtral")


QWEN = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


@pytest.mark.parametrize("family, fmt, cls_name, every", [
    ("Qwen2", "qwen2_moe", "Qwen2MoeForCausalLM", 1),
    ("Qwen2", "qwen2_moe", "Qwen2MoeForCausalLM", 2),
    ("Qwen3", "qwen3_moe", "Qwen3MoeForCausalLM", 1),
    ("Qwen3", "qwen3_moe", "Qwen3MoeForCausalLM", 2),
])
@pytest.mark.slow
def test_qwen_moe_export_same_logits(tmp_path, family, fmt, cls_name, every):
    from moeify.io.hf_export import export_hf

    torch.manual_seed(0)
    extra = {"head_dim": 16} if family == "Qwen3" else {}
    config = getattr(transformers, f"{family}Config")(**QWEN, **extra)
    dense = getattr(transformers, f"{family}ForCausalLM")(config)
    model = _perturb(moeify.convert(dense.eval(), experts=4, k=2, every=every, inplace=True))
    export_hf(model, tmp_path / fmt, fmt)
    config = json.loads((tmp_path / fmt / "config.json").read_text())
    converted = moeify.conversion_report(model).converted
    assert config["mlp_only_layers"] == [i for i in range(3) if f"model.layers.{i}.mlp" not in converted]
    assert bool(config["mlp_only_layers"]) == (every > 1)
    _hf_logits_match(model, tmp_path / fmt, cls_name)
