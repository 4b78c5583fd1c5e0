"""What each MoE layer's router becomes in the GenAI graph: the `router_probs` input of MoE/QMoE.

Shape legend: T tokens, D model width, E experts, K experts per token, V vocabulary.

ONNX Runtime's MoE/QMoE take raw logits [T, E], softmax them, take the top K and (with
normalize_routing_weights=1) renormalise the K weights. Three routers map onto that exactly:

- learned top-k with softmax scores: logits = x @ W^T, as the router computes them;
- learned top-k with sigmoid scores, renormalised: feeding log(sigmoid(logits)) makes the op's softmax then
  renormalise give sigmoid_i / sum_topk sigmoid_j, and top-k of log-sigmoid is top-k of sigmoid;
- a fixed rule on token ids (hash routing): a table [V, E] of log one-hot logits, log(w) at the K chosen
  experts and -1e4 elsewhere (`moeify.lowering.ops.ort_moe.log_weights`, which `export_onnx` uses for the
  same routers), gathered by `input_ids` (the trick ONNX Runtime GenAI's DeepSeek-V4 builder uses). The
  renormalised softmax over the chosen gives back their weights (1/K each for hash).

Anything else (top-k without renormalisation, capacity limits, expert choice, soft, balanced) is refused with
the reason. Each plan is checked on the router itself: the routing it gives on random inputs must equal what
the op will compute from the plan's logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moeify.errors import MoeifyError
from moeify.lowering.ops.ort_moe import log_weights
from moeify.routers.base import ORT_MOE
from moeify.routing import SparseRouting


@dataclass(frozen=True)
class RouterLogits:
    """How a layer's router logits are made in ONNX.

    kind: "matmul" (x @ weight, weight [D, E]), "log_sigmoid" (log(sigmoid(x @ weight))) or "token_table"
    (table [V, E] gathered by input_ids).
    """

    kind: str
    array: np.ndarray  # [D, E] for matmul / log_sigmoid, [V, E] for token_table


def router_logits(layer, vocab_size: int, where: str) -> RouterLogits:
    """The plan for one MoELayer (eval mode); MoeifyError with the reason when the op cannot express it."""
    router, cfg = layer.router, layer.config
    caps = router.caps

    def refuse(why: str) -> MoeifyError:
        return MoeifyError(
            f"--genai: {where} (router {router.name!r}) {why}; convert with --router topk (or "
            "hash) for a GenAI export"
        )

    if cfg.num_shared_experts:
        raise refuse("has shared experts, which the builder-route surgery does not place yet")
    if not cfg.gated or cfg.activation != "silu" or cfg.bias:
        raise refuse(
            f"has {cfg.activation}{' gated' if cfg.gated else ''} experts{' with bias' if cfg.bias else ''}"
            "; the GenAI route takes SwiGLU experts without bias"
        )
    if caps.soft or caps.mixes_tokens:
        raise refuse(
            "mixes tokens (soft, expert choice, balanced or capacity-limited routing); "
            "com.microsoft.MoE routes each token alone"
        )
    if caps.learned and ORT_MOE in caps.lowerings:
        if not cfg.normalize:
            raise refuse(
                "does not renormalise its top-k weights; this route feeds MoE with "
                "normalize_routing_weights=1 only"
            )
        weight = router.weight.detach().float().t().numpy()  # [D, E]
        plan = RouterLogits(
            "log_sigmoid" if cfg.score_fn == "sigmoid" else "matmul", np.ascontiguousarray(weight)
        )
    elif caps.reads_token_ids and not caps.learned:
        plan = RouterLogits("token_table", token_table(layer, vocab_size, refuse))
    else:
        raise refuse("has no com.microsoft.MoE lowering")
    check_plan(layer, plan, refuse)
    return plan


def _routing(layer, x: torch.Tensor, ids: torch.Tensor | None) -> SparseRouting:
    with torch.no_grad():
        routing = layer.router(x, token_ids=ids)
    if not isinstance(routing, SparseRouting):
        raise MoeifyError(f"router {layer.router.name!r} gave {type(routing).__name__}, not a sparse routing")
    return routing


def token_table(layer, vocab_size: int, refuse) -> np.ndarray:
    """[V, E] log one-hot logits of a router that decides from token ids alone (checked: two different
    hidden-state draws give the same routing)."""
    cfg = layer.config
    ids = torch.arange(vocab_size)
    gen = torch.Generator().manual_seed(0)
    draws = [_routing(layer, torch.randn(vocab_size, cfg.d_model, generator=gen), ids) for _ in range(2)]
    weights = [r.dense_weights(vocab_size, cfg.num_experts, torch.float64) for r in draws]  # 2 x [V, E]
    if not torch.equal(weights[0], weights[1]):
        raise refuse(
            "routes on hidden states as well as token ids; only a pure token-id rule becomes a table"
        )
    w = weights[0]
    chosen = (w > 0).sum(dim=1)  # [V]
    if not bool((chosen == cfg.k).all()) or not torch.allclose(w.sum(dim=1), torch.ones_like(w[:, 0])):
        raise refuse(f"does not give every token {cfg.k} experts with weights summing to 1")
    return log_weights(w).float().numpy()  # [V, E]


def op_routing(logits: torch.Tensor, k: int) -> torch.Tensor:
    """What MoE/QMoE compute from router_probs with normalize_routing_weights=1, as [T, E] weights."""
    probs = torch.softmax(logits.double(), dim=-1)  # [T, E]
    top_w, top_i = torch.topk(probs, k, dim=-1)  # [T, K]
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(1, top_i, top_w)  # [T, E]


def plan_logits(plan: RouterLogits, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The logits [T, E] the ONNX graph computes from x [T, D] / ids [T] under `plan` (the NumPy reference
    of surgery's router nodes)."""
    array = torch.from_numpy(plan.array).double()
    if plan.kind == "token_table":
        return array[ids]
    logits = x.double() @ array  # [T, E]
    return torch.nn.functional.logsigmoid(logits) if plan.kind == "log_sigmoid" else logits


def check_plan(layer, plan: RouterLogits, refuse) -> None:
    """The op fed the plan's logits must route 64 random tokens as the router does (same experts, weights
    to 1e-5)."""
    cfg = layer.config
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(64, cfg.d_model, generator=gen)  # [T, D]
    ids = torch.randint(0, plan.array.shape[0] if plan.kind == "token_table" else 2, (64,), generator=gen)
    want = _routing(layer, x, ids).dense_weights(64, cfg.num_experts, torch.float64)  # [T, E]
    got = op_routing(plan_logits(plan, x, ids), cfg.k)  # [T, E]
    if not torch.allclose(got, want, atol=1e-5):
        raise refuse("routes differently from what com.microsoft.MoE computes from its logits")
