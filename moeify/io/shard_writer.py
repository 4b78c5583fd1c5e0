"""Safetensors shards written tensor by tensor: memory is one tensor, whatever the shard size.

The layout (every tensor's name, shape and dtype, in the order they will come) is known before the first
byte: the shards are planned from it (the same greedy cut and file names as `weights.write_safetensors`),
each shard's header is written when it opens, and each tensor's bytes go straight to the file.
`files()` names what was written, the index JSON included when there are several shards.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moeify.io.safetensors_file import DTYPE_NAMES
from moeify.io.weights import INDEX_FILE, SINGLE_FILE, _umask

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class Slot:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(layout: list[Slot], max_shard_bytes: int) -> list[list[Slot]]:
    shards: list[list[Slot]] = [[]]
    size = 0
    for slot in layout:
        if shards[-1] and size + slot.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(slot)
        size += slot.nbytes
    return shards


def _header(shard: list[Slot], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for slot in shard:
        entries[slot.name] = {"dtype": DTYPE_NAMES[slot.dtype], "shape": list(slot.shape),
                              "data_offsets": [offset, offset + slot.nbytes]}
        offset += slot.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Write `layout`'s tensors, in its order, into `directory` as safetensors shards."""

    def __init__(self, directory: Path, layout: list[Slot], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None, progress: Progress | None = None):
        self.directory = Path(directory)
        self.shards = plan_shards(layout, max_shard_bytes)
        n = len(self.shards)
        self.names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.metadata = {"format": "pt", **(metadata or {})}
        self.total = sum(slot.nbytes for slot in layout)
        self.done = 0
        self.progress = progress
        self._queue = [(i, slot) for i, shard in enumerate(self.shards) for slot in shard]
        self._next = 0
        self._file = None
        if progress:
            progress(0, self.total)

    @property
    def expected(self) -> Slot | None:
        """The slot the next `write` must fill (None when all are written)."""
        return self._queue[self._next][1] if self._next < len(self._queue) else None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard_index, slot = self._queue[self._next]
        if name != slot.name or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise RuntimeError(f"shard writer expected {slot}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if self._file is None:
            path = self.directory / self.names[shard_index]
            self._file = open(path, "wb")
            self._file.write(_header(self.shards[shard_index], self.metadata))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)
        self._next += 1
        self.done += slot.nbytes
        if self._next == len(self._queue) or self._queue[self._next][0] != shard_index:
            self._file.close()
            self._file = None
        if self.progress:
            self.progress(self.done, self.total)

    def files(self) -> list[str]:
        """Finish: write the index (when sharded); the file names written. Every slot must be filled."""
        if self._next != len(self._queue):
            raise RuntimeError(f"shard writer closed with {len(self._queue) - self._next} tensors unwritten")
        names = list(self.names)
        if len(self.shards) > 1:
            weight_map = {slot.name: file for file, shard in zip(self.names, self.shards, strict=True)
                          for slot in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
            names.append(INDEX_FILE)
        for name in self.names:  # as other files, not the 0600 a private temp file might get
            os.chmod(self.directory / name, 0o666 & ~_umask())
        return names

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

