"""Helpers shared by the strategies: seeded generators, the result record, experts made from neurons one
at a time (`ExpertTensors`) and filled into a layer.

Shape legend: D d_model, H dense d_ff, He expert d_ff, E experts.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from moeify.errors import UpcycleError
from moeify.upcycle.config import DenseFFNWeights

Tensor = torch.Tensor

# At most this many calibration tokens are used (a seeded subset when more are given): k-means and neuron
# features cost O(tokens) and a few thousand tokens already pin the statistics down.
MAX_CALIBRATION_TOKENS = 16384
# Neuron clustering (split_method="cluster") describes each of the H neurons by its activations on at most
# this many tokens: an [H, N] feature matrix.
MAX_NEURON_FEATURE_TOKENS = 4096


@dataclass
class UpcycleResult:
    """What `upcycle_layer` did, for logs and tests.

    partition: [E, He] int64, the dense hidden units each expert holds (split: every unit exactly once;
        granular: slice e % G; copy-like: all units). None for init="none".
    redrawn: [E, n] int64, drop only: the units re-initialised in each expert (n = round(r*H)).
    split_features: split with split_method="cluster": what the neurons were clustered on,
        "activations" (calibration given) or "w1 rows" (no calibration).
    router_init: the router init used ("random", "zeros", "kmeans"), or a note when the router was left.
    w2_scale, b2_scale: factors applied to the experts' w2 columns and b2 (see the strategy docs).
    """

    init: str
    router_init: str = "untouched"
    partition: Tensor | None = None
    redrawn: Tensor | None = None
    split_features: str | None = None
    w2_scale: float = 1.0
    b2_scale: float = 1.0


def make_generator(seed: int, key: int | str, stream: str) -> torch.Generator:
    """A CPU generator for (seed, layer key, purpose): layers and purposes get independent streams."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(zlib.crc32(f"moeify-upcycle:{seed}:{key}:{stream}".encode()))
    return gen


def flatten_calibration(calibration: Tensor, d_model: int, gen: torch.Generator,
                        max_tokens: int = MAX_CALIBRATION_TOKENS) -> Tensor:
    """[..., D] -> float32 [N, D], N <= max_tokens (a seeded subset when more), on the input's device."""
    if not isinstance(calibration, torch.Tensor) or calibration.shape[-1] != d_model:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration)
        raise UpcycleError(f"calibration must be a tensor of FFN inputs [..., {d_model}], got {shape}")
    x = calibration.detach().reshape(-1, d_model).float()
    if x.shape[0] > max_tokens:
        keep = torch.randperm(x.shape[0], generator=gen)[:max_tokens].sort().values
        x = x[keep.to(x.device)]
    return x


def uniform_gate_weight(moe_config) -> float:
    """The combine weight each selected expert gets from a top-k router whose logits are all equal.

    normalize=True: 1/k; softmax without renormalisation: 1/E; sigmoid without: sigmoid(0) = 1/2.
    """
    if moe_config.normalize:
        return 1.0 / moe_config.k
    if moe_config.score_fn == "softmax":
        return 1.0 / moe_config.num_experts
    return 0.5


def expert_rows(idx: Tensor, H: int, gated: bool) -> Tensor:
    """Rows of w1 / entries of b1 for hidden units idx [He]: idx, or [idx; H + idx] when gated."""
    return torch.cat([idx, idx + H]) if gated else idx


@dataclass
class ExpertTensors:
    """One expert's weights as the strategy made them (any dtype: the consumer casts to the layer's, as
    `copy_` does). b1/b2 None: the dense FFN has none (a layer with biases gets zeros)."""

    w1: Tensor  # [H1e, D]
    w2: Tensor  # [D, He]
    b1: Tensor | None = None  # [H1e]
    b2: Tensor | None = None  # [D]


# What every data-free strategy returns: its record, and its experts made one at a time, in expert order
# (the generator is drawn from as they are made, so they must be consumed in order, each once).
ExpertPlan = tuple[UpcycleResult, Iterator[ExpertTensors]]


@torch.no_grad()
def partition_experts(dense: DenseFFNWeights, partition: Tensor, w2_scale: float = 1.0,
                      b2_scale: float = 1.0) -> Iterator[ExpertTensors]:
    """Expert e = the dense FFN restricted to hidden units partition[e] ([E, He]), w2 and b2 scaled.

    Expert e computes w2_scale * w2[:, P] act(w1[P] x + b1[P]) + b2_scale * b2 with P = partition[e]
    (gate and up rows of a unit move together). Every unit in order (copy) yields the dense tensors
    themselves (no gather); a scale of 1 is exact (no float32 round trip).
    """
    H = dense.d_ff
    every_unit = torch.arange(H)
    for e in range(partition.shape[0]):
        if partition[e].shape[0] == H and torch.equal(partition[e].cpu(), every_unit):
            w1, b1, w2 = dense.w1, dense.b1, dense.w2
        else:
            idx = partition[e].to(dense.w1.device)
            rows = expert_rows(idx, H, dense.gated)
            w1, w2 = dense.w1.index_select(0, rows), dense.w2.index_select(1, idx)
            b1 = dense.b1.index_select(0, rows) if dense.b1 is not None else None
        b2 = dense.b2 if dense.b2 is None or b2_scale == 1.0 else dense.b2.float() * b2_scale
        yield ExpertTensors(w1, w2 if w2_scale == 1.0 else w2.float() * w2_scale, b1, b2)


@torch.no_grad()
def fill_experts(layer, experts: Iterable[ExpertTensors]) -> None:
    """layer.w1/w2/b1/b2[e] <- the e-th expert, one at a time (memory: one expert beyond the layer)."""
    for e, t in enumerate(experts):
        layer.w1[e].copy_(t.w1)
        layer.w2[e].copy_(t.w2)
        for name, value in (("b1", t.b1), ("b2", t.b2)):
            target = getattr(layer, name)
            if target is not None:
                target[e].copy_(value) if value is not None else target[e].zero_()


@torch.no_grad()
def fill_from_partition(layer, dense: DenseFFNWeights, partition: Tensor, w2_scale: float = 1.0,
                        b2_scale: float = 1.0) -> None:
    """Expert e <- the dense FFN restricted to hidden units partition[e] (see `partition_experts`)."""
    fill_experts(layer, partition_experts(dense, partition, w2_scale, b2_scale))


def tensor_stats(t: Tensor) -> tuple[float, float]:
    """(mean, std) of a tensor in float64 (std 0 for a single element)."""
    t = t.detach().double()
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def normal_like(shape, mean: float, std: float, gen: torch.Generator) -> Tensor:
    """float32 CPU normal(mean, std) draws from `gen`."""
    return torch.randn(shape, generator=gen) * std + mean


def slice_scales(moe_config, slices: int) -> tuple[float, float]:
    """(w2_scale, b2_scale) for experts that each hold 1/`slices` of the dense hidden units.

    With g0 = `uniform_gate_weight` (the weight of a selected expert when all logits tie) and k selected
    experts covering k/slices full copies of the dense FFN: w2 is scaled by slices / (g0 k) and b2 by
    1 / (g0 k), so the k selected slices sum back to exactly one dense FFN, b2 included once.
    normalize=True: w2 * slices, b2 unchanged.
    """
    g0k = uniform_gate_weight(moe_config) * moe_config.k
    return slices / g0k, 1.0 / g0k
