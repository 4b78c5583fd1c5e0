"""The example inputs `export_onnx` traces with: normalised to (args, kwargs) in the export dtype, and the
batch/sequence axes marked dynamic (widened from size 1 first: torch.export specialises size-1 axes).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from moeify.errors import MoeifyError


def hf_example_inputs(model: nn.Module, batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    """input_ids [batch, seq] for a transformers model, from its config's vocab_size."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int):
        raise MoeifyError("example inputs are needed for this model (it has no config.vocab_size to make "
                          "input_ids from); pass example_inputs")
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)}


def normalise_inputs(model, example_inputs, dtype) -> tuple[tuple, dict]:
    if example_inputs is None:
        args, kwargs = (), hf_example_inputs(model)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise MoeifyError("example_inputs must be a tensor, a tuple or a dict, "
                          f"got {type(example_inputs).__name__}")

    def cast(v):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def widen_unit_axes(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Repeat example inputs along dynamic axes of size 1 (to 2): torch.export specialises size-1 axes,
    and the exported graph was then silently wrong at other sizes (seen with a batch-1 example)."""

    def widen(v, spec):
        if not isinstance(v, torch.Tensor) or not spec:
            return v
        for axis in spec:
            if v.shape[axis] == 1:
                v = torch.cat([v, v], dim=axis)
        return v

    shapes = guess_dynamic_shapes(args, kwargs)
    if isinstance(shapes, tuple):
        args = tuple(widen(a, s) for a, s in zip(args, shapes, strict=True))
    elif isinstance(shapes, dict):
        kwargs = {k: widen(v, shapes[k]) for k, v in kwargs.items()}
    return args, kwargs


def guess_dynamic_shapes(args: tuple, kwargs: dict):
    """Batch and sequence axes: integer inputs [B, S] (ids, masks); float inputs [B, S, D] or [T, D]."""
    Dim = torch.export.Dim
    batch, seq, tokens = Dim("batch"), Dim("seq"), Dim("tokens")

    def spec(v):
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return None
        if not v.is_floating_point():
            return {0: batch, 1: seq} if v.dim() == 2 else ({0: tokens} if v.dim() == 1 else {0: batch})
        if v.dim() == 2:
            return {0: tokens}
        return {0: batch, 1: seq} if v.dim() == 3 else {0: batch}

    if kwargs and not args:
        return {k: spec(v) for k, v in kwargs.items()}
    if args and not kwargs:
        return tuple(spec(a) for a in args)
    return None  # mixed positional and keyword inputs: let torch.export decide (static)
