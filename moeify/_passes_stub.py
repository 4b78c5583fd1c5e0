"""TEMPORARY stand-in for the passes (find_ffns / explain_ffns / convert / conversion_report).

Only so the CLI and io can be built and tested before the real passes land on main; deleted at merge.
Handles modules with fc1/act/fc2 (plain) or gate_proj/up_proj/down_proj (gated) children.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from moeify.config import MoEConfig
from moeify.errors import MoeifyError
from moeify.layer import MoELayer
from moeify.upcycle import DenseFFNWeights, UpcycleConfig, upcycle_layer


@dataclass(frozen=True)
class FFNMatch:
    name: str
    d_model: int
    d_ff: int
    activation: str
    gated: bool
    bias: bool

    @property
    def path(self):
        return self.name

    @property
    def dense_params(self):
        h1 = 2 * self.d_ff if self.gated else self.d_ff
        return h1 * self.d_model + self.d_model * self.d_ff + ((h1 + self.d_model) if self.bias else 0)


@dataclass(frozen=True)
class Rejection:
    name: str
    reason: str


@dataclass(frozen=True)
class FFNReport:
    name: str
    d_model: int
    d_ff: int
    expert_d_ff: int
    activation: str
    gated: bool
    num_experts: int
    k: int
    params_before: int
    params_after: int
    active_params_per_token: int


def _act_name(mod) -> str:
    name = type(mod).__name__.lower()
    for key, val in (("silu", "silu"), ("gelu", "gelu"), ("relu", "relu")):
        if key in name:
            return val
    return "gelu"


def _match(path: str, m: nn.Module) -> tuple[FFNMatch | None, str | None]:
    if isinstance(m, MoELayer):
        return None, None
    if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
        act = getattr(m, "act_fn", None)
        return FFNMatch(path, m.up_proj.in_features, m.up_proj.out_features, _act_name(act), True,
                        m.up_proj.bias is not None), None
    if all(hasattr(m, a) for a in ("fc1", "act", "fc2")):
        return FFNMatch(path, m.fc1.in_features, m.fc1.out_features, _act_name(m.act), False,
                        m.fc1.bias is not None), None
    if isinstance(m, nn.Linear) and "attn" in path:
        return None, "attention projection"
    return None, None


def find_ffns(model: nn.Module) -> list[FFNMatch]:
    return _explain(model)[0]


def explain_ffns(model: nn.Module):
    return _explain(model)[1]


def _explain(model: nn.Module):
    found, rejected = [], []
    for path, m in model.named_modules():
        match, reason = _match(path, m)
        if match is not None:
            found.append(match)
        elif reason is not None:
            rejected.append(Rejection(path, reason))
    return found, rejected


@dataclass
class ConversionReport:
    ffns: tuple = ()
    found: int = 0
    params_before: int = 0
    params_after: int = 0
    active_params_per_token: int = 0
    options: dict = field(default_factory=dict)
    converted: tuple = ()

    @property
    def summary(self):
        return f"{len(self.ffns)}/{self.found} FFNs converted"


def _dense(m, match: FFNMatch) -> DenseFFNWeights:
    if match.gated:
        w1 = torch.cat([m.gate_proj.weight, m.up_proj.weight], 0)
        b1 = None if m.up_proj.bias is None else torch.cat([m.gate_proj.bias, m.up_proj.bias])
        return DenseFFNWeights(w1, b1, m.down_proj.weight, m.down_proj.bias, match.activation, True)
    return DenseFFNWeights(m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias, match.activation, False)


def convert(model, experts=8, router="topk", k=2, init="copy", every=1, include=None, exclude=None,
            filter_fn=None, config=None, calibration=None, seed=0, inplace=False, progress=None):
    import copy

    if not inplace:
        model = copy.deepcopy(model)
    matches = find_ffns(model)
    if include:
        inc = [include] if isinstance(include, str) else include
        matches = [m for m in matches if any(fnmatch.fnmatch(m.path, g) for g in inc)]
    if exclude:
        exc = [exclude] if isinstance(exclude, str) else exclude
        matches = [m for m in matches if not any(fnmatch.fnmatch(m.path, g) for g in exc)]
    matches = matches[::every]
    if not matches:
        raise MoeifyError("no FFN found to convert; run `moeify inspect -v MODEL` to see the candidates")
    extra = dict(config or {})
    before = sum(p.numel() for p in model.parameters())
    torch.manual_seed(seed)
    converted = []
    for match in matches:
        parent_path, _, name = match.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        old = getattr(parent, name)
        cfg = MoEConfig(d_model=match.d_model, d_ff=match.d_ff, num_experts=experts, k=k, router=router,
                        activation=match.activation, gated=match.gated, bias=match.bias, **extra)
        layer = MoELayer(cfg)
        upcycle_layer(layer, _dense(old, match), UpcycleConfig(init=init, seed=seed))
        setattr(parent, name, layer)
        converted.append(match)
        if progress is not None:
            progress(match.name, len(converted), len(matches))
    total = sum(p.numel() for p in model.parameters())
    rows = []
    inactive = 0
    for m in converted:
        layer = model.get_submodule(m.name)
        after = sum(p.numel() for p in layer.parameters())
        idle = (experts - k) * (layer.w1[0].numel() + layer.w2[0].numel() + (
            layer.b1[0].numel() + layer.b2[0].numel() if layer.b1 is not None else 0))
        inactive += idle
        rows.append(FFNReport(m.name, m.d_model, m.d_ff, m.d_ff, m.activation, m.gated, experts, k,
                              m.dense_params, after, after - idle))
    names = tuple(m.name for m in converted)
    model._moeify_stub = ConversionReport(
        tuple(rows), len(find_ffns(model)) + len(names), before, total, total - inactive,
        dict(experts=experts, router=router, k=k, every=1, include=list(names), exclude=None,
             config=extra or None, seed=seed), names)
    return model


def conversion_report(model) -> ConversionReport:
    return model._moeify_stub
