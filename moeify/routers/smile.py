"""Bi-level routing after SMILE (He et al. 2022, "SMILE: Scaling Mixture-of-Experts with Efficient Bi-level
Routing", arXiv 2212.05191): a token first chooses a node, then experts inside that node.

Shape legend: T tokens, D model width, E experts, N nodes (`config.router_groups`), M = E / N experts per
node, K = config.k.

Experts are laid out node-major: node n holds experts [n*M, (n+1)*M). That is the layout
`moeify.parallelize(model, ep_mesh=<('node', 'local') mesh>, bilevel=True)` shards them in, so with N a
multiple of the mesh's node count the first all_to_all sends a token to its chosen node only (at most one
row per token crosses the node boundary) and the second moves it inside that node.

The routing (paper, "Orchestration of Inter-node All2All and Intra-node All2All"):
- node gate (the paper's inter-node router): p_node = softmax(x W_node^T) [T, N]; the token takes its top-1
  node n;
- local gate (intra-node router): p_local = softmax(x W_local^T) [T, M]; the token takes its top-K slots j
  inside n and goes to experts n*M + j. The paper routes top-1 at both levels (K = 1); K > 1 picks more
  experts of the same node, so a token still crosses to one node only;
- combine weight = p_node[n] * p_local[j], the product of the two gate values (never renormalised:
  `config.normalize` does not apply, so copies of a dense FFN do not reproduce it: no `preserves_dense`).
W_local is one [M, D] matrix shared by every node: the paper notes that the split reduces the router's
parameters, and here it has N + M rows instead of E = N * M. Both gates live in the router's one
`weight` [N + M, D]: rows [0, N) are the node gate, rows [N, N + M) the local gate. The router runs where
the token lives (before any exchange), which computes the same function as running the local gate on the
destination node.

Loss (paper, "Additive Load Balancing Loss": two terms, each a scaled dot product of a dispatch-fraction
vector and a routing-probability vector, i.e. Switch's load-balancing term at each level), added, with the
one coefficient `aux_loss_coef` for both:
  aux_loss_coef * (N * sum_n f_n P_n  +  M * sum_j f_j P_j)
f = share of the tokens' choices (nodes; slots inside the node), P = mean gate probability, both over the
tokens of this forward; `losses["node_balance"]` and `losses["local_balance"]` (no node term when N = 1: one
node is always balanced). In the paper the intra-node term is computed by each node's router on the tokens it
received; with one local gate shared by all nodes, the pooled statistic here is that term over all tokens.
The ST-MoE z-loss (`z_loss_coef`) applies to both gates' logits. With a `capacity_factor`, assignments past
an expert's capacity are dropped as in `topk` (GShard priority), which makes the router mix tokens.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moeify.losses import load_balance_loss, router_z_loss
from moeify.routers.base import Router, RouterCapabilities
from moeify.routers.capacity import active_capacity_factor, drop_over_capacity, expert_capacity
from moeify.routers.registry import register_router
from moeify.routing import SparseRouting

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


def bilevel_choice(node_logits: Tensor, local_logits: Tensor,
                   k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """node_logits [T, N], local_logits [T, M] -> (p_node [T, N], p_local [T, M], experts [T, K] int64,
    weights [T, K]): top-1 node, top-k slots inside it, weight = p_node * p_local."""
    M = local_logits.shape[-1]
    p_node = torch.softmax(node_logits, dim=-1)  # [T, N]
    p_local = torch.softmax(local_logits, dim=-1)  # [T, M]
    node_w, node = torch.topk(p_node, 1, dim=-1)  # [T, 1]
    local_w, slot = torch.topk(p_local, k, dim=-1)  # [T, K]
    return p_node, p_local, node * M + slot, node_w * local_w


@register_router("smile")
class SmileRouter(Router):
    """Bi-level routing: node gate, then local gate (see the module docstring)."""

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        return dataclasses.replace(super().capabilities(config),
                                   mixes_tokens=config.capacity_factor is not None,
                                   expert_groups=config.router_groups)

    @staticmethod
    def num_logits(config: MoEConfig) -> int:
        return config.router_groups + config.num_experts // config.router_groups  # N + M

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> SparseRouting:
        cfg = self.config
        N, E, K = cfg.router_groups, self.num_experts, cfg.k
        M = E // N
        T = x.shape[0]
        logits = self.compute_logits(x)  # [T, N + M]
        node_logits, local_logits = logits[:, :N], logits[:, N:]  # [T, N], [T, M]
        p_node, p_local, top_idx, top_w = bilevel_choice(node_logits, local_logits, K)  # .., [T, K] x2
        chosen_nodes = top_idx[:, 0] // M  # [T] the gates' decisions, before any capacity drop
        chosen_slots = (top_idx % M).reshape(-1)  # [T*K]
        capacity_factor = active_capacity_factor(cfg, self.training)
        if capacity_factor is not None:
            top_idx = drop_over_capacity(top_idx, E, expert_capacity(T, K, E, capacity_factor))
        losses = {}
        if cfg.aux_loss_coef > 0:
            if N > 1:
                losses["node_balance"] = cfg.aux_loss_coef * load_balance_loss(p_node, chosen_nodes, N)
            losses["local_balance"] = cfg.aux_loss_coef * load_balance_loss(p_local, chosen_slots, M)
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = cfg.z_loss_coef * (router_z_loss(node_logits) + router_z_loss(local_logits))
        # the joint log-probability log p_node[n] + log p_local[j] of expert n*M + j, for statistics
        joint = (torch.log_softmax(node_logits, dim=-1).unsqueeze(2)
                 + torch.log_softmax(local_logits, dim=-1).unsqueeze(1)).reshape(T, E)  # [T, E]
        token_idx = torch.arange(T, device=x.device).repeat_interleave(K)  # [T*K]
        return SparseRouting(token_idx=token_idx, expert_idx=top_idx.reshape(-1), weight=top_w.reshape(-1),
                             logits=joint, losses=losses)
