"""Calibration: run the (still dense) model on example inputs and keep what each FFN saw.

Used by calibration-based upcycling (k-means router init, clustered neuron split). For every selected
FFN it records its input x [N, D] (all leading dims flattened; every call of a shared FFN is kept).
The up projection gets a forward pre-hook when it is a module; an FFN written with F.linear gets a
temporary copy of its traced method that records x, removed afterwards. The model runs in eval mode;
every module's training flag is put back as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from moeify.passes.analyse import Site
from moeify.passes.rewrite import install_method
from torch import nn

Tensor = torch.Tensor


class _Recorder(nn.Module):
    def __init__(self, sink: list):
        super().__init__()
        self.sink = sink

    def forward(self, x):
        self.sink.append(x.detach().reshape(-1, x.shape[-1]))
        return x


def _pre_hook(sink: list):
    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        sink.append(x.detach().reshape(-1, x.shape[-1]))

    return hook


def _not(node):
    return lambda user: user is not node


def call_model(model: nn.Module, inputs):
    """`model` on example inputs: a tensor, a tuple of positional args, or a dict of keyword args."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def recording(model: nn.Module, sites: list[Site]) -> Iterator[dict[str, list[Tensor]]]:
    """Inside the block, every call of a site's FFN appends its input [n, D] to `sinks[name]` (the
    yielded dict); the model is in eval mode. On exit the hooks and recording copies are removed and
    every module's training flag is put back."""
    sinks: dict[str, list] = {s.match.name: [] for s in sites}
    hooks, patched, recorders, copies = [], [], [], {}
    modes = [(m, m.training) for m in model.modules()]
    try:
        for site in sites:
            cand, sink = site.cand, sinks[site.match.name]
            if cand.up.op == "call_module":
                up = cand.cap.modules[cand.up.target]
                hooks.append(up.register_forward_pre_hook(_pre_hook(sink), with_kwargs=True))
                continue
            # F.linear on parameters: a recording copy of the traced method, for this forward only
            key = (id(cand.cap.module), cand.cap.method)
            if key not in copies:  # one copy per traced method, however many FFNs it holds
                graph = copy.deepcopy(cand.cap.graph, memo={})
                copies[key] = (
                    cand.cap.module,
                    cand.cap.method,
                    graph,
                    dict(zip(cand.cap.graph.nodes, graph.nodes, strict=True)),
                )
            host, _, graph, node_map = copies[key]
            x = node_map[cand.x]
            name = f"_moeify_record_{len(recorders)}"
            host.add_module(name, _Recorder(sink))
            recorders.append((host, name))
            with graph.inserting_after(x):
                rec = graph.call_module(name, (x,))
            x.replace_all_uses_with(rec, delete_user_cb=_not(rec))
        for host, method, graph, _ in copies.values():
            patched.append((host, method, host.__dict__.get(method)))
            install_method(host, method, graph)
        model.eval()
        yield sinks
    finally:
        for h in hooks:
            h.remove()
        for host, method, previous in patched:
            del host.__dict__[method]
            if previous is not None:
                host.__dict__[method] = previous
        for host, name in recorders:
            delattr(host, name)
        for m, training in modes:  # model.train(flag) would set one flag on every module
            m.training = training


def joined(sinks: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """FFN name -> its recorded inputs as one [N, D] tensor (empty when it never ran)."""
    return {name: torch.cat(parts) if parts else torch.empty(0) for name, parts in sinks.items()}


@torch.no_grad()
def record_inputs(model: nn.Module, sites: list[Site], inputs) -> dict[str, Tensor]:
    """FFN name -> its inputs [N, D] over one forward of `model` on `inputs` (a tensor, tuple or dict)."""
    with recording(model, sites) as sinks:
        call_model(model, inputs)
    return joined(sinks)


@dataclass(frozen=True)
class CalibrateResult:
    inputs: Mapping[str, Tensor]  # FFN name -> its inputs [N, D]

    @property
    def summary(self) -> str:
        rows = sum(x.shape[0] for x in self.inputs.values())
        return f"calibrate: recorded the inputs of {len(self.inputs)} FFNs ({rows} rows)"


@dataclass(frozen=True)
class Calibrate:
    """The calibrate pass: one forward of the dense model on `inputs`, recording each site's FFN input."""

    name: ClassVar[str] = "calibrate"
    modifies_model: ClassVar[bool] = False
    preserves_computation: ClassVar[bool] = True
    sites: tuple[Site, ...]
    inputs: Any  # model inputs: a tensor, a tuple of args or a dict of kwargs

    def run(self, model: nn.Module) -> CalibrateResult:
        return CalibrateResult(record_inputs(model, list(self.sites), self.inputs))


__all__ = ["Calibrate", "CalibrateResult", "call_model", "joined", "record_inputs", "recording"]
