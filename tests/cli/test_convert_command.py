"""`moeify convert`: as typed, options, formats, outputs."""

import json
import os
from pathlib import Path

import pytest
import torch

import moeify
from tests.cli_models import leftovers, user_model

pytest.importorskip("transformers")


def test_convert_as_typed_derives_output(run, tmp_path):
    model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 64), torch.nn.GELU(),
                                torch.nn.Linear(64, 16))
    torch.save(model, tmp_path / "model.pt")  # torch.nn classes only: loads without --trust-pickle
    result = run("convert", "model.pt", "--experts", "64")
    assert result.exit_code == 0, result.output
    out = tmp_path / "model-moe64"
    assert (out / "moeify.json").exists() and (out / "model.safetensors").exists()
    recipe = json.loads((out / "moeify.json").read_text())
    assert recipe["conversion"]["config"]["experts"] == 64 and recipe["conversion"]["config"]["k"] == 2
    again = moeify.load(out)
    ids = torch.randint(0, 32, (2, 5))
    torch.testing.assert_close(again(ids), model(ids), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_convert_callable_summary_and_reload(run, tmp_path):
    result = run("convert", "moeify.zoo:tiny_llama", "--experts", "4", "--k", "1", "--seed", "3")
    assert result.exit_code == 0, result.output
    out = tmp_path / "tiny_llama-moe4"
    assert "model.layers.3.mlp" in result.stdout and "4/4 FFNs converted" in result.stdout
    assert f"wrote {out.name}" in result.stdout
    assert "writing" in result.stderr  # the progress bar goes to stderr
    recipe = json.loads((out / "moeify.json").read_text())
    assert recipe["source"] == {"kind": "callable", "target": "moeify.zoo:tiny_llama"}
    assert recipe["conversion"]["config"]["seed"] == 3
    layer = moeify.load(out).model.layers[0].mlp
    assert isinstance(layer, moeify.MoELayer) and layer.config.k == 1 and layer.num_experts == 4


def test_convert_options_reach_the_layers(run, tmp_path):
    result = run("convert", "moeify.zoo:tiny_llama", "-e", "4", "--every", "2", "--exclude", "*.2.mlp",
                 "--router", "hash", "-o", "out")
    assert result.exit_code == 0, result.output
    model = moeify.load(tmp_path / "out")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, moeify.MoELayer)}
    assert layers and "model.layers.2.mlp" not in layers and len(layers) < 4
    assert all(m.config.router == "hash" for m in layers.values())


def test_convert_capacity_factor(run, tmp_path):
    result = run("convert", "moeify.zoo:tiny_mlp", "-e", "4", "--capacity-factor", "1.5", "-o", "out")
    assert result.exit_code == 0, result.output
    layers = [m for m in moeify.load(tmp_path / "out").modules() if isinstance(m, moeify.MoELayer)]
    assert len(layers) == 3 and all(m.config.capacity_factor == 1.5 for m in layers)


def test_convert_router_groups(run, tmp_path):
    """--router-groups reaches MoEConfig.router_groups (SMILE: a token's experts inside one of N nodes)."""
    result = run("convert", "moeify.zoo:tiny_mlp", "-e", "4", "--router", "smile", "--router-groups", "2",
                 "-o", "out")
    assert result.exit_code == 0, result.output
    layers = [m for m in moeify.load(tmp_path / "out").modules() if isinstance(m, moeify.MoELayer)]
    assert len(layers) == 3 and all(m.config.router_groups == 2 and m.router.caps.expert_groups == 2
                                    for m in layers)


@pytest.mark.parametrize(("args", "says"), [
    (["--router", "topk", "--router-groups", "2"], "does not route by expert groups"),  # MoEConfig refuses
    (["--router", "smile", "--router-groups", "3"], "divisible by router_groups (3)"),
])
def test_convert_router_groups_refused(run, tmp_path, args, says):
    result = run("convert", "moeify.zoo:tiny_mlp", "-e", "4", *args, "-o", "out")
    assert result.exit_code == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_convert_option_the_model_refuses_is_a_usage_error(run, tmp_path):
    result = run("convert", "moeify.zoo:tiny_llama", "-e", "4", "--capacity-factor", "1.5", "-o", "out")
    assert result.exit_code == 2 and "causal" in result.stderr
    assert not (tmp_path / "out").exists()


def test_convert_include(run, tmp_path):
    result = run("convert", "moeify.zoo:tiny_llama", "-e", "2", "--include", "model.layers.1.*",
                 "-o", "out")
    assert result.exit_code == 0, result.output
    model = moeify.load(tmp_path / "out")
    assert [n for n, m in model.named_modules() if isinstance(m, moeify.MoELayer)] == ["model.layers.1.mlp"]


def test_convert_state_dict_with_arch_to_pt(run, tmp_path):
    torch.save(user_model().state_dict(), tmp_path / "w.pt")
    result = run("convert", "w.pt", "--arch", "tests.cli_models:user_model", "-e", "2", "-o", "out.pt")
    assert result.exit_code == 0, result.output
    model = moeify.load(tmp_path / "out.pt", trust_pickle=True)
    assert any(isinstance(m, moeify.MoELayer) for m in model.modules())


@pytest.mark.slow
def test_convert_hf_directory_and_force(run, tmp_path):
    from moeify.zoo import tiny_bert

    tiny_bert().save_pretrained(tmp_path / "bert")
    first = run("convert", "bert", "-e", "4", "-o", "bert-moe")
    assert first.exit_code == 0, first.output
    again = run("convert", "bert", "-e", "2", "-o", "bert-moe")
    assert again.exit_code == 1 and "already exists; pass --force" in again.stderr
    forced = run("convert", "bert", "-e", "2", "-o", "bert-moe", "--force")
    assert forced.exit_code == 0, forced.output
    recipe = json.loads((tmp_path / "bert-moe" / "moeify.json").read_text())
    assert recipe["conversion"]["config"]["experts"] == 2
    assert leftovers(tmp_path) == []


@pytest.mark.slow
def test_convert_format_mixtral(run, tmp_path):
    import transformers

    result = run("convert", "moeify.zoo:tiny_llama", "-e", "4", "--format", "mixtral", "-o", "mix")
    assert result.exit_code == 0, result.output
    hf = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "mix"), local_files_only=True)
    assert hf.config.num_local_experts == 4
    checked = run("verify", "moeify.zoo:tiny_llama", "mix", "--atol", "1e-4")  # loaded as Mixtral
    assert checked.exit_code == 0, checked.output
    assert "no moeify MoE layer ran" in checked.stdout


def test_convert_format_mixtral_refuses_bert(run):
    result = run("convert", "moeify.zoo:tiny_bert", "-e", "4", "--format", "mixtral", "-o", "mix")
    assert result.exit_code == 1
    assert "needs a llama or mistral model, got bert" in result.stderr


@pytest.mark.slow
def test_python_dash_m(run, tmp_path):
    """End to end in a subprocess (`python -m moeify convert`), then verified in-process."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "moeify", "convert", "moeify.zoo:tiny_mlp", "--experts", "4"]
    root = str(Path(__file__).resolve().parents[2])  # this checkout, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "3/3 FFNs converted" in done.stdout
    checked = run("verify", "moeify.zoo:tiny_mlp", tmp_path / "tiny_mlp-moe4", "--atol", "1e-5", "--json")
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    assert report["passed"] and report["max_abs_difference"] < 1e-5
    assert len(report["routing"]) == 3


@pytest.mark.parametrize("fmt", ["moeify", "mixtral"])
def test_convert_hf_folder_carries_its_tokenizer(run, tmp_path, fmt):
    from transformers import AutoTokenizer

    from tests.genai.tiny import tiny_llama_folder

    model = tiny_llama_folder(tmp_path / "dense")
    model.generation_config.save_pretrained(tmp_path / "dense")
    (tmp_path / "dense" / "merges.txt").write_text("#version: 0.2\n")  # a companion the writer does not make
    result = run("convert", tmp_path / "dense", "-e", "4", "--format", fmt, "-o", "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt", "generation_config.json"):
        assert (out / name).read_bytes() == (tmp_path / "dense" / name).read_bytes(), name
    assert not list(tmp_path.glob(".out.moeify-tmp-*"))  # copied inside the atomic write
    assert AutoTokenizer.from_pretrained(str(out)).encode("hi") == AutoTokenizer.from_pretrained(
        str(tmp_path / "dense")).encode("hi")
