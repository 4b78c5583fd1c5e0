"""A real text corpus that is always there offline: the Python standard library's own source files.

Byte-level: every byte is a token (vocabulary 256), so there is no tokenizer to train or download.
The held-out split is by file and fixed: a file is held out when the CRC32 of its path relative to the
stdlib root falls in the held-out bucket, so the split does not depend on the order files are listed
in, on the machine, or on the random seed. (A different Python version has different files, and so a
slightly different corpus.) The held-out files are split the same way, in halves: a validation split (to
watch and tune on) and a test split (for final numbers only).
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

Tensor = torch.Tensor

HELD_OUT_BUCKETS = 20  # 1 bucket in 20 (about 5% of the files) is held out
SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    train: Tensor  # [N_train] uint8 bytes
    held_out: Tensor  # [N_held] uint8 bytes
    train_files: int
    held_out_files: int
    validation: Tensor  # [N_val] uint8: the held-out files of the validation half
    test: Tensor  # [N_test] uint8: the held-out files of the test half


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every *.py under the stdlib directory except third-party packages (site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]  # prune, don't filter
        found += [Path(folder) / n for n in names if n.endswith(".py")]
    return sorted(found)


def is_held_out(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % HELD_OUT_BUCKETS == 0


def is_test(relative_path: str) -> bool:
    """A held-out file's half: test when the CRC32's bucket quotient is odd, else validation."""
    return zlib.crc32(relative_path.encode()) // HELD_OUT_BUCKETS % 2 == 1


def load_corpus(max_files: int | None = None, root: Path | None = None) -> Corpus:
    """Read the stdlib sources and split them by file; `max_files` keeps the first files in path order."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = stdlib_files(root)
    if max_files is not None:
        # keep the path order but make sure a quick run still has held-out files
        # keep the path order but make sure a quick run still has held-out files of both halves
        rel = {f: f.relative_to(root).as_posix() for f in files}
        rest = [f for f in files if not is_held_out(rel[f])]
        halves = [[f for f in files if is_held_out(rel[f]) and is_test(rel[f]) == t] for t in (False, True)]
        keep = max(1, max_files // HELD_OUT_BUCKETS // 2)
        files = rest[:max_files] + halves[0][:keep] + halves[1][:keep]
    train, validation, test = [], [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        split = (test if is_test(rel) else validation) if is_held_out(rel) else train
        split.append(f.read_bytes())
    if not train or not validation or not test:
        raise RuntimeError(f"found no usable Python sources under {root}")

    def to_tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(SEPARATOR.join(chunks)), dtype=torch.uint8)  # [N]

    return Corpus(to_tensor(train), to_tensor(validation + test), len(train), len(validation) + len(test),
                  to_tensor(validation), to_tensor(test))


class BatchSampler:
    """Random windows of `context + 1` bytes from a byte stream; its own generator, so runs that use the
    same seed see exactly the same batches in the same order."""

    def __init__(self, data: Tensor, batch_size: int, context: int, seed: int):
        if data.numel() <= context + 1:
            raise ValueError(f"corpus of {data.numel()} bytes is too small for context {context}")
        self.data, self.batch_size, self.context = data, batch_size, context
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(0, self.data.numel() - self.context - 1, (self.batch_size,),
                               generator=self.gen)  # [B]
        offsets = torch.arange(self.context + 1)  # [T+1]
        window = self.data[starts[:, None] + offsets].long()  # [B, T+1]
        return window[:, :-1], window[:, 1:]  # inputs [B, T], targets [B, T]


def eval_batches(data: Tensor, num_sequences: int, context: int,
                 batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """A fixed held-out set: `num_sequences` windows at evenly spaced offsets, in batches."""
    last = data.numel() - context - 1
    starts = torch.linspace(0, last, num_sequences).long()  # [S]
    offsets = torch.arange(context + 1)  # [T+1]
    windows = data[starts[:, None] + offsets].long()  # [S, T+1]
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]
