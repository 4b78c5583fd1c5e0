"""`moeify inspect`, `moeify verify`, `moeify demo`, `--help`."""

import json
import re

import pytest

pytest.importorskip("transformers")


def test_inspect_table_and_conversion_totals(run):
    result = run("inspect", "moeify.zoo:tiny_llama", "--experts", "8", "--k", "2")
    assert result.exit_code == 0, result.output
    assert "model.layers.0.mlp" in result.stdout and "64 -> 176" in result.stdout
    assert "silu (gated)" in result.stdout
    assert "after --experts 8 --k 2" in result.stdout and "active per token" in result.stdout


def test_inspect_json_verbose(run):
    result = run("inspect", "moeify.zoo:tiny_llama", "--experts", "4", "--json", "-v")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [f["path"] for f in data["ffns"]] == [f"model.layers.{i}.mlp" for i in range(4)]
    ffn = data["ffns"][0]
    assert (ffn["d_model"], ffn["d_ff"], ffn["gated"], ffn["parameters"]) == (64, 176, True, 3 * 64 * 176)
    assert data["rejected"] == []
    after = data["after_conversion"]
    expert = 3 * 64 * 176
    assert after["total_parameters"] == data["parameters"] + 4 * (3 * expert + 4 * 64)
    assert after["active_parameters"] == data["parameters"] + 4 * (expert + 4 * 64)


def test_inspect_no_ffn_hint(run):
    result = run("inspect", "tests.cli_models:softmax_mlp")
    assert result.exit_code == 0
    assert "no FFN found; run with -v" in result.stdout
    verbose = run("inspect", "tests.cli_models:softmax_mlp", "-v", "--json")
    rejected = json.loads(verbose.stdout)["rejected"]
    assert len(rejected) == 1 and "Softmax is not elementwise" in rejected[0]["reason"]
    silent = json.loads(verbose.stdout)["near_misses"]  # the rules that matched nowhere, and why
    assert any(line.startswith("rule 'gated' matched nothing (looked at 2 linear-like") for line in silent)


@pytest.mark.slow
def test_verify_reports_difference_and_load(run):
    assert run("convert", "moeify.zoo:tiny_llama", "-e", "4", "-o", "moe").exit_code == 0
    result = run("verify", "moeify.zoo:tiny_llama", "moe")
    assert result.exit_code == 0, result.output
    assert "largest difference" in result.stdout and "expert load" in result.stdout
    assert "model.layers.3.mlp" in result.stdout


def test_verify_atol_fails_on_different_models(run):
    assert run("convert", "moeify.zoo:tiny_llama", "-e", "4", "--init", "none", "-o", "moe").exit_code == 0
    result = run("verify", "moeify.zoo:tiny_llama", "moe", "--atol", "1e-6")
    assert result.exit_code == 1
    assert "exceeds --atol 1e-06" in result.stderr


@pytest.mark.slow
def test_demo(run):
    result = run("demo", "--experts", "4")
    assert result.exit_code == 0, result.output
    out = result.stdout
    steps = ("1/7 build", "2/7 find", "3/7 convert", "4/7 verify", "5/7 save", "6/7 export", "7/7 export")
    for step in steps:
        assert step in out
    assert "largest difference after reload: 0.00e+00" in out
    assert "MixtralForCausalLM" in out
    assert "4/4 -> com.microsoft.MoE" in out
    ort_diff = re.search(r"ONNX Runtime \(\w+\) vs PyTorch: largest logit difference (\S+)", out)
    assert ort_diff is not None and float(ort_diff.group(1)) < 1e-4


@pytest.mark.parametrize("command", ["inspect", "convert", "verify", "demo", "export", "run", "bench", "generate"])
def test_help_has_examples(run, command):
    result = run(command, "--help")
    assert result.exit_code == 0 and "Examples:" in result.stdout and f"moeify {command}" in result.stdout
