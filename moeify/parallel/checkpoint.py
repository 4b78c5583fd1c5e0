"""Save and load (expert-)parallel models with `torch.distributed.checkpoint` (DCP).

The expert weights are DTensors with `Shard(0)` placements, so DCP records which rows each rank wrote
and a checkpoint taken on N ranks loads on M ranks, or into a plain single-process model, without any
conversion step. The helpers take the state dicts through `torch.distributed.checkpoint.state_dict`,
which strips DDP/FSDP wrapper prefixes: the keys are the plain model's.
"""

from __future__ import annotations

import os
import warnings

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _state(model: nn.Module, optimizer: Optimizer | None) -> dict:
    # Distributed: the state_dict helpers strip DDP/FSDP prefixes and keep DTensors (DCP's metadata).
    state = {"model": get_model_state_dict(model) if _distributed() else model.state_dict()}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name
    return state


def save_checkpoint(model: nn.Module, path: str | os.PathLike, optimizer: Optimizer | None = None) -> None:
    """Write `model` (and `optimizer`) to the DCP checkpoint directory `path`; call on every rank."""
    with warnings.catch_warnings():  # DCP warns that a single-process save is "assumed": it is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_state(model, optimizer), checkpoint_id=path, no_dist=not _distributed())


def load_checkpoint(model: nn.Module, path: str | os.PathLike, optimizer: Optimizer | None = None) -> None:
    """Load a DCP checkpoint written by `save_checkpoint` on any number of ranks into `model` in place.

    Works for a parallelized model on any group size whose expert counts divide, and for a plain model in
    one process (no process group needed). With `optimizer`, its state is restored too.
    """
    state = _state(model, optimizer)
    with warnings.catch_warnings():  # DCP warns that a single-process load is "assumed": it is intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    if _distributed():
        set_model_state_dict(model, state["model"])
    else:
        model.load_state_dict(state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
