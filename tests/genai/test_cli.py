"""`moeify export --genai` at int4 and `moeify generate` from the shell."""

import json

import onnx
import pytest

import moeify
from tests.genai.tiny import tiny_llama_folder

pytestmark = [pytest.mark.slow, pytest.mark.ort]


def test_export_int4_then_generate(run, tmp_path):
    dense = tmp_path / "dense"
    moe = moeify.convert(tiny_llama_folder(dense), experts=4, k=1, init="copy")
    moeify.save(moe, tmp_path / "moe")
    result = run("export", tmp_path / "moe", "-o", tmp_path / "genai", "--genai", "--precision", "int4")
    assert result.exit_code == 1 and "pass --tokenizer DIR" in result.output  # a moeify folder has none
    result = run("export", tmp_path / "moe", "-o", tmp_path / "genai", "--genai", "--precision", "int4",
                 "--tokenizer", dense, "--genai-experts", "fused")
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(tmp_path / "genai" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QMoE") == 4 and "MatMulNBits" in ops and "MoE" not in ops
    result = run("generate", tmp_path / "genai", "--prompt", "def main():", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def main():") and "prefill" in result.output and "tok/s (8 tokens)" in (
        result.output)
    result = run("generate", tmp_path / "genai", "--prompt", "x", "--max-new-tokens", "4", "--sample",
                 "--temperature", "0.7")
    assert result.exit_code == 0 and "(4 tokens)" in result.output


def test_generate_refuses_a_folder_that_is_not_genai(run, tmp_path):
    result = run("generate", tmp_path, "--prompt", "hi")
    assert result.exit_code == 1 and "not an ONNX Runtime GenAI folder" in result.output


def test_done_when_commands_as_written(run, tmp_path):
    """Issue 14's three commands: convert carries the tokenizer, export --genai finds it, generate runs."""
    tiny_llama_folder(tmp_path / "hf")
    result = run("convert", tmp_path / "hf", "--experts", "8", "--k", "1", "-o", "moe")
    assert result.exit_code == 0, result.output
    result = run("export", "moe", "-o", "moe-genai", "--genai", "--precision", "int4")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "moe-genai" / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json"
                                                                        ).read_bytes()
    graph = onnx.load(str(tmp_path / "moe-genai" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]  # int4 default: loop experts, 8 per layer, 2 MatMulNBits each
    assert "QMoE" not in ops and sum(n.name.endswith("/fc1") for n in graph.node) == 4 * 8
    result = run("generate", "moe-genai", "--prompt", "def main():")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def main():") and "tok/s" in result.output


def test_bench_a_genai_folder(run, tmp_path):
    from moeify.genai import export_genai

    dense = tmp_path / "dense"
    moe = moeify.convert(tiny_llama_folder(dense), experts=4, k=1, init="copy")
    export_genai(moe, tmp_path / "genai", precision="int4", tokenizer_dir=dense)
    result = run("bench", tmp_path / "genai", "--seq", "12", "--new-tokens", "5", "--runs", "3", "--warmup",
                 "1", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    prefill, decode = report["prefill"], report["decode"]
    assert prefill["tokens"] == 12 and decode["tokens"] == 5 and report["new_tokens"] == 5  # eos cannot cut
    assert prefill["runs"] == decode["runs"] == 3
    assert 0 < prefill["p50_ms"] <= prefill["p99_ms"] and 0 < decode["p50_ms"] <= decode["p99_ms"]
    assert decode["tokens_per_s"] == pytest.approx(5 * 1000 / decode["mean_ms"])
    result = run("bench", tmp_path / "genai", "--runs", "1", "--warmup", "0", "--new-tokens", "2")
    assert result.exit_code == 0 and "prefill" in result.output and "decode" in result.output, result.output
    result = run("bench", tmp_path / "genai", "--batch", "2")
    assert result.exit_code == 1 and "one sequence at a time" in result.output
    result = run("bench", dense)
    assert result.exit_code == 1 and "without genai_config.json" in result.output


def test_gpt2_folder_through_the_own_route(run, tmp_path):
    """A GPT-2 (which the builder does not know): convert, export --genai (auto picks the own route),
    generate; the builder route asked for by name is refused in one line."""
    from tests.genai.test_own_route import tiny_gpt2
    from tests.genai.tiny import save_byte_tokenizer

    tiny_gpt2().save_pretrained(str(tmp_path / "hf"))
    save_byte_tokenizer(tmp_path / "hf")
    assert run("convert", tmp_path / "hf", "--experts", "4", "--k", "1", "-o", "moe").exit_code == 0
    result = run("export", "moe", "-o", "g", "--genai", "--genai-route", "builder")
    assert result.exit_code == 1 and "builder route covers" in result.output
    assert "GPT2LMHeadModel" in result.output
    result = run("export", "moe", "-o", "g", "--genai")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "g" / "genai_config.json").read_text())["model"]["type"] == "decoder"
    result = run("generate", "g", "--prompt", "def main():", "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def main():") and "tok/s" in result.output
