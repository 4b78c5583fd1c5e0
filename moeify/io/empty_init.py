"""Models without weight memory: parameters on the meta device, buffers real.

`empty_params()` makes every parameter registered inside it a meta tensor (shape and dtype, no data), as
accelerate's `init_empty_weights(include_buffers=False)` does; buffers stay real, so values a module
computes in its constructor (rotary frequencies, position ids) are right. The analysis passes and
`convert(init="none")` run on such a model; `moeify.load` then assigns the checkpoint's tensors.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def empty_params() -> Iterator[None]:
    """Parameters registered inside the block live on the meta device."""
    original = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kwargs = dict(param.__dict__)  # HF keeps flags (e.g. _is_hf_initialized) on parameters
            meta = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(kwargs)
            module._parameters[name] = meta

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose parameters are on the meta device (buffers copied): its structure,
    at the cost of its buffers only. Tied parameters stay tied."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    return copy.deepcopy(model, memo)
