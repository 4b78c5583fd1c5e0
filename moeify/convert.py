"""The public API over the passes: `find_ffns`, `explain_ffns`, `convert`.

    matches = moeify.find_ffns(model)          # [FFNMatch(name="model.layers.0.mlp", d_model=..., ...)]
    moeify.explain_ffns(model)                 # [Rejection(name, reason)] for what was *not* taken
    moe = moeify.convert(model, experts=8, k=2, init="copy")
    print(moeify.conversion_report(moe))       # "12/12 FFNs converted" + per-FFN parameter table

`convert` works on a deep copy unless `inplace=True`; the result is the user's own model object with its
FFNs replaced by `MoELayer`s (see passes/plan.py for how), so an HF model still generates and saves.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

from moeify.config import ConfigError, MoEConfig
from moeify.errors import MoeifyError
from moeify.layer import MoELayer
from moeify.report import REPORT_ATTR, ConversionReport, FFNReport, count_params
from moeify.upcycle import UpcycleConfig, expert_d_ff, upcycle_layer
from moeify.passes import (
    Analyse,
    Analysis,
    Calibrate,
    Capture,
    PassRunner,
    Replacement,
    Rewrite,
    Select,
    Site,
    WireTokenIds,
)
from moeify.passes.match import FFNMatch, Rejection
from moeify.passes.rewrite import dense_weights
from moeify.passes.token_ids import HASHING_ROUTERS

# MoEConfig fields convert fills itself: from the FFN found, or from its own arguments.
_FROM_FFN = ("d_model", "d_ff", "activation", "gated", "bias")
_FROM_ARGS = {"num_experts": "experts", "k": "k", "router": "router"}


def find_ffns(model: nn.Module) -> list[FFNMatch]:
    """The FFNs of `model`, in module order. Nothing is changed. See `FFNMatch` for the fields."""
    return _analyse(model).matches


def explain_ffns(model: nn.Module) -> list[Rejection]:
    """What looked like an FFN but is not converted, each with the reason (unsupported activation, does
    not map back to the model width, hidden values used elsewhere, no safe rewrite, did not trace)."""
    return list(_analyse(model).rejections)


def _analyse(model: nn.Module) -> Analysis:
    if not isinstance(model, nn.Module):
        raise MoeifyError(f"expected a torch.nn.Module, got {type(model).__name__}")
    return PassRunner().run(Analyse(), model)


# --- option checking ------------------------------------------------------------------------------


def _patterns(value, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, Iterable) and all(isinstance(p, str) for p in value):
        return list(value)
    raise ConfigError(f"{name} must be a module-path glob or a list of them (e.g. '*.mlp'), got {value!r}")


def _overrides(config, experts: int, k: int, router: str) -> dict:
    """The MoEConfig fields `config` sets beyond what convert fills itself."""
    if config is None:
        return {}
    if isinstance(config, MoEConfig):
        for field, arg in _FROM_ARGS.items():
            mine = {"experts": experts, "k": k, "router": router}[arg]
            if getattr(config, field) != mine:
                raise ConfigError(
                    f"config.{field}={getattr(config, field)!r} disagrees with {arg}={mine!r}; "
                    f"pass {arg}={getattr(config, field)!r} to convert"
                )
        skip = set(_FROM_FFN) | set(_FROM_ARGS) | {"version"}
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(MoEConfig) if f.name not in skip}
    if not isinstance(config, dict):
        raise ConfigError(
            f"config must be a dict of MoEConfig fields or an MoEConfig, got {type(config).__name__}"
        )
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    for key in config:
        if key in _FROM_ARGS:
            raise ConfigError(f"config sets {key!r}: pass {_FROM_ARGS[key]}= to convert instead")
        if key in _FROM_FFN:
            raise ConfigError(f"config sets {key!r}, which comes from each FFN found; remove it from config")
        if key not in known:
            raise ConfigError(
                f"unknown config field {key!r}; valid: "
                f"{', '.join(sorted(known - set(_FROM_FFN) - set(_FROM_ARGS) - {'version'}))}"
            )
    return dict(config)


def _upcycle_config(init, seed: int) -> UpcycleConfig:
    if isinstance(init, UpcycleConfig):
        return init
    if isinstance(init, str):
        return UpcycleConfig(init=init, seed=seed)
    if isinstance(init, dict):
        try:
            return UpcycleConfig(**{"seed": seed, **init})
        except TypeError as exc:
            raise ConfigError(f"bad init options {init!r}: {exc}") from None
    raise ConfigError(f"init must be a strategy name (e.g. 'copy'), a dict or an UpcycleConfig, got {init!r}")


def _check_args(experts, k, every, seed, filter_fn, inplace) -> None:
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ConfigError(f"experts must be an integer >= 1, got {experts!r}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= experts:
        raise ConfigError(f"k must be an integer with 1 <= k <= experts ({experts}), got {k!r}")
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError(f"every must be an integer >= 1 (2 converts every other FFN), got {every!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if filter_fn is not None and not callable(filter_fn):
        raise ConfigError(f"filter_fn must be callable as filter_fn(module, name) -> bool, got {filter_fn!r}")
    if not isinstance(inplace, bool):
        raise ConfigError(f"inplace must be True or False, got {inplace!r}")


# --- convert --------------------------------------------------------------------------------------


def _expert_width(expert_d_ff_opt, site: Site, ucfg: UpcycleConfig, experts: int) -> int:
    name, dense = site.match.name, site.match.d_ff
    strategy = expert_d_ff(ucfg, dense, experts)
    wanted = expert_d_ff_opt.get(name) if isinstance(expert_d_ff_opt, dict) else expert_d_ff_opt
    if wanted is None:
        return strategy
    if not isinstance(wanted, int) or wanted < 1:
        raise ConfigError(f"expert_d_ff for {name!r} must be an integer >= 1, got {wanted!r}")
    if ucfg.init != "none" and wanted != strategy:
        raise ConfigError(
            f"expert_d_ff={wanted} for {name!r} conflicts with init={ucfg.init!r}, which gives "
            f"experts of width {strategy}; drop expert_d_ff or use init='none'"
        )
    return wanted


def _active_experts(cfg: MoEConfig) -> int:
    """Experts one token runs (on average for expert choice; soft runs all of them on its slots)."""
    if cfg.router == "soft":
        return cfg.num_experts
    if cfg.router == "balanced":
        return 1  # BASE is top-1 whatever k says
    if cfg.router == "expert_choice":  # E experts x C = cf*T*k/E tokens each: cf*k per token
        return min(cfg.num_experts, max(1, round(cfg.k * (cfg.capacity_factor or 1.0))))
    return cfg.k


def _expert_params(cfg: MoEConfig) -> int:
    h1 = cfg.expert_in_width
    return h1 * cfg.d_model + cfg.d_model * cfg.d_ff + ((h1 + cfg.d_model) if cfg.bias else 0)


def convert(
    model: nn.Module,
    experts: int = 8,
    router: str = "topk",
    k: int = 2,
    init="copy",
    every: int = 1,
    include=None,
    exclude=None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    config=None,
    calibration=None,
    seed: int = 0,
    inplace: bool = False,
    expert_d_ff: int | dict[str, int] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> nn.Module:
    """Replace the FFNs of `model` by MoE layers upcycled from their weights; returns the model.

    Args:
        experts, router, k: experts per layer, router name (moeify.routers.ROUTERS), experts per token.
        init: upcycling strategy name ("copy", "none", ...), a dict of UpcycleConfig fields, or an
            UpcycleConfig. "none" builds the structure and leaves the weights at their random init
            (what loading a saved state_dict needs).
        every: convert every n-th selected FFN (2 = every other, as sparse upcycling does).
        include / exclude: module-path globs (fnmatch) on FFN names (see `find_ffns`).
        filter_fn: filter_fn(module, name) -> bool for anything else; module is the FFN's module.
        config: other MoEConfig fields for every layer (capacity_factor, aux_loss_coef,
            num_shared_experts, ...): a dict, or an MoEConfig whose shape fields are ignored.
        calibration: example model inputs (tensor, tuple or dict of kwargs) for calibration-based inits;
            the model runs on them once, dense, and each FFN's inputs go to its upcycling.
        seed: seeds the layers' random init (routers, init="none") and the strategy; the global RNG
            is left as it was.
        inplace: change `model` itself instead of a deep copy.
        expert_d_ff: the experts' hidden width (an int, or {ffn name: width}); by default the
            strategy's. Reports record it so a rebuild with init="none" gets the same shapes.
        progress: progress(name, done, total), called after each selected FFN's MoE layer is built and
            upcycled (the CLI's progress bar); not part of the recorded options.

    Raises:
        ConfigError: a bad option (one line: what and what to do).
        MoeifyError: no FFN found or selected.
    """
    _check_args(experts, k, every, seed, filter_fn, inplace)
    include, exclude = _patterns(include, "include"), _patterns(exclude, "exclude")
    overrides = _overrides(config, experts, k, router)
    MoEConfig(d_model=1, d_ff=1, num_experts=experts, k=k, router=router, **overrides)  # validates early
    ucfg = _upcycle_config(init, seed)

    target = model if inplace else copy.deepcopy(model)
    runner = PassRunner()
    analysis = runner.run(Analyse(runner.run(Capture(), target)), target)
    sites = analysis.sites
    if not sites:
        raise MoeifyError(
            f"no FFN found in this {type(model).__name__} ({len(analysis.rejections)} candidates "
            "rejected); run `moeify inspect -v` (or moeify.explain_ffns(model)) to see why"
        )
    selected = runner.run(Select(sites, include, exclude, filter_fn, every), target).sites
    if not selected:
        raise MoeifyError(
            f"no FFN selected out of {len(sites)} found (include={include}, exclude={exclude}, "
            f"every={every}, filter_fn={'set' if filter_fn else None}); loosen the selection"
        )
    calib = {}
    if calibration is not None:
        calib = runner.run(Calibrate(selected, calibration), target).inputs

    params_before = count_params(target)
    layers: list[tuple[Site, MoEConfig, MoELayer]] = []
    for index, site in enumerate(selected):
        m = site.match
        cfg = MoEConfig(
            d_model=m.d_model,
            d_ff=_expert_width(expert_d_ff, site, ucfg, experts),
            num_experts=experts,
            k=k,
            router=router,
            activation=m.activation,
            gated=m.gated,
            bias=m.bias,
            **overrides,
        )
        dense = dense_weights(target, m)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + index)
            try:
                # Every upcycling strategy overwrites all expert weights: skip their random init.
                layer = MoELayer(cfg, causal=m.causal, init_experts=ucfg.init == "none")
            except ConfigError as exc:
                raise ConfigError(f"FFN {m.name!r}: {exc}") from None
            layer.to(device=dense.w1.device, dtype=dense.w1.dtype)
            layer.train(site.cand.cap.module.training)  # an eval-mode model gets eval-mode layers
            upcycle_layer(layer, dense, ucfg, calibration=calib.get(m.name), key=m.name)
        layers.append((site, cfg, layer))
        if progress is not None:
            progress(m.name, index + 1, len(selected))

    runner.run(Rewrite(tuple(Replacement(site, layer) for site, _, layer in layers), ucfg), target)
    if router in HASHING_ROUTERS:
        runner.run(WireTokenIds(tuple(layer for _, _, layer in layers)), target)
    report = _report(
        target,
        analysis,
        layers,
        params_before,
        options={"experts": experts, "router": router, "k": k, "config": _jsonable(overrides), "seed": seed},
        passes=runner.summaries,
        init=init if isinstance(init, str) else ucfg.to_dict(),
    )
    setattr(target, REPORT_ATTR, report)
    return target


def _report(model, analysis, layers, params_before: int, *, options: dict, passes: tuple[str, ...],
            init) -> ConversionReport:
    """The conversion's report. `options`: the user's experts, router, k, config and seed (recorded with
    the converted FFNs, so a rebuild selects exactly them); `passes`: each pass's summary line; `init`:
    the strategy as given (a name) or its full config."""
    ffns, inactive = [], 0
    for site, cfg, layer in layers:
        after = count_params(layer)
        idle = (cfg.num_experts - _active_experts(cfg)) * _expert_params(cfg)
        inactive += idle
        m = site.match
        ffns.append(
            FFNReport(
                name=m.name,
                d_model=m.d_model,
                d_ff=m.d_ff,
                expert_d_ff=cfg.d_ff,
                activation=m.activation,
                gated=m.gated,
                num_experts=cfg.num_experts,
                k=cfg.k,
                router=cfg.router,
                causal=m.causal,
                rewrite=m.rewrite,
                params_before=m.dense_params,
                params_after=after,
                active_params_per_token=after - idle,
            )
        )
    params_after = count_params(model)
    converted = tuple(f.name for f in ffns)
    # Recorded as a selection of exactly the converted FFNs, so a rebuild from the report matches them.
    recorded = {**options, "every": 1, "include": list(converted), "exclude": None,
                "expert_d_ff": {f.name: f.expert_d_ff for f in ffns}}
    return ConversionReport(
        ffns=tuple(ffns),
        found=len(analysis.sites),
        params_before=params_before,
        params_after=params_after,
        active_params_per_token=params_after - inactive,
        options=recorded,
        init=init,
        converted=converted,
        passes=passes,
    )


def _jsonable(d: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
