"""`ConvertConfig`: every option of one conversion, frozen, validated, versioned, JSON round-trip.

    cfg = moeify.ConvertConfig(experts=8, k=2, init="copy", layer={"capacity_factor": 2.0})
    moe = moeify.convert(model, cfg)
    moeify.ConvertConfig.from_json(cfg.to_json()) == cfg

The Python keyword form (`convert(model, experts=8, ...)`), the CLI (`moeify convert --config FILE`) and the
saved recipe (`moeify.json`) all build one of these, so every option is checked here, once, before any
model is touched. What needs the model (an include glob that matches no FFN, an expert width that the init
cannot give, a router a causal decoder refuses) is checked by `convert`.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from moeify.config import ConfigError, MoEConfig
from moeify.json_config import JsonConfig
from moeify.upcycle.config import UpcycleConfig

CONVERT_CONFIG_VERSION = 1

# MoEConfig fields `layer` may not set: the shape comes from each FFN found, and experts / k / router are
# fields of ConvertConfig itself (MoEConfig name -> ConvertConfig name).
FROM_FFN = ("d_model", "d_ff", "activation", "gated", "bias")
OWN_FIELDS = {"num_experts": "experts", "k": "k", "router": "router"}
LAYER_FIELDS = tuple(
    f.name for f in dataclasses.fields(MoEConfig) if f.name not in (*FROM_FFN, *OWN_FIELDS, "version")
)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


@dataclass(frozen=True)
class ConvertConfig(JsonConfig):
    """Every option of `moeify.convert`: what to convert, into what, and how the experts start.

    Args:
        experts: experts per converted FFN (E).
        k: experts each token is sent to (1 <= k <= experts).
        router: router name (`moeify.routers.ROUTERS`).
        layer: the other `MoEConfig` fields, the same for every converted FFN (capacity_factor, score_fn,
            normalize, jitter_noise, num_shared_experts, aux_loss_coef, ...). The shape fields (d_model,
            d_ff, activation, gated, bias) come from each FFN found. Stored read-only.
        init: how experts and router are filled from the dense weights: an `UpcycleConfig`, or a strategy
            name ("copy", "none", ...) or a dict of UpcycleConfig fields, which become an UpcycleConfig
            seeded with `seed` (unless the dict sets its own). "none" leaves the weights at their random
            init (what loading saved weights needs).
        include / exclude: module-path globs (fnmatch) on FFN names (see `moeify.find_ffns`); a string or
            a list, stored as a tuple. None: no filter.
        every: convert every n-th selected FFN (2 = every other, as sparse upcycling does).
        expert_d_ff: the experts' hidden width: an int, or {ffn name: width}; None (and FFNs missing from
            the mapping) take the init's width. The conversion report records it per FFN, so a rebuild
            with init="none" gets the same shapes.
        share_router: Omni-router: one router for every converted FFN of the same width (d_model), built
            and upcycled with the first such FFN; later layers route with it and their upcycling leaves it
            as it is. Its parameters appear once in `model.parameters()`.
        seed: seeds the layers' random init (routers, init="none") and, for a named init, the strategy.
            Note that `replace(seed=...)` does not re-seed an `init` that is already an UpcycleConfig.
        add_aux_loss: in training mode, add the routers' auxiliary losses (`moeify.aux_loss`) to the
            `loss` the model's forward returns (a Hugging Face output or a dict with "loss") and report them
            as `aux_loss`, as Mixtral does, so Trainer/TRL/accelerate loops train them unchanged. Outputs
            without a loss, and eval mode, are left alone. See `moeify.integrations.aux_loss`.
        version: format version (for JSON written by another moeify).
    """

    experts: int = 8
    k: int = 2
    router: str = "topk"
    layer: Mapping[str, Any] = field(default_factory=dict)
    init: UpcycleConfig = "copy"  # a name or a dict is turned into an UpcycleConfig
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] | None = None
    every: int = 1
    expert_d_ff: int | Mapping[str, int] | None = None
    seed: int = 0
    share_router: bool = False
    add_aux_loss: bool = True
    version: int = CONVERT_CONFIG_VERSION

    def __post_init__(self) -> None:
        _need(self.version == CONVERT_CONFIG_VERSION,
              f"ConvertConfig version {self.version!r} is not supported by this moeify (expects "
              f"{CONVERT_CONFIG_VERSION}); upgrade moeify or re-create the config")
        _need(_is_int(self.experts) and self.experts >= 1,
              f"experts must be an integer >= 1, got {self.experts!r}")
        _need(_is_int(self.k) and 1 <= self.k <= self.experts,
              f"k must be an integer with 1 <= k <= experts ({self.experts}), got {self.k!r}")
        _need(_is_int(self.every) and self.every >= 1,
              f"every must be an integer >= 1 (2 converts every other FFN), got {self.every!r}")
        _need(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        _need(isinstance(self.share_router, bool),
              f"share_router must be true or false, got {self.share_router!r}")
        _need(isinstance(self.add_aux_loss, bool),
              f"add_aux_loss must be True or False, got {self.add_aux_loss!r}")
        set_ = object.__setattr__  # frozen: normalise the accepted spellings once, here
        set_(self, "layer", _checked_layer(self.layer))
        self.layer_config(d_model=1, d_ff=1)  # the router name and every layer value, checked by MoEConfig
        set_(self, "init", _upcycle_config(self.init, self.seed))
        set_(self, "include", _patterns(self.include, "include"))
        set_(self, "exclude", _patterns(self.exclude, "exclude"))
        set_(self, "expert_d_ff", _checked_widths(self.expert_d_ff))

    def layer_config(self, d_model: int, d_ff: int, activation: str = "gelu", gated: bool = False,
                     bias: bool = True) -> MoEConfig:
        """The `MoEConfig` of one converted FFN: its shape, with this config's experts, k, router, layer."""
        return MoEConfig(d_model=d_model, d_ff=d_ff, activation=activation, gated=gated, bias=bias,
                         num_experts=self.experts, k=self.k, router=self.router, **self.layer)

    def to_dict(self) -> dict:
        """Plain JSON types: the layer and width mappings as dicts, globs as lists, init as a dict."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Mapping):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, UpcycleConfig):
                value = value.to_dict()
            out[f.name] = value
        return out

    def __hash__(self) -> int:  # the read-only mappings are not hashable themselves
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    def __reduce__(self):  # copy, deepcopy and pickle go through the JSON form (mappingproxy does not pickle)
        return type(self).from_dict, (self.to_dict(),)


def _checked_layer(layer) -> MappingProxyType:
    _need(isinstance(layer, Mapping),
          f"layer must be a mapping of MoEConfig fields (e.g. {{'capacity_factor': 2.0}}), got {layer!r}")
    for key in layer:
        if key in OWN_FIELDS:
            own = OWN_FIELDS[key]
            raise ConfigError(f"layer sets {key!r}, a ConvertConfig field of its own: pass {own}= to convert "
                              f"(or ConvertConfig({own}=...)) instead")
        if key in FROM_FFN:
            hint = "; set expert_d_ff for the experts' width" if key == "d_ff" else ""
            raise ConfigError(f"layer sets {key!r}, which comes from each FFN found; remove it{hint}")
        _need(key in LAYER_FIELDS, f"unknown layer field {key!r} (layer holds MoEConfig fields); "
                                   f"valid: {', '.join(sorted(LAYER_FIELDS))}")
    return MappingProxyType(dict(sorted(layer.items())))


def _upcycle_config(init, seed: int) -> UpcycleConfig:
    if isinstance(init, UpcycleConfig):
        return init
    if isinstance(init, str):
        return UpcycleConfig(init=init, seed=seed)
    if isinstance(init, Mapping):
        return UpcycleConfig.from_dict({"seed": seed, **init})
    raise ConfigError(f"init must be a strategy name (e.g. 'copy'), a dict or an UpcycleConfig, got {init!r}")


def _patterns(value, name: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable) and not isinstance(value, Mapping):
        value = tuple(value)
        if all(isinstance(p, str) for p in value):
            return value
    raise ConfigError(f"{name} must be a module-path glob or a list of them (e.g. '*.mlp'), got {value!r}")


def _checked_widths(value) -> int | MappingProxyType | None:
    def width(v) -> bool:
        return _is_int(v) and v >= 1

    if value is None or width(value):
        return value
    if isinstance(value, Mapping):
        for name, v in value.items():
            _need(isinstance(name, str) and width(v),
                  f"expert_d_ff for {name!r} must be an integer >= 1, got {v!r}")
        return MappingProxyType(dict(value))
    raise ConfigError(f"expert_d_ff must be an integer >= 1 or a {{ffn name: width}} mapping, got {value!r}")


def config_from_call(config, options: dict) -> ConvertConfig:
    """The ConvertConfig of a `convert(model, config, **options)` call.

    `config` a ConvertConfig and no options: it. No config: `ConvertConfig(**options)` (the keyword form).
    Both: an error (a config is complete; change one with `config.replace(...)`). A dict or an MoEConfig as
    `config` is the old meaning, "the other MoEConfig fields": still taken, as `layer`, with a warning.
    """
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(ConvertConfig)} - {"version"})
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(ConvertConfig) if f.name != "version")
        raise ConfigError(f"convert() got unknown option(s) {', '.join(unknown)}; valid: {valid}, "
                          "and filter_fn, calibration, inplace, progress")
    if isinstance(config, ConvertConfig):
        if options:
            given = ", ".join(sorted(options))
            raise ConfigError(f"convert() got a ConvertConfig and keyword options ({given}); pass one or the "
                              "other (config.replace(...) changes a config)")
        return config
    if isinstance(config, (dict, MoEConfig)):
        return ConvertConfig(**options, layer=_legacy_layer(config, options))
    if config is not None:
        raise ConfigError(f"config must be a ConvertConfig, got {type(config).__name__} {config!r}; "
                          "pass options as keywords, e.g. convert(model, experts=8)")
    return ConvertConfig(**options)


def _legacy_layer(config: dict | MoEConfig, options: dict) -> dict:
    """`convert(config=<dict or MoEConfig>)`, before ConvertConfig: the MoEConfig fields become `layer`."""
    warnings.warn("convert(config=<MoEConfig fields>) is deprecated and will be removed in the next release: "
                  "pass them as layer={...} (ConvertConfig.layer)", DeprecationWarning, stacklevel=4)
    if "layer" in options:
        raise ConfigError("convert() got both layer= and config=<MoEConfig fields>; pass layer= only")
    if isinstance(config, dict):
        return config
    defaults = ConvertConfig.__dataclass_fields__
    for name, own in OWN_FIELDS.items():
        mine = options.get(own, defaults[own].default)
        if getattr(config, name) != mine:
            raise ConfigError(f"config.{name}={getattr(config, name)!r} disagrees with {own}={mine!r}; "
                              f"pass {own}={getattr(config, name)!r} to convert")
    return {name: getattr(config, name) for name in LAYER_FIELDS}
