"""The upcycling interface's data types: `DenseFFNWeights` (the source) and `UpcycleConfig` (the recipe).

Shape legend: D d_model, H dense d_ff, H1 = 2H when gated (rows [0, H) gate, [H, 2H) up), E experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeify.activations import CUSTOM, Activation
from moeify.errors import ConfigError, UpcycleError
from moeify.json_config import JsonConfig

Tensor = torch.Tensor

# Strategy names (`init=`). "none" leaves the layer's weights as they are (loading a saved model).
INITS = ("copy", "noise", "drop", "split", "granular", "none")
SPLIT_METHODS = ("random", "cluster")
ROUTER_INITS = ("random", "zeros", "kmeans", "avg_k")
# router_init="avg_k" averages each expert's share of the dense keys: only the inits that cut them in blocks.
AVG_K_INITS = ("split", "granular")
UPCYCLE_CONFIG_VERSION = 1


@dataclass(frozen=True)
class DenseFFNWeights:
    """A dense FFN in moeify's conventions: y = w2 @ act(w1 @ x + b1) + b2 (gated: act(gate) * up)."""

    w1: Tensor  # [H1, D]; gated: rows [0, H) gate, [H, 2H) up
    b1: Tensor | None  # [H1]
    w2: Tensor  # [D, H]
    b2: Tensor | None  # [D]
    activation: str  # a name of moeify.activations.ACTIVATIONS, or CUSTOM
    gated: bool
    custom_activation: Callable[[Tensor], Tensor] | None = None  # computes a CUSTOM activation

    def __post_init__(self) -> None:
        if (self.activation == CUSTOM) != (self.custom_activation is not None):
            raise UpcycleError(f"a dense FFN with activation {self.activation!r} needs custom_activation "
                               f"exactly when the activation is {CUSTOM!r}")
        if self.w1.dim() != 2 or self.w2.dim() != 2:
            raise UpcycleError(f"dense FFN weights must be matrices: w1 [H1, D], w2 [D, H]; got "
                               f"w1 {tuple(self.w1.shape)}, w2 {tuple(self.w2.shape)}")
        h1, d = self.w1.shape
        if self.w2.shape[0] != d:
            raise UpcycleError(f"dense FFN w2 {tuple(self.w2.shape)} must be [D, H] with D = {d} "
                               f"(the width of w1 {tuple(self.w1.shape)})")
        expected_h1 = 2 * self.w2.shape[1] if self.gated else self.w2.shape[1]
        if h1 != expected_h1:
            what = "2H ([gate; up] stacked)" if self.gated else "H"
            raise UpcycleError(f"dense FFN w1 has {h1} rows but a {'gated' if self.gated else 'plain'} FFN "
                               f"with w2 {tuple(self.w2.shape)} needs {what} = {expected_h1}")
        if self.b1 is not None and tuple(self.b1.shape) != (h1,):
            raise UpcycleError(f"dense FFN b1 must have shape ({h1},), got {tuple(self.b1.shape)}")
        if self.b2 is not None and tuple(self.b2.shape) != (d,):
            raise UpcycleError(f"dense FFN b2 must have shape ({d},), got {tuple(self.b2.shape)}")

    @property
    def act(self) -> Activation:
        """What computes the activation: its name, or the module of a custom one."""
        return self.custom_activation if self.activation == CUSTOM else self.activation

    @property
    def d_model(self) -> int:
        return self.w1.shape[1]

    @property
    def d_ff(self) -> int:
        return self.w2.shape[1]

    @classmethod
    def from_module(cls, ffn) -> DenseFFNWeights:
        """From a `moeify.dense_ffn.DenseFFN` (or anything with w1/b1/w2/b2/activation/gated)."""
        b1, b2 = getattr(ffn, "b1", None), getattr(ffn, "b2", None)
        named = isinstance(ffn.activation, str)  # else a module or function computing it
        return cls(w1=ffn.w1.detach(), b1=None if b1 is None else b1.detach(), w2=ffn.w2.detach(),
                   b2=None if b2 is None else b2.detach(), activation=ffn.activation if named else CUSTOM,
                   gated=ffn.gated, custom_activation=None if named else ffn.activation)


# Options that only one strategy reads: (field, default, the init that reads it). Setting one to a
# non-default value for another strategy is almost always a mistake, so the config refuses it.
_STRATEGY_OPTIONS = (
    ("noise_std", 0.01, "noise"),
    ("drop_rate", 0.5, "drop"),
    ("split_method", "random", "split"),
    ("granularity", 1, "granular"),
)


@dataclass(frozen=True)
class UpcycleConfig(JsonConfig):
    """How to fill an MoE layer from a dense FFN. Frozen, validated, JSON round-trip.

    Args:
        init: the strategy: "copy" (sparse upcycling), "noise" (copy + relative Gaussian noise), "drop"
            (drop-upcycling), "split" (MoEfication neuron partition), "granular" (fine-grained upcycling
            with virtual groups) or "none" (leave weights as they are, e.g. when loading a saved model).
        seed: seeds every random draw (noise, dropped neurons, permutation, k-means, router); the same seed,
            layer key and inputs give the same weights.
        noise_std: init="noise": noise std relative to each weight tensor's own std.
        drop_rate: init="drop": fraction r of each expert's hidden neurons re-drawn (round(r*H) of them).
        split_method: init="split": "random" (seeded permutation) or "cluster" (balanced k-means of neurons
            on calibration activations, or on the rows of w1 when no calibration is given).
        granularity: init="granular": G, the number of slices of width H/G the dense FFN is cut into.
        router_init: "random" (normal, std `router_std`), "zeros" or "kmeans" (normalised k-means centroids
            of the calibration hidden states; needs calibration) or "avg_k" (split and granular only: row e is
            the mean of expert e's first-layer rows, its gate rows when gated: Avg-K's block key, Liu et al.
            2023; see `moeify.routers.avg_k`). None picks the strategy's default:
            "zeros" for split (what makes split exact), "random" otherwise.
        router_std: std of the "random" router init (0.02, as the Router's own init).
        kmeans_iters: iteration cap of every k-means here (router and neuron clustering).
        version: format version of the config (for JSON written by another moeify).
    """

    init: str = "copy"
    seed: int = 0
    noise_std: float = 0.01
    drop_rate: float = 0.5
    split_method: str = "random"
    granularity: int = 1
    router_init: str | None = None
    router_std: float = 0.02
    kmeans_iters: int = 50
    version: int = UPCYCLE_CONFIG_VERSION

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        def real(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        need(self.init in INITS, f"unknown upcycling init {self.init!r}; valid: {', '.join(INITS)}")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool),
             f"seed must be an integer, got {self.seed!r}")
        need(real(self.noise_std) and self.noise_std >= 0,
             f"noise_std must be a finite number >= 0 (relative to each weight's std, e.g. 0.01), "
             f"got {self.noise_std!r}")
        need(real(self.drop_rate) and 0 <= self.drop_rate <= 1,
             f"drop_rate must be in [0, 1] (the fraction of each expert's neurons re-drawn, e.g. 0.5), "
             f"got {self.drop_rate!r}")
        need(self.split_method in SPLIT_METHODS,
             f"unknown split_method {self.split_method!r}; valid: {', '.join(SPLIT_METHODS)}")
        need(isinstance(self.granularity, int) and not isinstance(self.granularity, bool)
             and self.granularity >= 1,
             f"granularity must be an integer >= 1 (the number of slices of the dense FFN), "
             f"got {self.granularity!r}")
        need(self.router_init is None or self.router_init in ROUTER_INITS,
             f"unknown router_init {self.router_init!r}; valid: {', '.join(ROUTER_INITS)} "
             "(or None for the strategy's default)")
        need(self.router_init != "avg_k" or self.init in AVG_K_INITS,
             f"router_init='avg_k' averages each expert's block of the dense FFN's keys, which only "
             f"init='split' or 'granular' cut; got init={self.init!r}: use one of those, or another "
             "router_init")
        need(real(self.router_std) and self.router_std >= 0,
             f"router_std must be a finite number >= 0, got {self.router_std!r}")
        need(isinstance(self.kmeans_iters, int) and not isinstance(self.kmeans_iters, bool)
             and self.kmeans_iters >= 1, f"kmeans_iters must be an integer >= 1, got {self.kmeans_iters!r}")
        need(self.version == UPCYCLE_CONFIG_VERSION,
             f"UpcycleConfig version {self.version!r} is not supported by this moeify (expects "
             f"{UPCYCLE_CONFIG_VERSION}); upgrade moeify or re-create the config")
        for name, default, owner in _STRATEGY_OPTIONS:
            value = getattr(self, name)
            need(value == default or self.init == owner,
                 f"{name}={value!r} is only used by init={owner!r}, not init={self.init!r}; "
                 f"drop it or use init={owner!r}")

    @property
    def copies_dense(self) -> bool:
        """Every expert starts as an exact copy of the dense FFN: copy, or noise / drop with nothing
        perturbed (noise_std=0, drop_rate=0)."""
        return (self.init == "copy" or self.init == "noise" and self.noise_std == 0
                or self.init == "drop" and self.drop_rate == 0)

    @property
    def resolved_router_init(self) -> str:
        """The router init actually used: `router_init`, or the strategy's default when it is None."""
        if self.router_init is not None:
            return self.router_init
        return "zeros" if self.init == "split" else "random"

