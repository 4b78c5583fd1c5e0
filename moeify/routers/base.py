"""The router interface every routing scheme implements.

A router is an `nn.Module` mapping hidden states x [T, D] (and optionally the token ids [T]) to a
`SparseRouting` or `SoftRouting`. It computes its own auxiliary losses and returns them in the routing
object: no global state. One router instance may be shared by several layers (Omni-router).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moeify.routing import Routing

if TYPE_CHECKING:  # annotations only: moeify.config imports this package to check router names
    from moeify.config import MoEConfig

Tensor = torch.Tensor


# The ONNX ops a router's layer can lower to (see moeify.lowering): ONNX Runtime's fused kernel (softmax
# top-k token choice, dropless), moeify's sparse dispatch op, and moeify's Soft MoE op.
ORT_MOE = "com.microsoft.MoE"
GROUPED_FFN = "moeify.GroupedFFN"
SOFT_EXPERTS = "moeify.SoftExperts"


@dataclass(frozen=True)
class RouterCapabilities:
    """What a router does, for the code that must not ask a router its name (convert, lowering, parallel,
    upcycling). Answered by `Router.capabilities(config)` from the class and the layer's config, so it is
    known before any router is built.

    Fields:
        learned: has a learned projection (weight [E, D]); False for fixed rules (hash, random).
        reads_token_ids: routes on token ids when the layer is given them (`layer(x, token_ids=ids)`);
            convert wires the model's input_ids to such layers.
        soft: returns a `SoftRouting` (every expert sees a mix of all tokens), not a sparse assignment.
        mixes_tokens: one token's route depends on other tokens of the forward; refused in causal decoders.
        active_experts: experts one token runs at inference (eval mode), on average, counting choices a
            capacity limit may drop (for the active-parameter count).
        lowerings: the ONNX ops that can express the router's layer, in order of preference, of
            ORT_MOE, GROUPED_FFN and SOFT_EXPERTS; an op's own file still checks what is not the router's
            business (activation, installed runtime).
        reads_expert_weights: routes on its layer's expert weights (tied to the experts, as Avg-K):
            `MoELayer` calls it with `expert_w1=layer.w1` [E, H1, D].
        expert_groups: G > 1 when every token's experts lie in one of G contiguous groups of E/G experts
            (bi-level routing: group = node); `moeify.parallelize(..., bilevel=True)` checks that no group
            straddles two nodes of its mesh. 1: no such promise.

    Claiming ORT_MOE says what the routing *is*, not only that it can be lowered: each token takes the top
    `config.k` of `config.score_fn` over `compute_logits(x)` [T, E], renormalised when `config.normalize`,
    nothing dropped (what `moeify.lowering.ops.topk_moe` computes; the export feeds it the logits, not the
    router's forward). Hugging Face's MoE checkpoints (Mixtral, Qwen-MoE) route the same way from a linear
    gate, so `moeify.io.hf_export` asks for ORT_MOE as well (with `learned` and softmax scores). A fixed
    rule (`learned=False`) claiming ORT_MOE promises instead that each token gets exactly `active_experts`
    (a whole number: `config.k`, or E for the random router's "mean" rule) distinct experts whose weights
    sum to 1, nothing dropped, in eval mode: the export feeds the op the log of those weights with
    renormalisation and k = active_experts (exact).
    """

    learned: bool
    reads_token_ids: bool
    soft: bool
    mixes_tokens: bool
    active_experts: float
    lowerings: tuple[str, ...]
    reads_expert_weights: bool = False
    expert_groups: int = 1


class Router(nn.Module):
    """Base class of every router. A subclass sets the class attributes below (or overrides
    `capabilities` where they depend on the config), implements `forward`, and registers itself with
    `@register_router("name")`; nothing else in moeify needs to know it exists."""

    name: str = "?"
    # Class-level defaults that `capabilities` reports; override them in a subclass.
    learned: bool = True  # has a learned projection
    reads_token_ids: bool = False  # routes on token ids when given
    soft: bool = False  # returns SoftRouting
    mixes_tokens: bool = False  # one token's route depends on other tokens of the batch
    reads_expert_weights: bool = False  # routes on the layer's expert weights (given as expert_w1=)

    @classmethod
    def capabilities(cls, config: MoEConfig) -> RouterCapabilities:
        """What this router class does under `config` (see `RouterCapabilities`)."""
        return RouterCapabilities(
            learned=cls.learned,
            reads_token_ids=cls.reads_token_ids,
            soft=cls.soft,
            mixes_tokens=cls.mixes_tokens,
            active_experts=float(config.k),
            lowerings=(SOFT_EXPERTS,) if cls.soft else (GROUPED_FFN,),
            reads_expert_weights=cls.reads_expert_weights,
        )

    @classmethod
    def preserves_dense(cls, upcycle, config: MoEConfig) -> bool:
        """True when experts filled by `upcycle` (an `UpcycleConfig`) reproduce the dense FFN exactly at
        init (eval mode) under this router and `config`. `moeify.upcycle.preserves` asks this, and the
        tests hold every claim to it. Default: no claim."""
        return False

    @property
    def caps(self) -> RouterCapabilities:
        """`capabilities` for this router's own config."""
        return type(self).capabilities(self.config)

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        if self.learned:
            # weight [E, D]; small random init (std 0.02, as GPT-2/LLaMA init their linears)
            self.weight = nn.Parameter(torch.empty(self.num_logits(config), config.d_model))
            nn.init.normal_(self.weight, std=0.02)

    @staticmethod
    def num_logits(config: MoEConfig) -> int:
        return config.num_experts

    def router_input(self, x: Tensor) -> Tensor:
        """x [T, D] in the router dtype (float32 by default, whatever x is), with jitter noise in training."""
        x = x.to(getattr(torch, self.config.router_dtype))
        if self.training and self.config.jitter_noise > 0:
            eps = self.config.jitter_noise
            x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
        return x  # [T, D]

    def compute_logits(self, x: Tensor) -> Tensor:
        """x [T, D] -> logits [T, E] in the router dtype."""
        x = self.router_input(x)  # [T, D]
        return x @ self.weight.to(x.dtype).t()  # [T, E]

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Routing:  # pragma: no cover
        raise NotImplementedError
