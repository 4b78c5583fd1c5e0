"""Token-choice top-k routing: k=1 is Switch, k=2 GShard / Mixtral.

Shape legend: T tokens, E experts, K = config.k.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.losses import load_balance_loss, router_z_loss
from moeify.routers.base import GROUPED_FFN, ORT_MOE, Router, RouterCapabilities
from moeify.routers.capacity import active_capacity_factor, drop_over_capacity, expert_capacity
from moeify.routers.registry import register_router
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


def topk_weights(logits: Tensor, k: int, normalize: bool, score_fn: str) -> tuple[Tensor, Tensor, Tensor]:
    """logits [T, E] -> (scores [T, E], weights [T, K], expert indices [T, K]): softmax (or sigmoid) scores,
    each token's k best, renormalised to sum to 1 when `normalize`. The router and its ONNX lowering
    (`moeify.lowering.ops.ort_moe`) both compute top-k with this."""
    scores = torch.softmax(logits, dim=-1) if score_fn == "softmax" else torch.sigmoid(logits)  # [T, E]
    top_w, top_idx = torch.topk(scores, k, dim=-1)  # [T, K]
    if normalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True).clamp(min=1e-9)
    return scores, top_w, top_idx


def token_choice_routing(router: Router, logits: Tensor, scores: Tensor, top_idx: Tensor,
                         top_w: Tensor) -> SparseRouting:
    """Shared tail of token-choice routers: capacity, losses, flattening.

    logits/scores [T, E]; top_idx/top_w [T, K].
    """
    cfg = router.config
    T, K = top_idx.shape
    E = router.num_experts
    chosen = top_idx.reshape(-1)  # [T*K] the router's decisions, before capacity
    capacity_factor = active_capacity_factor(cfg, router.training)
    if capacity_factor is not None:
        top_idx = drop_over_capacity(top_idx, E, expert_capacity(T, K, E, capacity_factor))
    flat_expert = top_idx.reshape(-1)  # [T*K], E where dropped
    losses = {}
    if cfg.aux_loss_coef > 0 and router.learned:
        probs = scores / scores.sum(dim=-1, keepdim=True).clamp(min=1e-9)  # sigmoid scores -> a distribution
        # f_e counts what the router chose (Switch), not what fit: a collapsed router whose overflow is
        # dropped must still see the full penalty.
        losses["load_balance"] = cfg.aux_loss_coef * load_balance_loss(probs, chosen, E)
    if cfg.z_loss_coef > 0 and router.learned:
        losses["z_loss"] = cfg.z_loss_coef * router_z_loss(logits)
    token_idx = torch.arange(T, device=logits.device).repeat_interleave(K)  # [T*K]
    return SparseRouting(token_idx=token_idx, expert_idx=flat_expert, weight=top_w.reshape(-1),
                         logits=logits, losses=losses)


@register_router("topk")
class TopKRouter(Router):
    """Scores = softmax (or sigmoid) of logits; each token takes its k best experts.

    With `normalize=True` (default) the k weights are renormalised to sum to 1, so k copies of one dense
    FFN reproduce it exactly whatever the router picks. With k=1 that makes every weight exactly 1: the
    router then learns only from the auxiliary losses, never from the task loss. Switch Transformer scales
    the expert output by the router probability instead: use `normalize=False` for that.

    With a `capacity_factor`, each expert computes at most ceil(cf * T * k / E) assignments; the rest are
    dropped (the token's routed output for that choice is zero; the residual carries it). Priority is
    GShard's: all first choices before any second choice, earlier tokens first. A token's second choice can
    therefore be dropped because of a *later* token's first choice, so top-k with a capacity factor mixes
    tokens and is refused in a causal decoder (`mixes_tokens`).
    """

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        dropless = config.capacity_factor is None
        # com.microsoft.MoE routes with softmax top-k (renormalised or not); sigmoid scores map to it only
        # when renormalised (see moeify.lowering), and it has no capacity limit.
        fused = dropless and (config.score_fn == "softmax" or config.normalize)
        return dataclasses.replace(super().capabilities(config), mixes_tokens=not dropless,
                                   lowerings=(ORT_MOE, GROUPED_FFN) if fused else (GROUPED_FFN,))

    @classmethod
    def preserves_dense(cls, upcycle, config: MoEConfig) -> bool:
        """The claims of `moeify.upcycle.PRESERVATION` (which states them in words). Without a capacity limit
        only: a dropped assignment contributes nothing."""
        return cls.preserves_with(upcycle, config, upcycle.resolved_router_init)

    @classmethod
    def preserves_with(cls, upcycle, config: MoEConfig, router_init: str) -> bool:
        """`preserves_dense` for a router whose weight starts as `router_init` says (whatever `upcycle`'s)."""
        k, E = config.k, config.num_experts
        if config.capacity_factor is not None:
            return False
        if upcycle.copies_dense:
            # output = (sum of the selected weights) * dense(x)
            return config.normalize or (config.score_fn == "softmax" and k == E)
        if upcycle.init == "granular" and router_init == "avg_k":
            # mean keys equal across virtual groups and differ within one (G > 1): no whole-group selection,
            # no exact sum. G = 1: every expert is the whole FFN, all rows tie (non-zero: sigmoid scores
            # are not 1/2), so as copy
            as_copy = config.normalize or (config.score_fn == "softmax" and k == E)
            return upcycle.granularity == 1 and as_copy
        if upcycle.init == "split":
            # every expert must be selected with the same weight g0: all of them, under tied logits
            return k == E and router_init == "zeros"
        if upcycle.init == "granular":
            # the selection must be whole virtual groups and the selected weights must sum to g0 * k
            G = upcycle.granularity
            if E % G or k % G:
                return False
            if config.normalize:
                return k == E or router_init in ("random", "kmeans")
            return k == E and (config.score_fn == "softmax" or router_init == "zeros")
        return False  # none; noise or drop that perturbs the copies

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        cfg = self.config
        logits = self.compute_logits(x)  # [T, E]
        scores, top_w, top_idx = topk_weights(logits, cfg.k, cfg.normalize, cfg.score_fn)  # [T, E], [T, K] x2
        return token_choice_routing(self, logits, scores, top_idx, top_w)
