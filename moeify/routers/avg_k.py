"""Avg-K routing (Liu et al. 2023, "Towards A Unified View of Sparse Feed-Forward Network in Pretraining
Large Language Model", EMNLP 2023, arXiv 2305.13999): select memory blocks (experts) through their mean key.

Shape legend: T tokens, D d_model, E experts, H expert d_ff, H1 = 2H when gated.

The paper reads an FFN y = W2 σ(W1 x) as a key-value memory: row i of the first-layer weight W1 is the key
k_i of memory cell i, column i of W2 its value. An expert is a block of cells, and Avg-K scores block e by
the input's dot product with the block's mean key (the abstract: "Avg-K ... selects blocks through their
mean aggregated hidden states"):

    logit_e(x) = x · mean_{i in block e} k_i                                             [T, E]

then takes each token's top k blocks as the topk router does (softmax or sigmoid scores, renormalised when
`normalize`). The stored paper text available here is the abstract; its body (section and equation
numbers) could not be retrieved, so only the abstract is cited.

Which rows are the keys: moeify's w1 [E, H1, D] is the first layer. Plain FFN: all H rows. Gated FFN
(act(gate·x) * (up·x)): the *gate* rows [0, H). The paper's key is the weight whose dot product with x goes
through the nonlinearity σ and so decides whether a cell fires; in a gated FFN that is the gate
projection, the up projection is a linear multiplier of an already-decided activation.

Two forms:
- tied, as the paper does: `router="avg_k"` (this class). No parameter of its own; each forward
  recomputes the mean keys from the layer's *current* w1, so the routing follows the experts as they
  train and the task loss's gradient reaches w1 through the router too. `MoELayer` hands it its w1
  (`reads_expert_weights`). No auxiliary losses (nothing of its own to balance); top-k, capacity and
  lowering as topk (its logits are a MatMul with the mean of w1's rows in the exported graph).
- untied: `router="topk"` with `UpcycleConfig(router_init="avg_k")` for split or granular experts: a
  plain learned top-k router whose weight starts at these mean keys (`moeify.upcycle.router_init`).

Expert parallelism shards w1 over ranks; the tied form needs every expert's keys, so `moeify.parallelize`
refuses it (ParallelError naming the untied form).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.errors import ConfigError
from moeify.routers.base import RouterCapabilities
from moeify.routers.registry import register_router
from moeify.routers.topk import TopKRouter, token_choice_routing, topk_weights
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


def mean_keys(w1: Tensor, gated: bool) -> Tensor:
    """w1 [E, H1, D] -> [E, D]: each expert's mean key (gated: the mean of the gate rows [0, H))."""
    keys = w1[:, : w1.shape[1] // 2] if gated else w1  # [E, H, D]
    return keys.mean(dim=1)  # [E, D]


@register_router("avg_k")
class AvgKRouter(TopKRouter):
    """Avg-K tied to the experts: logits = x @ mean_keys(w1).T, then top-k as `topk`; see the module
    docstring. Called by `MoELayer` with `expert_w1=layer.w1`."""

    learned = False  # no weight of its own: the mean keys are read from the experts each forward
    reads_expert_weights = True

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        return dataclasses.replace(super().capabilities(config), learned=False, reads_expert_weights=True)

    @classmethod
    def preserves_dense(cls, upcycle, config: MoEConfig) -> bool:
        """Whatever `upcycle.router_init` says, the logits are the experts' mean keys: the claims of `topk`
        for router_init="avg_k"."""
        return cls.preserves_with(upcycle, config, "avg_k")

    def compute_logits(self, x: Tensor, expert_w1: Tensor | None = None) -> Tensor:
        """x [T, D] -> logits [T, E] = x @ mean_keys(expert_w1).T, in the router dtype."""
        if expert_w1 is None:
            raise ConfigError("router 'avg_k' routes on its experts' mean keys: call it as "
                              "router(x, expert_w1=layer.w1), or through the MoELayer that owns it")
        x = self.router_input(x)  # [T, D]
        keys = mean_keys(expert_w1.to(x.dtype), self.config.gated)  # [E, D]
        return x @ keys.t()  # [T, E]

    def forward(self, x: Tensor, token_ids: Tensor | None = None, *,
                expert_w1: Tensor | None = None) -> SparseRouting:
        cfg = self.config
        logits = self.compute_logits(x, expert_w1)  # [T, E]
        scores, top_w, top_idx = topk_weights(logits, cfg.k, cfg.normalize, cfg.score_fn)  # [T, E], [T, K] x2
        return token_choice_routing(self, logits, scores, top_idx, top_w)
