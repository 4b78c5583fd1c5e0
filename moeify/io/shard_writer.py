"""Safetensors shards written tensor by tensor, or piece by piece: memory is one piece, whatever the
shard size.

The layout (every tensor's name, shape and dtype, in the order they are stored) is known before the first
byte: the shards are planned from it (the same greedy cut and file names as `weights.write_safetensors`),
so every tensor's place in its file is known. A shard's header is written when the shard is first
written to, and each tensor's bytes go straight to their place: whole (`write`), or in pieces
(`write_part`: e.g. expert e's rows of a row-major [E, ...] tensor, one expert at a time), in any order.
A shard is closed once all its bytes are written. `files()` names what was written, the index JSON
included when there are several shards.
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
    """Write `layout`'s tensors into `directory` as safetensors shards (files as `plan_shards` cuts them)."""

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
        self._headers = [_header(shard, self.metadata) for shard in self.shards]
        self._place: dict[str, tuple[int, int, Slot]] = {}  # name -> (shard, file offset of its data, slot)
        for index, (shard, header) in enumerate(zip(self.shards, self._headers, strict=True)):
            offset = len(header)
            for slot in shard:
                self._place[slot.name] = (index, offset, slot)
                offset += slot.nbytes
        self._written = dict.fromkeys(self._place, 0)  # name -> bytes written
        self._left = [sum(slot.nbytes for slot in shard) for shard in self.shards]  # bytes per shard
        self._open: dict[int, object] = {}  # shard -> its file, from its first write to its last
        self._started: set[int] = set()
        if progress:
            progress(0, self.total)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """The whole tensor `name` (its shape and dtype as planned)."""
        slot = self._slot(name)
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise RuntimeError(f"shard writer expected {slot}, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        self.write_part(name, tensor, 0)

    def write_part(self, name: str, tensor: torch.Tensor, start: int) -> None:
        """Bytes [start, start + tensor's bytes) of tensor `name`, as a row-major `tensor` of its dtype
        holds them (e.g. start = e * one expert's bytes for expert e of an [E, ...] tensor)."""
        slot = self._slot(name)
        nbytes = tensor.numel() * tensor.element_size()
        if tensor.dtype != slot.dtype or start < 0 or start + nbytes > slot.nbytes:
            raise RuntimeError(f"shard writer: {name} {tensor.dtype} bytes [{start}, {start + nbytes}) do "
                               f"not fit {slot}")
        index, offset, _ = self._place[name]
        if index not in self._started:  # its header first (a shard of empty tensors is the header alone)
            self._started.add(index)
            self._open[index] = open(self.directory / self.names[index], "wb")
            self._open[index].write(self._headers[index])
        if nbytes:
            data = tensor.detach().to("cpu").contiguous().reshape(-1)
            file = self._open[index]
            file.seek(offset + start)
            file.write(data.view(torch.uint8).numpy().data)
        self._written[name] += nbytes
        self._left[index] -= nbytes
        self.done += nbytes
        if self._left[index] == 0 and index in self._open:
            self._open.pop(index).close()
        if self.progress:
            self.progress(self.done, self.total)

    def _slot(self, name: str) -> Slot:
        if name not in self._place:
            raise RuntimeError(f"shard writer: {name} is not in the planned layout")
        return self._place[name][2]

    def files(self) -> list[str]:
        """Finish: write the index (when sharded); the file names written. Every byte must be written."""
        unwritten = [name for name, (index, _, slot) in self._place.items()
                     if self._written[name] != slot.nbytes or index not in self._started]
        if unwritten:
            raise RuntimeError(f"shard writer closed with {len(unwritten)} tensors not (or not exactly) "
                               f"written, first {unwritten[0]}")
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
        for file in self._open.values():
            file.close()
        self._open.clear()
