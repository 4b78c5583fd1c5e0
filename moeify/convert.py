"""The public API over the passes: `find_ffns`, `explain_ffns`, `convert`.

    matches = moeify.find_ffns(model)          # [FFNMatch(name="model.layers.0.mlp", d_model=..., ...)]
    moeify.explain_ffns(model)                 # [Rejection(name, reason)] for what was *not* taken
    moe = moeify.convert(model, moeify.ConvertConfig(experts=8, k=2, init="copy"))
    moe = moeify.convert(model, experts=8, k=2, init="copy")   # the same: keywords build the ConvertConfig
    print(moeify.conversion_report(moe))       # "12/12 FFNs converted" + per-FFN parameter table

`convert` works on a deep copy unless `inplace=True`; the result is the user's own model object with its
FFNs replaced by `MoELayer`s (see passes/plan.py for how), so an HF model still generates and saves.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from moeify.activations import CUSTOM
from moeify.config import ConfigError, MoEConfig
from moeify.convert_config import ConvertConfig, config_from_call
from moeify.errors import MoeifyError
from moeify.integrations.aux_loss import install_aux_loss_hook, remove_aux_loss_hook
from moeify.layer import MoELayer
from moeify.mpo_experts import mpo_report, mpo_shapes
from moeify.passes import (
    Analyse,
    Analysis,
    Calibrate,
    Capture,
    ChainSurgery,
    ModuleSurgery,
    PassRunner,
    Replacement,
    Rewrite,
    Select,
    Site,
    WireTokenIds,
    activation_module,
)
from moeify.passes.match import FFNMatch, Rejection
from moeify.passes.rewrite import dense_weights
from moeify.passes.token_ids import reads_token_ids
from moeify.report import REPORT_ATTR, ConversionReport, FFNReport, count_params
from moeify.upcycle import expert_d_ff, upcycle_layer, upcycle_layer_lazily


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


# --- convert --------------------------------------------------------------------------------------


def _expert_width(config: ConvertConfig, site: Site) -> int:
    """The experts' hidden width for one FFN: `config.expert_d_ff` where set, else what the init gives."""
    name, dense = site.match.name, site.match.d_ff
    ucfg = config.init
    strategy = expert_d_ff(ucfg, dense, config.experts)
    wanted = config.expert_d_ff
    if isinstance(wanted, Mapping):
        wanted = wanted.get(name)
    if wanted is None:
        return strategy
    if ucfg.init != "none" and wanted != strategy:
        raise ConfigError(
            f"expert_d_ff={wanted} for {name!r} conflicts with init={ucfg.init!r}, which gives "
            f"experts of width {strategy}; drop expert_d_ff or use init='none'"
        )
    return wanted


def _expert_params(cfg: MoEConfig) -> int:
    """One routed expert's own parameters (an MPO expert's: its auxiliary tensors; the central is shared)."""
    h1 = cfg.expert_in_width
    bias = (h1 + cfg.d_model) if cfg.bias else 0
    if cfg.expert_param == "mpo":
        return sum(s.aux_params for s in mpo_shapes(cfg)) + bias
    return h1 * cfg.d_model + cfg.d_model * cfg.d_ff + bias


def convert(
    model: nn.Module,
    config: ConvertConfig | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration=None,
    inplace: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    **options,
) -> nn.Module:
    """Replace the FFNs of `model` by MoE layers upcycled from their weights; returns the model.

        moeify.convert(model, moeify.ConvertConfig(experts=8, k=2, init="copy"))
        moeify.convert(model, experts=8, k=2, init="copy")      # the same: keywords build the ConvertConfig

    Args:
        config: a `ConvertConfig` holding every conversion option (experts, k, router, layer, init,
            include/exclude/every, expert_d_ff, seed; see its docstring).
        **options: ConvertConfig fields as keywords, instead of `config` (not together with one: change a
            config with `config.replace(...)`). Deprecated: `config=` a dict or MoEConfig of "other MoEConfig
            fields" is still taken, as `layer`, with a DeprecationWarning.
        filter_fn: filter_fn(module, name) -> bool for any selection the globs cannot say; module is the
            FFN's module. Applied after include/exclude, before every. Not recorded (not JSON-able).
        calibration: example model inputs (tensor, tuple or dict of kwargs) for calibration-based inits;
            the model runs on them once, dense, and each FFN's inputs go to its upcycling.
        inplace: change `model` itself instead of a deep copy.
        progress: progress(name, done, total), called after each selected FFN's MoE layer is built and
            upcycled (the CLI's progress bar).

    The report (`moeify.conversion_report`) records the config with the converted FFNs as its selection
    and their expert widths, so `convert(fresh, report.config.replace(init="none"))` rebuilds the structure.

    Raises:
        ConfigError: a bad option (one line: what and what to do).
        MoeifyError: no FFN found or selected.
    """
    config = config_from_call(config, options)
    if filter_fn is not None and not callable(filter_fn):
        raise ConfigError(f"filter_fn must be callable as filter_fn(module, name) -> bool, got {filter_fn!r}")
    if not isinstance(inplace, bool):
        raise ConfigError(f"inplace must be True or False, got {inplace!r}")

    target = model if inplace else copy.deepcopy(model)
    runner, analysis, selected = select_sites(target, config, filter_fn)
    calib = {}
    if calibration is not None:
        calib = runner.run(Calibrate(selected, calibration), target).inputs

    params_before = count_params(target)
    layers: list[tuple[Site, MoEConfig, MoELayer]] = []
    shared_routers: dict[int, nn.Module] = {}  # d_model -> router, with share_router (Omni-router)
    registered = Counter(id(p) for _, p in target.named_parameters(remove_duplicate=False))
    for index, site in enumerate(selected):
        cfg, layer, _ = _build_layer(target, site, config, index, calib.get(site.match.name), shared_routers)
        layers.append((site, cfg, layer))
        if not inplace:  # our own copy: its dense FFN goes as soon as the experts hold its weights
            _release_dense(target, site, registered)
        if progress is not None:
            progress(site.match.name, index + 1, len(selected))

    runner.run(Rewrite(tuple(Replacement(site, layer) for site, _, layer in layers), config.init), target)
    id_readers = tuple(layer for _, _, layer in layers if reads_token_ids(layer))
    if id_readers:
        runner.run(WireTokenIds(id_readers), target)
    report = _report(target, analysis, layers, params_before, config=config, passes=runner.summaries)
    setattr(target, REPORT_ATTR, report)
    (install_aux_loss_hook if config.add_aux_loss else remove_aux_loss_hook)(target)
    return target


def select_sites(target: nn.Module, config: ConvertConfig, filter_fn=None
                 ) -> tuple[PassRunner, Analysis, tuple[Site, ...]]:
    """Capture, analyse and select: (the runner, the analysis, the FFN sites `config` selects, in module
    order). Parameters may be on the meta device (nothing here reads weights)."""
    runner = PassRunner()
    analysis = runner.run(Analyse(runner.run(Capture(), target)), target)
    sites = analysis.sites
    if not sites:
        raise MoeifyError(
            f"no FFN found in this {type(target).__name__} ({len(analysis.rejections)} candidates "
            "rejected); run `moeify inspect -v` (or moeify.explain_ffns(model)) to see why"
        )
    include, exclude, every = _listed(config.include), _listed(config.exclude), config.every
    selected = runner.run(Select(sites, include, exclude, filter_fn, every), target).sites
    if not selected:
        raise MoeifyError(
            f"no FFN selected out of {len(sites)} found (include={include}, exclude={exclude}, "
            f"every={every}, filter_fn={'set' if filter_fn else None}); loosen the selection"
        )
    return runner, analysis, selected


def _build_layer(model: nn.Module, site: Site, config: ConvertConfig, index: int,
                 calibration, shared_routers: dict[int, nn.Module] | None = None,
                 spare: dict | None = None, *, lazy_experts: bool = False):
    """One FFN's MoE layer: its MoEConfig (shape from the FFN, the rest from `config`), built with the
    FFN's device, dtype and mode, and upcycled from its dense weights. With `config.share_router`, a layer
    whose width is in `shared_routers` routes with that router, which its upcycling leaves as it was.
    `spare`: expert tensors ("w1", "w2") free for reuse as this layer's storage (see _final_storage).
    Returns (MoEConfig, layer, experts): experts is None, or with `lazy_experts` (an init that
    `upcycle_layer_lazily` takes) the experts one at a time, the layer's expert tensors left on meta."""
    m = site.match
    cfg = config.layer_config(d_model=m.d_model, d_ff=_expert_width(config, site), activation=m.activation,
                              gated=m.gated, bias=m.bias)
    # An activation moeify has no name for is carried into the experts as the same computation (a copy).
    activation = activation_module(site) if m.activation == CUSTOM else None
    dense = dense_weights(model, m, custom_activation=activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1_000_003 + index)
        try:
            # Every upcycling strategy overwrites all expert weights: skip their random init.
            shared = shared_routers.get(m.d_model) if config.share_router and shared_routers is not None else None
            layer = MoELayer(cfg, router=shared, causal=m.causal, init_experts=config.init.init == "none",
                             activation=activation)
        except ConfigError as exc:
            raise ConfigError(f"FFN {m.name!r}: {exc}") from None
        if config.init.init != "none" and cfg.expert_param == "dense" and not lazy_experts:  # upcycling fills them
            _final_storage(layer, dense.w1.device, dense.w1.dtype, spare)
        # lazy: the experts are made and handed over one at a time, never stored here
        with _experts_on_meta(layer, dense.w1.dtype, lazy_experts):
            layer.to(device=dense.w1.device, dtype=dense.w1.dtype)
        layer.train(site.cand.cap.module.training)  # an eval-mode model gets eval-mode layers
        kept = None if shared is None else {k: v.clone() for k, v in shared.state_dict().items()}
        experts = None
        if lazy_experts:
            _, experts = upcycle_layer_lazily(layer, dense, config.init, calibration=calibration, key=m.name)
        else:
            upcycle_layer(layer, dense, config.init, calibration=calibration, key=m.name)
        if kept is not None:  # the shared router was initialised once, by its first layer
            shared.load_state_dict(kept)
        elif config.share_router and shared_routers is not None:
            shared_routers[m.d_model] = layer.router
    return cfg, layer, experts


def _release_dense(model: nn.Module, site: Site, registered: Counter) -> None:
    """Free the FFN's projection weights, its MoE layer built: each becomes a meta tensor of its shape.
    Only where the rewrite drops the projections whole (module and chain surgeries) and only weights no
    other module holds (`registered`: id -> how many modules hold it)."""
    if not isinstance(site.surgery, (ModuleSurgery, ChainSurgery)):
        return
    m = site.match
    for path in (p for ref in (m.up, m.gate, m.down) if ref is not None for p in (ref.weight, ref.bias)):
        if path is None:
            continue
        owner_path, _, leaf = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        p = owner._parameters.get(leaf)
        if p is not None and p.device.type != "meta" and registered[id(p)] == 1:
            owner._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"),
                                                   requires_grad=p.requires_grad)


EXPERT_TENSORS = ("w1", "w2", "b1", "b2")


@contextmanager
def _experts_on_meta(layer: MoELayer, dtype: torch.dtype, active: bool):
    """When `active`: inside, the layer without its expert tensors (so `.to(...)` leaves them be); after,
    meta tensors of their shapes in `dtype` (no memory: their values come one expert at a time)."""
    kept = {}
    for name in EXPERT_TENSORS if active else ():
        p = layer._parameters.get(name)
        if p is not None:
            kept[name] = nn.Parameter(torch.empty(p.shape, device="meta", dtype=dtype),
                                      requires_grad=p.requires_grad)
            layer._parameters[name] = None
    yield
    layer._parameters.update(kept)


def _final_storage(layer: MoELayer, device: torch.device, dtype: torch.dtype, spare: dict | None) -> None:
    """Give the experts' (uninitialised) weights their final device and dtype before `layer.to(...)`,
    so no float32 copy of E x the FFN is made and converted. `spare`: name -> a tensor whose values are
    no longer needed (the previous layer's, already written), used when it fits: fresh memory costs a
    page fault per page on first touch, several times the copy that fills it."""
    for name in ("w1", "w2"):
        p = getattr(layer, name)
        data = (spare or {}).pop(name, None)
        wanted = (p.shape, dtype, torch.device(device))
        if data is None or (data.shape, data.dtype, data.device) != wanted:
            data = torch.empty(p.shape, device=device, dtype=dtype)
        setattr(layer, name, nn.Parameter(data, requires_grad=p.requires_grad))


def _listed(patterns: tuple[str, ...] | None) -> list[str] | None:
    """Globs as a list, as the select pass's note has always shown them."""
    return None if patterns is None else list(patterns)


def _report(model, analysis, layers, params_before: int, *, config: ConvertConfig,
            passes: tuple[str, ...]) -> ConversionReport:
    """The conversion's report. `config` is recorded with the converted FFNs as its selection and their
    expert widths (so a rebuild selects exactly them); `passes`: each pass's summary line."""
    ffns, inactive = [], 0
    for site, cfg, layer in layers:
        after = count_params(layer)
        idle = round(cfg.num_experts - layer.router.caps.active_experts) * _expert_params(cfg)
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
                mpo=mpo_report(layer) if cfg.expert_param == "mpo" else None,
            )
        )
    params_after = count_params(model)
    converted = tuple(f.name for f in ffns)
    # Recorded as a selection of exactly the converted FFNs, so a rebuild from the report matches them.
    recorded = config.replace(every=1, include=converted, exclude=None,
                              expert_d_ff={f.name: f.expert_d_ff for f in ffns})
    return ConversionReport(
        ffns=tuple(ffns),
        found=len(analysis.sites),
        params_before=params_before,
        params_after=params_after,
        active_params_per_token=params_after - inactive,
        config=recorded,
        converted=converted,
        passes=passes,
    )
