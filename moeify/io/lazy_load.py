"""Load weights without a second copy: the model is built with meta parameters and each parameter
*becomes* a tensor read straight from the safetensors file into its own memory
(`load_state_dict(assign=True)`), so the peak is the model plus the runtime plus one tensor, not twice the
model. With `dtype` or `device` each tensor is converted as it is read.

Why read and not mmap: a mapped tensor is only as aligned as its offset in the file (8 bytes), and the
CPU matmul kernels round differently on unaligned data (measured: outputs 5e-7 off the saved model's with
bit-identical weights). Read into fresh (64-byte aligned) memory, the loaded model computes exactly what
the saved one did; page cache is not counted in the process's memory either way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.io.safetensors_file import read_header, read_tensor
from moeify.io.weights import weight_files


def _converted(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | str | None) -> torch.Tensor:
    if dtype is not None and t.is_floating_point() and dtype.is_floating_point:
        t = t.to(dtype)
    return t.to(device) if device is not None else t


def assign_weights(model: nn.Module, directory: Path, aliases: dict[str, str] | None = None, *,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
    """Make `model`'s parameters and buffers the tensors of `directory`'s safetensors files, in `dtype`
    (floating tensors; default: the dtype each has in `model`) on `device` (default: CPU)."""
    expected = model.state_dict(keep_vars=True)
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(directory):
        for name, info in read_header(file)[0].items():
            if name not in expected:
                raise MoeifyError(f"{file.name} has tensor {name} that the rebuilt model lacks; the recipe and "
                                  "the weights do not match")
            if info.shape != tuple(expected[name].shape):
                raise MoeifyError(f"{name} has shape {info.shape} in {file.name} but "
                                  f"{tuple(expected[name].shape)} in the rebuilt model; the recipe and the "
                                  "weights do not match")
            want = dtype if dtype is not None else expected[name].dtype  # as the rebuilt model has it
            state[name] = _converted(read_tensor(file, info), want, device)
    for alias, target in (aliases or {}).items():
        if alias in expected and alias not in state and target in state:
            state[alias] = state[target]
    missing = sorted(n for n, t in expected.items() if n not in state and t.device.type == "meta")
    if missing:
        raise MoeifyError(f"{len(missing)} tensor(s) of the model are not in {directory} (first: "
                          f"{missing[0]}); the weights are incomplete")
    model.load_state_dict(state, strict=False, assign=True)
    _retie(model, aliases or {})
    if device is not None:  # buffers the constructors built (not in the files): moved, dtype kept
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Tied parameters (saved once) are one Parameter object again, as the model had them."""
    for alias, target in aliases.items():
        owner, _, leaf = alias.rpartition(".")
        module = model.get_submodule(owner)
        if leaf in module._parameters:
            module._parameters[leaf] = model.get_parameter(target)
