"""Bad input: a one-line message saying what is wrong and what to do; exit 2 or 1; nothing left."""

import pytest
import torch
from click.testing import CliRunner

from tests.cli_models import leftovers, user_model

pytest.importorskip("transformers")


def assert_one_line_error(result, code: int, *fragments: str):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    if code == 2:  # click's usage format: usage line, hint, then one "Error:" line
        lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    else:  # progress bars may precede it on stderr; the error is the one last line
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.stderr.strip().splitlines()[-1] == lines[-1]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_nothing_written(tmp_path, before: set):
    assert {p.name for p in tmp_path.iterdir()} == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("args, fragments", [
    (["convert", "nope.pt", "-e", "4"], ["no such file or directory: nope.pt"]),
    (["inspect", "nope/"], ["no such file or directory"]),
    (["convert", "tests.cli_models:no_ffn", "-e", "4"], ["no FFN found", "moeify inspect -v"]),
    (["convert", "tests.cli_models:softmax_mlp", "-e", "4"], ["no FFN found", "moeify inspect -v"]),
    (["convert", "no_such_module_xyz:build", "-e", "4"], ["cannot import module 'no_such_module_xyz'"]),
    (["verify", "moeify.zoo:tiny_llama", "missing-dir"], ["no such file or directory: missing-dir"]),
])
def test_user_errors_exit_1(run, tmp_path, args, fragments):
    before = {p.name for p in tmp_path.iterdir()}
    assert_one_line_error(run(*args), 1, "error:", *fragments)
    assert_nothing_written(tmp_path, before)


@pytest.mark.parametrize("content, fragment", [
    (b"\x00garbage" * 10, "not a readable PyTorch file"),
    (b"", "corrupt or truncated"),
])
def test_corrupt_file(run, tmp_path, content, fragment):
    (tmp_path / "bad.pt").write_bytes(content)
    assert_one_line_error(run("convert", "bad.pt", "-e", "4"), 1, fragment)
    assert_nothing_written(tmp_path, {"bad.pt"})


def test_unknown_format(run, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")
    assert_one_line_error(run("convert", "model.onnx", "-e", "4"), 1, "unknown model format '.onnx'")


def test_pickle_refused_without_trust(run, tmp_path):
    torch.save(user_model(), tmp_path / "m.pt")
    assert_one_line_error(run("convert", "m.pt", "-e", "2"), 1, "runs code when loaded", "--trust-pickle")
    assert_nothing_written(tmp_path, {"m.pt"})
    assert run("convert", "m.pt", "-e", "2", "--trust-pickle").exit_code == 0


def test_state_dict_needs_arch(run, tmp_path):
    torch.save(user_model().state_dict(), tmp_path / "w.pt")
    assert_one_line_error(run("convert", "w.pt", "-e", "2"), 1, "holds only weights", "--arch")


@pytest.mark.parametrize("args, fragment", [
    (["--experts", "0"], "0 is not in the range x>=1"),
    (["--experts", "2", "--k", "3"], "k=3 is larger than --experts 2"),
    (["--experts", "2", "--router", "bogus"], "'bogus' is not"),
    (["--experts", "2", "--init", "bogus"], "'bogus' is not"),
    (["--experts", "2", "--capacity-factor", "0"], "--capacity-factor"),
    (["--experts", "2", "--every", "0"], "--every"),
    (["--experts", "x"], "'x' is not a valid integer"),
    ([], "Missing option '--experts'"),
    (["--experts", "2", "--format", "pt", "-o", "dir"], "--format pt writes one file"),
    (["--experts", "2", "-o", "x.safetensors"], "moeify writes a directory"),
    (["--experts", "2", "--arch", "not a spec"], "is not of the form module:callable"),
])
def test_usage_errors_exit_2(run, tmp_path, args, fragment):
    assert_one_line_error(run("convert", "moeify.zoo:tiny_mlp", *args), 2, fragment)
    assert_nothing_written(tmp_path, set())


def test_existing_output_without_force(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert_one_line_error(run("convert", "moeify.zoo:tiny_mlp", "-e", "2", "-o", "out"), 1,
                          "out already exists; pass --force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    # --force does not delete a directory moeify did not write
    assert_one_line_error(run("convert", "moeify.zoo:tiny_mlp", "-e", "2", "-o", "out", "--force"), 1,
                          "did not write")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_output_never_overwrites_input(run, tmp_path):
    torch.save(user_model().state_dict(), tmp_path / "w.pt")
    result = run("convert", "w.pt", "--arch", "tests.cli_models:user_model", "-e", "2", "-o", "w.pt",
                 "--force")
    assert_one_line_error(result, 1, "would overwrite the input")
    assert torch.load(tmp_path / "w.pt", weights_only=True).keys() == user_model().state_dict().keys()


def test_unwritable_destination(run, tmp_path):
    (tmp_path / "afile").write_text("x")
    assert_one_line_error(run("convert", "moeify.zoo:tiny_mlp", "-e", "2", "-o", "afile/out"), 1,
                          "cannot write to afile/out")
    assert_nothing_written(tmp_path, {"afile"})


def test_failure_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    import moeify.io.recipe as recipe

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recipe, "write_safetensors", full_disk)
    assert_one_line_error(run("convert", "moeify.zoo:tiny_mlp", "-e", "2", "-o", "sub/out"), 1,
                          "No space left on device")
    assert_nothing_written(tmp_path, set())


def test_interrupt_while_writing_leaves_nothing(run, tmp_path, monkeypatch):
    import moeify.io.recipe as recipe

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "write_safetensors", interrupted)
    result = run("convert", "moeify.zoo:tiny_mlp", "-e", "2", "-o", "out")
    assert result.exit_code == 130 and "interrupted; nothing was written" in result.stderr
    assert_nothing_written(tmp_path, set())


def test_unexpected_error_is_one_line_with_hint(run, monkeypatch):
    import moeify

    def broken(*args, **kwargs):
        raise ValueError("something deep\nwith more lines")

    monkeypatch.setattr(moeify, "convert", broken)
    assert_one_line_error(run("convert", "moeify.zoo:tiny_mlp", "-e", "2"), 1,
                          "unexpected ValueError: something deep", "--debug")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, where):
    from moeify.cli import main
    from moeify.errors import MoeifyError

    monkeypatch.chdir(tmp_path)
    args = ["convert", "nope.pt", "-e", "2"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, MoeifyError)
