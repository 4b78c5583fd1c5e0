"""Pieces every command shares: model-source options, consoles, --debug, option checks, formatting."""

from __future__ import annotations

import inspect
import re
import time
from contextlib import contextmanager
from pathlib import Path

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

DEBUG_KEY = "moeify.debug"


def out_console() -> Console:
    """Results go to stdout (created per call so click's test runner captures it).

    Piped output gets 140 columns rather than rich's 80, so tables of module paths stay whole in logs.
    """
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=140)


def err_console() -> Console:
    """Progress and status go to stderr, so `--json` on stdout stays clean."""
    return Console(stderr=True, highlight=False)


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


debug_option = click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                            help="Show the full traceback of an error.")


def _check_arch(_ctx, _param, value: str | None) -> str | None:
    from moeify.io.sources import is_callable_spec

    if value is not None and not is_callable_spec(value):
        raise click.BadParameter(f"{value!r} is not of the form module:callable (e.g. mypkg.models:build)")
    return value


def source_options(fn):
    """--arch and --trust-pickle: how to read a model argument."""
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Allow loading a full pickled module (.pt from torch.save(model)); this runs code "
                           "stored in the file.")(fn)
    fn = click.option("--arch", metavar="MODULE:CALLABLE", callback=_check_arch,
                      help="Builds the model for a weights-only file (state_dict .pt or .safetensors).")(fn)
    return fn


def load_source(spec: str, arch: str | None, trust_pickle: bool, what: str = "model"):
    """Load a model argument with a spinner on stderr."""
    from moeify.io import load_model

    if Path(spec).is_dir():
        quiet_transformers()
    start = time.perf_counter()
    with err_console().status(f"loading {what} {spec} ..."):
        loaded = load_model(spec, arch=arch, trust_pickle=trust_pickle)
    return loaded, time.perf_counter() - start


def quiet_transformers() -> None:
    """transformers' own loading bars would interleave with ours; the CLI shows a spinner instead."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()


def check_k(k: int | None, experts: int | None) -> int:
    """The k to use (default 2, at most the expert count); BadParameter (exit 2) when k > experts."""
    if k is None:
        return min(2, experts or 2)
    if experts is not None and k > experts:
        raise click.BadParameter(f"k={k} is larger than --experts {experts}; each token picks k of the "
                                 "experts, so use --k <= --experts", param_hint="'--k'")
    return k


def default_output(spec: str, experts: int, suffix: str = "moe") -> Path:
    """`path/model.pt` -> `./model-moe64`; `pkg.mod:build` -> `./build-moe64` (in the working directory)."""
    if ":" in spec and not Path(spec).exists():
        stem = spec.rpartition(":")[2].rpartition(".")[2]
    else:
        p = Path(spec.rstrip("/\\") or ".").resolve()
        stem = p.stem if p.is_file() else p.name
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "model"
    return Path(f"{stem}-{suffix}{experts}")


def human_count(n: int | float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int | float) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def dir_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@contextmanager
def byte_progress(description: str):
    """A progress bar over bytes written; yields the (done, total) callback the writers take."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=err_console(), transient=False) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


@contextmanager
def count_progress(description: str, total: int | None):
    """A progress bar over items (layers); yields advance(item, total=None)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[item]}"), TimeElapsedColumn())
    with Progress(*columns, console=err_console(), transient=False) as progress:
        task = progress.add_task(description, total=total, item="")

        def advance(item: str = "", total: int | None = None) -> None:
            progress.update(task, advance=1, item=item, **({"total": total} if total is not None else {}))

        yield advance


def examples(text: str):
    """Append an 'Examples' block (kept verbatim by click) to a command's help."""

    def wrap(fn):
        lines = "\n".join(f"  {line}" if line else "" for line in text.strip().splitlines())
        fn.__doc__ = inspect.cleandoc(fn.__doc__ or "") + "\n\n\b\nExamples:\n" + lines + "\n"
        return fn

    return wrap
