"""Safetensors weights: written shard by shard, read back with shape checks.

Layout (the one Hugging Face uses, so other tools can read it): one `model.safetensors`, or shards
`model-00001-of-0000N.safetensors` plus `model.safetensors.index.json` ({"metadata", "weight_map"}).
Tensors that share storage (tied embeddings) are written once; the aliases are returned so the recipe can
record them.

Memory: a shard is serialised from tensors that already exist (no copy of the model); safetensors turns
each shard into bytes before writing, so the extra memory is at most one shard (`max_shard_bytes`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are views of one already kept (same storage, offset, shape, strides).

    Returns (kept, aliases) where aliases maps a dropped name to the kept name it shares memory with.
    """
    kept: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if t.device.type == "meta":
            raise MoeifyError(f"tensor {name} is on the meta device (no data); materialise the model first")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = t
    return kept, aliases


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, metadata: dict[str, str] | None = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None
                      ) -> list[str]:
    """Write `state` (already deduplicated) into `directory`; returns the file names written."""
    from safetensors.torch import save_file

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in state.items():
        n = _nbytes(t)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    total = sum(_nbytes(t) for t in state.values())
    done = 0
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    meta = {"format": "pt", **(metadata or {})}
    if progress:
        progress(0, total)
    for file_name, shard in zip(names, shards, strict=True):
        tensors = {n: state[n].detach().to("cpu").contiguous() for n in shard}
        save_file(tensors, str(directory / file_name), metadata=meta)
        os.chmod(directory / file_name, 0o666 & ~_umask())  # safetensors creates 0600 files
        done += sum(_nbytes(t) for t in tensors.values())
        del tensors
        if progress:
            progress(done, total)
    if len(shards) > 1:
        weight_map = {n: file_name for file_name, shard in zip(names, shards, strict=True) for n in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
        names.append(INDEX_FILE)
    return names


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise MoeifyError(f"{index} is not a valid safetensors index ({e})") from e
        return [directory / f for f in sorted(set(weight_map.values()))]
    single = directory / SINGLE_FILE
    if not single.exists():
        raise MoeifyError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; is the directory complete?")
    return [single]


def read_into(model: nn.Module, directory: Path, aliases: dict[str, str] | None = None) -> None:
    """Load the safetensors weights of `directory` into `model`, shard by shard, checking every shape."""
    from safetensors import SafetensorError, safe_open

    expected = model.state_dict()
    seen: set[str] = set()
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for file in weight_files(directory):
        try:
            handle = safe_open(str(file), framework="pt")
        except (SafetensorError, OSError) as e:
            raise MoeifyError(f"{file} is not a readable safetensors file ({e}); is it corrupt or "
                              "truncated?") from e
        with handle as f:
            for name in f.keys():
                if name not in expected:
                    raise MoeifyError(f"{file.name} has tensor {name} that the rebuilt model lacks; the "
                                      "recipe and the weights do not match")
                t = f.get_tensor(name)
                want = expected[name]
                if tuple(t.shape) != tuple(want.shape):
                    raise MoeifyError(f"{name} has shape {tuple(t.shape)} in {file.name} but "
                                      f"{tuple(want.shape)} in the rebuilt model; the recipe and the weights "
                                      "do not match")
                target = params.get(name)
                if target is None:
                    target = buffers[name]
                with torch.no_grad():
                    target.copy_(t)
                seen.add(name)
    aliases = {a: t for a, t in (aliases or {}).items() if a in expected and a not in seen}
    missing = sorted(set(expected) - seen - set(aliases))
    if missing:
        raise MoeifyError(f"{len(missing)} tensor(s) of the model are not in {directory} (first: "
                          f"{missing[0]}); the weights are incomplete")
    tensors = {**buffers, **params}
    for alias, target in aliases.items():  # tied when saved; the rebuilt model may not tie them itself
        if alias in tensors and target in tensors and tensors[alias] is not tensors[target]:
            with torch.no_grad():
                tensors[alias].copy_(tensors[target])
