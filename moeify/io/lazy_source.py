"""Where a conversion reads its dense tensors from: a checkpoint on disk, read one tensor at a time, or a
model already in memory. Both answer the same questions (`names`, `shape`, `dtype`, `get`, `where`),
so one conversion code path (moeify/io/streaming.py) serves both.

Also the *structure* of the model each one holds: the model with its parameters on the meta device (no
weight memory), which the analysis passes run on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.io.empty_init import empty_params, meta_copy
from moeify.io.safetensors_file import TensorInfo, read_header, read_tensor
from moeify.io.weights import INDEX_FILE, SINGLE_FILE


def shard_paths(directory: Path) -> dict[str, Path]:
    """tensor name -> the file the index (or the single file) says holds it; missing files refused."""
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise MoeifyError(f"{index} is not a valid safetensors index ({e!r}); download it again") from e
        for file in sorted(set(files.values())):
            if not file.exists():
                raise MoeifyError(f"{file} is missing: {index.name} lists it; the checkpoint is incomplete, "
                                  "download it again")
        return files
    single = directory / SINGLE_FILE
    if not single.exists():
        raise MoeifyError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}; streaming conversion reads "
                          "safetensors checkpoints (save the model with safe_serialization=True)")
    return {name: single for name in read_header(single)[0]}


class CheckpointSource:
    """The tensors of a safetensors checkpoint directory, read lazily: only the headers up front."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        listed = shard_paths(self.directory)
        headers = {file: read_header(file)[0] for file in sorted(set(listed.values()))}
        self._info: dict[str, tuple[Path, TensorInfo]] = {}
        for name, file in listed.items():
            if name not in headers[file]:
                raise MoeifyError(f"{file} lacks tensor {name} that {INDEX_FILE} places there; the checkpoint "
                                  "is damaged or mixed from two versions: download it again")
            self._info[name] = (file, headers[file][name])

    def names(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1].shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info[name][1].dtype

    def where(self, name: str) -> str:
        return str(self._info[name][0])

    def get(self, name: str) -> torch.Tensor:
        file, info = self._info[name]
        return read_tensor(file, info)


class ModelSource:
    """The tensors of a model in memory (no copy: its state dict's tensors themselves)."""

    def __init__(self, model: nn.Module):
        self._state = {k: v.detach() for k, v in model.state_dict().items()}
        self.label = type(model).__name__

    def names(self) -> list[str]:
        return list(self._state)

    def __contains__(self, name: str) -> bool:
        return name in self._state

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def where(self, name: str) -> str:
        return f"the {self.label} in memory"

    def get(self, name: str) -> torch.Tensor:
        return self._state[name]


def hf_structure(directory: Path) -> tuple[nn.Module, dict]:
    """The Hugging Face model of `directory` built from its config.json with meta parameters, and its
    source record (how `moeify.load` rebuilds it)."""
    from moeify.io.sources import hf_config_and_class, hf_source, no_init_weights

    config, cls = hf_config_and_class(Path(directory))
    with no_init_weights(), empty_params():
        model = cls(config)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval(), hf_source(model)


def model_structure(model: nn.Module) -> nn.Module:
    """A model in memory as structure only (a meta copy: costs its buffers, not its weights)."""
    return meta_copy(model)
