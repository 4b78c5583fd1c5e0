"""moeify.runtime (sessions, run, bench) and the `export` / `run` / `bench` CLI commands."""

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import moeify
from moeify.cli.onnx_commands import bench_command, export_command, parse_input_spec, run_command
from moeify.errors import MoeifyError
from moeify.runtime import (
    BenchResult,
    bench,
    count_tokens,
    default_providers,
    example_feed,
    make_session,
    run,
    summarize,
)

D = 16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    layer = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=32, num_experts=4, k=2, activation="silu",
                                             gated=True)).eval()
    path = tmp_path_factory.mktemp("rt") / "tiny.onnx"
    moeify.export_onnx(layer, torch.randn(2, 5, D), path)
    return layer, path


def test_session_on_cpu_without_warnings(tiny):
    _, path = tiny
    assert default_providers()[-1] == "CPUExecutionProvider"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no CUDA fallback warning on a machine without a GPU
        session = make_session(path, threads=1, spinning=False)
    assert session.get_providers()[-1] == "CPUExecutionProvider"
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["moeify.target"] == "ort" and meta["moeify.dtype"] == "float32"


def test_run_by_name_position_and_default(tiny):
    layer, path = tiny
    session = make_session(path)
    x = torch.randn(3, 4, D)
    with torch.no_grad():
        want = layer(x).numpy()
    by_name = run(session, {"x": x.numpy()})
    by_position = run(session, [x.double().numpy()])  # float64 is converted to the model's float32
    for out in (by_name, by_position):
        np.testing.assert_allclose(next(iter(out.values())), want, rtol=1e-4, atol=1e-5)
    default = next(iter(run(session).values()))
    assert default.shape == (1, 16, D)
    with pytest.raises(MoeifyError, match="missing"):
        run(session, {"y": x.numpy()})
    with pytest.raises(MoeifyError, match="3 dims"):
        run(session, [x[0].numpy()])


def test_bench_percentiles_and_throughput(tiny):
    _, path = tiny
    session = make_session(path)
    feed = example_feed(session, batch=2, seq=8)
    result = bench(session, feed, runs=5, warmup=1)
    assert isinstance(result, BenchResult) and result.runs == 5 and result.tokens == 16
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms
    assert result.tokens_per_s == pytest.approx(16 * 1000 / result.mean_ms)
    s = summarize(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), tokens=4)
    assert s.p50_ms == 3.0 and s.p99_ms > 90 and s.to_dict()["tokens_per_s"] == pytest.approx(4 * 1000 / 22)
    assert count_tokens({"input_ids": np.zeros((2, 7), dtype=np.int64)}) == 14


def test_session_errors(tmp_path):
    with pytest.raises(MoeifyError, match="not found"):
        make_session(tmp_path / "nope.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(MoeifyError, match="could not load") as info:
        make_session(bad)
    assert "\n" not in str(info.value)
    with pytest.raises(MoeifyError, match="not available"):
        make_session(bad, providers=["NoSuchExecutionProvider"])


def test_input_spec_parsing():
    assert parse_input_spec("input_ids:2x16") == ("input_ids", (2, 16), "int64")
    assert parse_input_spec("2x16x512") == (None, (2, 16, 512), "float32")
    assert parse_input_spec("x:4x8:fp16") == ("x", (4, 8), "fp16")
    for bad in ("x:2xa", "x:2x3:complex", "a:b:c:d"):
        with pytest.raises(MoeifyError):
            parse_input_spec(bad)


def test_cli_export_run_bench(tmp_path, monkeypatch):
    (tmp_path / "tiny_model.py").write_text(textwrap.dedent("""
        import torch, moeify

        def build():
            torch.manual_seed(0)
            cfg = moeify.MoEConfig(d_model=16, d_ff=32, num_experts=4, k=2, activation="gelu")
            return moeify.MoELayer(cfg).eval()
    """))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    out = tmp_path / "m.onnx"
    result = runner.invoke(export_command, ["tiny_model:build", "-o", str(out), "--target", "portable",
                                            "--input-spec", "x:2x5x16", "--fp16"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "moeify.GroupedFFN (inlined)" in result.output and out.exists()

    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 3, 16)).astype(np.float16))
    result = runner.invoke(run_command, [str(out), "--input", f"x={tmp_path / 'x.npy'}", "--save",
                                         str(tmp_path / "y.npz")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "1x3x16" in result.output
    saved = np.load(tmp_path / "y.npz")
    assert saved[saved.files[0]].shape == (1, 3, 16)

    result = runner.invoke(bench_command, [str(out), "--runs", "3", "--threads", "1", "--seq", "8"],
                           catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "p50 ms" in result.output and "p99 ms" in result.output
    result = runner.invoke(bench_command, [str(out), "--runs", "2", "--json"], catch_exceptions=False)
    record = json.loads(result.output)
    assert record["runs"] == 2 and record["p50_ms"] > 0


def test_cli_bad_input_is_one_line_moeify_error(tmp_path):
    runner = CliRunner()
    for command, args in [
        (export_command, ["no_such_module_xyz:build", "-o", str(tmp_path / "m.onnx")]),
        (export_command, ["moeify:MoELayer", "-o", str(tmp_path / "m.onnx"), "--input-spec", "2xq"]),
        (export_command, ["moeify:MoEConfig", "-o", str(tmp_path / "m.onnx")]),  # the callable raises
        (run_command, [str(tmp_path / "missing.onnx")]),
        (bench_command, [str(tmp_path / "missing.onnx")]),
    ]:
        result = runner.invoke(command, args)
        assert result.exit_code != 0
        assert isinstance(result.exception, MoeifyError), (args, result.exception)
        assert "\n" not in str(result.exception)


def test_commands_under_the_moeify_group(tmp_path):
    """Registered on a MoeifyGroup (as the `moeify` command does), a MoeifyError is one line, exit 1."""
    cli = pytest.importorskip("moeify.cli")
    from moeify.cli.onnx_commands import COMMANDS

    group = cli.MoeifyGroup("moeify-test")
    for command in COMMANDS:
        group.add_command(command)
    result = CliRunner().invoke(group, ["bench", str(tmp_path / "missing.onnx")])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and "not found" in result.output
    assert "--target" in CliRunner().invoke(group, ["export", "--help"]).output
