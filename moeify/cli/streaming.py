"""`moeify convert` of a Hugging Face safetensors directory: streamed (moeify/io/streaming.py), so memory
stays at one expert (+ one dense FFN) whatever the model's size. Other inputs (and --no-stream) convert in memory."""

from __future__ import annotations

import re
from pathlib import Path

import click

DTYPES = ("float32", "float16", "bfloat16")
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)
UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_size(text: str) -> int:
    """'5GB' / '500MB' / '2GiB' / '1000000' -> bytes."""
    found = SIZE_RE.match(str(text))
    if found is None:
        raise click.BadParameter(f"{text!r} is not a size; write e.g. 5GB, 500MB or 2GiB",
                                 param_hint="'--shard-size'")
    number, unit = float(found.group(1)), found.group(2).upper()
    scale = UNITS[unit[:1]] if "I" not in unit else 1024 ** "KMGT".index(unit[0]) * 1024
    if number * scale < 1:
        raise click.BadParameter("the shard size must be at least 1 byte", param_hint="'--shard-size'")
    return int(number * scale)


def streamable(model: str, fmt: str) -> bool:
    """A Hugging Face directory with safetensors weights, written as moeify or a Hugging Face MoE."""
    from moeify.io.weights import INDEX_FILE, SINGLE_FILE  # (imports torch: not at CLI start-up)

    path = Path(model)
    return (fmt != "pt" and path.is_dir() and (path / "config.json").exists()
            and ((path / SINGLE_FILE).exists() or (path / INDEX_FILE).exists()))


def convert_streaming(model: str, out: Path, fmt: str, config, *, dtype: str | None, shard_bytes: int,
                      force: bool, console) -> bool:
    """Stream `model` to `out`; False (nothing written) when its tensors do not map one to one onto the
    model's, so the caller converts it in memory instead."""
    import time

    import torch

    from moeify.cli.common import byte_progress, dir_size, human_bytes
    from moeify.cli.summary import conversion_table, totals_line
    from moeify.io.streaming import NotStreamable, convert_checkpoint

    start = time.perf_counter()
    try:
        with byte_progress(f"converting {model} (streamed)") as progress:
            report = convert_checkpoint(Path(model), out, config, fmt=fmt, max_shard_bytes=shard_bytes,
                                        dtype=getattr(torch, dtype) if dtype else None, force=force,
                                        progress=progress)
    except NotStreamable as e:
        console.print(f"note: not streamed, loading it whole: {e}")
        return False
    console.print(conversion_table(report))
    console.print(totals_line(report))
    console.print(f"wrote {out} ({human_bytes(dir_size(out))}, {fmt}, streamed) in "
                  f"{time.perf_counter() - start:.1f}s")
    if fmt == "moeify":
        console.print(f"next: moeify verify {model} {out}")
    return True
