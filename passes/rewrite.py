"""Rewrite: put an MoELayer where a found FFN was, by surgery on the user's own module tree.

The model keeps its class and everything outside the FFN; only the FFN's atoms (or its whole module)
are replaced. Each site carries the surgery analyse chose for it (plan.py); `apply_surgery` executes it
as it stands. A module object reachable under several paths (a shared layer) is replaced under all of
them, so it stays shared.

Dropout *inside* the FFN (between activation and down projection) is not carried over: an MoELayer has
no hidden dropout. Dropout *after* the FFN is kept.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import fx, nn

from moeify.passes.analyse import Site
from moeify.passes.match import FFNMatch, LinearRef
from moeify.passes.plan import ChainSurgery, ForwardSurgery, ModuleSurgery
from moeify.upcycle import DenseFFNWeights, UpcycleConfig
from moeify.upcycle.preservation import preserves_config

Tensor = torch.Tensor
META = "moeify.rewrite"


def identity(x, *args, **kwargs):
    """Stands in for an activation function attribute the chain surgery turned into a pass-through."""
    return x


class PassThrough(nn.Module):
    """Returns its first input: what an FFN's up projection or activation becomes after chain surgery."""

    def forward(self, x, *args, **kwargs):
        return x


class MoEBlock(nn.Module):
    """An MoELayer standing where a whole FFN module stood, when that module's call needs more than
    `x -> y`: x arrives at another position (or by keyword), or the module ended in a dropout."""

    def __init__(self, moe: nn.Module, x_index: int = 0, x_name: str = "x", dropout: nn.Module | None = None):
        super().__init__()
        self.moe = moe
        self.x_index, self.x_name = x_index, x_name
        self.dropout = dropout

    def forward(self, *args, **kwargs):
        x = args[self.x_index] if len(args) > self.x_index else kwargs[self.x_name]
        y = self.moe(x)
        return self.dropout(y) if self.dropout is not None else y


# --- weights -------------------------------------------------------------------------------------


def _matrix(model: nn.Module, ref: LinearRef) -> tuple[Tensor, Tensor | None]:
    """(weight [out, in], bias [out] or None) of one projection, sliced to its rows."""
    w = model.get_parameter(ref.weight).detach()
    if ref.transposed:
        w = w.t()  # Conv1D stores [in, out]
    b = model.get_parameter(ref.bias).detach() if ref.bias is not None else None
    if ref.rows is not None:
        lo, hi = ref.rows
        w = w[lo:hi]
        b = b[lo:hi] if b is not None else None
    return w, b


def dense_weights(model: nn.Module, match: FFNMatch, custom_activation=None) -> DenseFFNWeights:
    """The FFN's weights in moeify's layout: w1 [H1, D] ([gate; up] when gated), w2 [D, H].
    `custom_activation`: the module computing a "custom" activation (`activation_module(site)`)."""
    up_w, up_b = _matrix(model, match.up)
    down_w, down_b = _matrix(model, match.down)
    if match.gated:
        gate_w, gate_b = _matrix(model, match.gate)
        w1 = torch.cat([gate_w, up_w], dim=0)  # [2H, D]
        b1 = None
        if gate_b is not None or up_b is not None:
            b1 = torch.cat(
                [
                    gate_b if gate_b is not None else gate_w.new_zeros(gate_w.shape[0]),
                    up_b if up_b is not None else up_w.new_zeros(up_w.shape[0]),
                ]
            )
    else:
        w1, b1 = up_w, up_b  # [H, D]
    if match.bias:  # a projection without bias gets zeros: the layer has one bias flag
        b1 = b1 if b1 is not None else w1.new_zeros(w1.shape[0])
        down_b = down_b if down_b is not None else down_w.new_zeros(down_w.shape[0])
    if w1.shape != ((2 if match.gated else 1) * match.d_ff, match.d_model) or down_w.shape != (
        match.d_model,
        match.d_ff,
    ):
        raise RuntimeError(
            f"{match.name}: weights {tuple(w1.shape)}, {tuple(down_w.shape)} do not fit "
            f"d_model={match.d_model}, d_ff={match.d_ff}"
        )
    return DenseFFNWeights(w1=w1, b1=b1, w2=down_w, b2=down_b, activation=match.activation, gated=match.gated,
                           custom_activation=custom_activation)


# --- module tree helpers --------------------------------------------------------------------------


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module | None) -> int:
    """Put `new` wherever `old` is a child (every path, so shared modules stay shared); count of places.
    `new` takes `old`'s train/eval mode."""
    if new is not None:
        new.train(old.training)
    count = 0
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is old:
                if new is None:
                    del parent._modules[name]
                else:
                    parent._modules[name] = new
                count += 1
    return count


def _free_name(module: nn.Module, base: str) -> str:
    name, i = base, 1
    while hasattr(module, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _disable_torch_fast_paths(model: nn.Module, owner: nn.Module) -> None:
    """torch's TransformerEncoderLayer/Encoder read linear1.weight etc. directly on their inference fast
    path; after surgery those are MoE/pass-through modules, so the fast path is switched off."""
    if isinstance(owner, nn.TransformerEncoderLayer):
        owner.activation_relu_or_gelu = 0
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and any(layer is owner for layer in m.layers):
            m.use_nested_tensor = False


# --- surgeries -----------------------------------------------------------------------------------


@functools.singledispatch
def apply_surgery(surgery, model: nn.Module, site: Site, layer: nn.Module) -> None:
    """Execute `surgery` (the one analyse chose for `site`): put `layer` where the FFN was."""
    raise TypeError(f"{site.match.name}: no rewrite for a surgery of type {type(surgery).__name__}")


@apply_surgery.register(ModuleSurgery)
def _module_surgery(surgery: ModuleSurgery, model: nn.Module, site: Site, layer: nn.Module) -> None:
    cap = site.cand.cap
    drops = [cap.modules[d] if isinstance(d, str) else nn.Dropout(d) for d in surgery.trailing]
    dropout = None if not drops else drops[0] if len(drops) == 1 else nn.Sequential(*drops)
    new = layer if surgery.bare else MoEBlock(layer, surgery.x_index, surgery.x_name, dropout)
    if replace_module(model, cap.module, new) == 0:
        raise RuntimeError(f"{site.match.name}: module not found in the model")


@apply_surgery.register(ChainSurgery)
def _chain_surgery(surgery: ChainSurgery, model: nn.Module, site: Site, layer: nn.Module) -> None:
    cap = site.cand.cap
    replace_module(model, cap.modules[surgery.down], layer)
    for path in surgery.identities:
        replace_module(model, cap.modules[path], PassThrough())
    for owner, attr in surgery.functions:
        setattr(owner, attr, identity)
    owners = {id(cap.module): cap.module}
    for path in (surgery.identities[0], surgery.down):  # the up and down projections' parents
        owner = cap.module.get_submodule(path.rpartition(".")[0])
        owners[id(owner)] = owner
    for owner in owners.values():
        _disable_torch_fast_paths(model, owner)


def install_method(module: nn.Module, method: str, graph: fx.Graph) -> None:
    """Make `module.<method>` run `graph` (an instance attribute shadowing the class's method).

    The code is generated from the graph with `self` as the module itself, so attribute reads
    (`self.training`, submodules, parameters) stay live. A bound method deep-copies with its module.
    """
    code = graph.python_code(root_module="self")
    fn = fx.graph_module._forward_from_src(code.src, code.globals)
    module.__dict__[method] = types.MethodType(fn, module)


def _live_training_flags(graph: fx.Graph) -> None:
    """Tracing baked `training=self.training` into functional dropouts; read it live again."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is F.dropout:
            with graph.inserting_before(node):
                flag = graph.get_attr("training")
            if len(node.args) > 2:
                node.args = node.args[:2] + (flag,) + node.args[3:]
            else:
                node.kwargs = {**node.kwargs, "training": flag}


@apply_surgery.register(ForwardSurgery)
def _forward_surgery(surgery: ForwardSurgery, model: nn.Module, site: Site, layer: nn.Module) -> None:
    cand = site.cand
    cap = cand.cap
    host, graph = cap.module, cap.graph
    name = _free_name(host, "moe")
    host.add_module(name, layer)
    with graph.inserting_before(cand.down):
        call = graph.call_module(name, (cand.x,))
    call.meta[META] = {"ffn": site.match.name}
    cand.down.replace_all_uses_with(call)
    for node in reversed(cand.body):
        if not node.users:
            graph.erase_node(node)
    for node in reversed(graph.nodes):  # weights only the FFN read
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _live_training_flags(graph)
    graph.lint()
    install_method(host, cap.method, graph)
    # the dense weights the regenerated code no longer reads go: they now live in the experts
    used_modules = {n.target for n in graph.nodes if n.op == "call_module"}
    used_params = {n.target for n in graph.nodes if n.op == "get_attr"}
    for ref in (site.match.up, site.match.gate, site.match.down):
        if ref is None:
            continue
        rel = lambda path: path[len(cap.path) + 1 :] if cap.path else path  # noqa: E731
        if ref.module is not None:
            if rel(ref.module) not in used_modules:
                try:
                    replace_module(model, host.get_submodule(rel(ref.module)), None)
                except AttributeError:
                    pass  # already removed (the fused gate and up are one module)
        else:
            for path in (ref.weight, ref.bias):
                if path is None or rel(path) in used_params:
                    continue
                owner_path, _, leaf = rel(path).rpartition(".")
                owner = host.get_submodule(owner_path)
                if leaf in owner._parameters:
                    del owner._parameters[leaf]


def rewrite(model: nn.Module, site: Site, layer: nn.Module) -> None:
    """Replace the FFN of `site` by `layer` in `model` (in place), by the surgery analyse chose."""
    apply_surgery(site.surgery, model, site, layer)


# --- the pass --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replacement:
    """One FFN to replace: where it is (`site`) and the layer that takes its place."""

    site: Site
    layer: nn.Module


@dataclass(frozen=True)
class RewriteResult:
    converted: tuple[str, ...]  # FFN names, in the order replaced
    by_surgery: Mapping[str, int]  # surgery name -> FFNs replaced by it
    planned: int

    @property
    def summary(self) -> str:
        kinds = ", ".join(f"{n} {s}" for s, n in sorted(self.by_surgery.items()))
        return f"rewrite: {len(self.converted)}/{self.planned} FFNs converted ({kinds})"


@dataclass(frozen=True)
class Rewrite:
    """The rewrite pass: every replacement's layer goes where its FFN was.

    It changes the model. It preserves the computation (eval mode, within float rounding) when every
    surgery does and every layer computes its dense FFN at init: `init`, the upcycling that filled the
    layers, claims that for the layer's config (`moeify.upcycle.preservation.preserves_config`).
    Without `init` nothing is claimed.
    """

    name: ClassVar[str] = "rewrite"
    modifies_model: ClassVar[bool] = True
    replacements: tuple[Replacement, ...]
    init: UpcycleConfig | None = None

    @property
    def preserves_computation(self) -> bool:
        if self.init is None:
            return False
        for r in self.replacements:
            config = getattr(r.layer, "config", None)
            if config is None or not r.site.surgery.preserves_computation:
                return False
            if not preserves_config(self.init, config):
                return False
        return True

    def run(self, model: nn.Module) -> RewriteResult:
        by_surgery: dict[str, int] = {}
        for r in self.replacements:
            rewrite(model, r.site, r.layer)
            by_surgery[r.site.surgery.name] = by_surgery.get(r.site.surgery.name, 0) + 1
        names = tuple(r.site.match.name for r in self.replacements)
        return RewriteResult(names, by_surgery, len(self.replacements))
