"""Calibration without the model in memory: the calibration batch runs through the dense model's
structure (meta parameters) with each module's weights read from the checkpoint just before the module
runs and dropped as soon as it returns, as sequential quantisers (GPTQ) carry their batch through one
block at a time. The model's own forward does the orchestration (embeddings, rotary tables, masks, what
happens between blocks), so no per-architecture block loop is needed.

Memory: the structure's buffers + the weights of the modules being executed (a decoder block's linear and
its ancestors' own parameters) + the activations + what the FFNs saw. The forward stops once every
selected FFN has run, no block holding one is running, and a module whose weights were never needed is
about to start (a decoder's final norm): the LM head, often the largest matrix, is never read. (A block
holding an FFN is the FFN's parent module; a shared block called in a loop, as ALBERT's, is inside it.)

What each FFN saw is what `moeify.convert(model, calibration=...)` records on the loaded model: the same
modules run the same operations on the same weights, so the calibrated inits come out equal.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.passes import Site
from moeify.passes.calibrate import call_model, joined, recording

Tensor = torch.Tensor


class _Stop(Exception):
    """Raised by a hook once every FFN has been recorded: the rest of the forward is not needed."""


def _owners(structure: nn.Module, reader) -> list[tuple[nn.Module, str]]:
    """(module, its path) for every module holding its own parameters or checkpoint buffers."""
    owners = []
    for path, module in structure.named_modules():
        prefix = f"{path}." if path else ""
        has_params = any(p is not None for p in module._parameters.values())
        has_stored = any(b is not None and reader.name_in_source(prefix + n) is not None
                         for n, b in module._buffers.items())
        if has_params or has_stored:
            owners.append((module, prefix))
    return owners


def _blocks(structure: nn.Module, sites) -> list[nn.Module]:
    """The module each FFN is called from: its parent (above a ModuleList/ModuleDict, which never runs)."""
    blocks = {}
    for site in sites:
        path = site.match.name.rpartition(".")[0]
        module = structure.get_submodule(path)
        while isinstance(module, (nn.ModuleList, nn.ModuleDict)) and path:
            path = path.rpartition(".")[0]
            module = structure.get_submodule(path)
        blocks[id(module)] = module
    return list(blocks.values())


class _Loader:
    """Forward hooks that give a module its real tensors while it runs and its meta ones back after."""

    def __init__(self, reader, sinks: dict[str, list], on_load: Callable[[int], None] | None):
        self.reader, self.sinks, self.on_load = reader, sinks, on_load
        self.seen: set[int] = set()
        self.running_blocks = 0  # blocks holding an FFN that are running now
        self.saved: dict[int, tuple[nn.Module, dict, dict]] = {}  # loaded now: its meta tensors
        self.depth: dict[int, int] = {}  # loaded now: how many of its calls are running

    def unload(self, key: int) -> None:
        self.depth.pop(key, None)
        mod, params, buffers = self.saved.pop(key)
        mod._parameters.update(params)
        mod._buffers.update(buffers)

    def unload_all(self) -> None:
        """After a forward that stopped or failed midway: the modules still loaded get meta tensors back."""
        for key in list(self.saved):
            self.unload(key)

    def hooks(self, module: nn.Module, prefix: str):
        def before(mod, args):
            if id(mod) not in self.seen and not self.running_blocks and all(self.sinks.values()):
                raise _Stop  # a module not needed before (final norm, head): every FFN has been seen
            self.seen.add(id(mod))
            self.depth[id(mod)] = self.depth.get(id(mod), 0) + 1
            if self.depth[id(mod)] > 1:  # re-entered while loaded (a module calling itself): keep it
                return
            self.saved[id(mod)] = (mod, dict(mod._parameters), dict(mod._buffers))
            loaded = 0
            for name, p in mod._parameters.items():
                if p is not None:
                    t = self.reader.get_parameter(prefix + name)
                    mod._parameters[name] = nn.Parameter(t, requires_grad=False)
                    loaded += t.nbytes
            for name, b in mod._buffers.items():
                if b is not None and self.reader.name_in_source(prefix + name) is not None:
                    mod._buffers[name] = self.reader.get(prefix + name)
            if self.on_load is not None:
                self.on_load(loaded)

        def after(mod, args, output):
            self.depth[id(mod)] -= 1
            if not self.depth[id(mod)]:
                self.unload(id(mod))

        return module.register_forward_pre_hook(before), module.register_forward_hook(after)

    def block_hooks(self, block: nn.Module):
        def enter(mod, args):
            self.running_blocks += 1

        def leave(mod, args, output):
            self.running_blocks -= 1

        return block.register_forward_pre_hook(enter), block.register_forward_hook(leave)


@torch.no_grad()
def calibrate_lazily(structure: nn.Module, sites: tuple[Site, ...], reader, inputs, *,
                     in_memory_hint: str, on_load: Callable[[int], None] | None = None) -> dict[str, Tensor]:
    """FFN name -> its inputs [N, D] over one forward of the dense model on `inputs`, with only the running
    modules' weights in memory. `structure` is the dense model with meta parameters (left as it was);
    `reader` reads a tensor by its name in it (streaming.TensorReader). On a model this cannot run
    (a forward reading a module's weights outside that module's call), a one-line error ending in
    `in_memory_hint`. `on_load(bytes)` is told each module's weight bytes as they are read."""
    handles, loader = [], None
    try:
        with recording(structure, list(sites)) as sinks:
            loader = _Loader(reader, sinks, on_load)
            for block in _blocks(structure, sites):
                handles.extend(loader.block_hooks(block))
            for module, prefix in _owners(structure, reader):
                handles.extend(loader.hooks(module, prefix))
            try:
                call_model(structure, inputs)
            except _Stop:
                pass
            except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise MoeifyError(f"calibrating {type(structure).__name__} one module at a time failed "
                                  f"({first}); {in_memory_hint}") from e
            recorded = joined(sinks)
    finally:
        for h in handles:
            h.remove()
        if loader is not None:
            loader.unload_all()
    for name, x in recorded.items():
        if x.device.type == "meta":
            raise MoeifyError(f"calibrating {type(structure).__name__} one module at a time gave {name} no "
                              f"values (its forward uses weights outside the modules holding them); "
                              f"{in_memory_hint}")
    return recorded
