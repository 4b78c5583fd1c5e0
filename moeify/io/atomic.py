"""Outputs appear whole or not at all.

Everything is written to a temporary sibling of the destination and renamed into place at the end; on
any failure (or Ctrl-C) the temporary path is removed, so no partial output is left behind. An input is
never overwritten, even with `force`.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from moeify.errors import MoeifyError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def _overlaps(a: Path, b: Path) -> bool:
    """True when a and b are the same path or one contains the other."""
    return a == b or a in b.parents or b in a.parents


def check_destination(out: Path, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Refuse an output that would overwrite an input, or an existing one without `force`."""
    target = out.resolve()
    for src in inputs:
        if src is not None and _overlaps(target, Path(src).resolve()):
            raise MoeifyError(f"refusing to write {out}: it would overwrite the input {src}; choose another "
                              "-o")
    existing = next(p for p in [out.parent.absolute(), *out.parent.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise MoeifyError(f"cannot write to {out}: {existing} is not a directory; choose another -o")
    if not os.access(existing, os.W_OK):
        raise MoeifyError(f"cannot write to {out}: {existing} is not writable; choose another -o")
    if out.exists() or out.is_symlink():
        if not force:
            raise MoeifyError(f"{out} already exists; pass --force to replace it or choose another -o")
        if out.is_dir() and not out.is_symlink() and any(out.iterdir()) and not _looks_like_output(out):
            raise MoeifyError(f"{out} is a non-empty directory that moeify did not write; refusing to "
                              "replace it even with --force: choose another -o")


def _looks_like_output(path: Path) -> bool:
    return any((path / name).exists() for name in ("moeify.json", "config.json", "genai_config.json"))


@contextmanager
def atomic_output(out: Path, *, directory: bool, force: bool = False,
                  inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary path to write into; it becomes `out` when the block ends without error."""
    out = Path(out)
    check_destination(out, force, inputs)
    created: list[Path] = []
    parent = out.parent
    missing_parents = [p for p in [parent, *parent.parents] if not p.exists()]
    tmp = parent / f".{out.name}.moeify-tmp-{uuid.uuid4().hex[:8]}"
    try:
        for p in reversed(missing_parents):
            p.mkdir()
            created.append(p)
        if directory:
            tmp.mkdir()
        else:
            tmp.touch()
    except OSError as e:
        for p in reversed(created):
            _remove(p)
        raise MoeifyError(f"cannot write to {out}: {e.strerror or e}; choose a writable -o") from e
    try:
        yield tmp
        if out.exists() or out.is_symlink():
            old = parent / f".{out.name}.moeify-old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)
                raise
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        for p in reversed(created):
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise
