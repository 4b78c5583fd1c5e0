"""Which strategies reproduce the dense FFN exactly at init, and under which routing.

"Exact" means: for every input, every activation, gated or not, with or without biases, the upcycled
MoELayer's output equals the dense FFN's up to float rounding (the tests hold it to relative error 1e-5).
All claims assume the token-choice "topk" router without a capacity limit (capacity_factor=None: a dropped
assignment contributes nothing) and cover shared experts, whose output projection upcycling zeroes.
Other routers are not claimed (False).

`PRESERVATION` is the human-readable table (README, docs); `preserves(...)` the decision procedure the
table states; `preserves_config(upcycle, moe)` the same for two configs.
"""

from __future__ import annotations

from moeify.upcycle.config import INITS, UpcycleConfig

PRESERVATION: dict[str, str] = {
    "copy": "yes, with normalize=True (any k, score_fn, router_init), or softmax scores with k = E",
    "noise": "no (weights move by noise_std relative to their std; noise_std=0 is copy)",
    "drop": "no (round(drop_rate*H) neurons re-drawn per expert; drop_rate=0 is copy)",
    "split": "yes, with k = E and router_init='zeros' (split's default); any score_fn, normalize",
    "granular": ("yes, with normalize=True, k a multiple of G and router_init 'random' or 'kmeans' "
                 "(router rows tied per virtual group); or k = E with normalize=True or softmax "
                 "(any router_init), or sigmoid with router_init='zeros'"),
    "none": "not applicable (weights left as they are)",
}


def _default_router_init(init: str) -> str:
    return UpcycleConfig(init=init).resolved_router_init


def preserves(init: str | UpcycleConfig, router: str = "topk", k: int = 2, num_experts: int = 8,
              normalize: bool = True, *, score_fn: str = "softmax", router_init: str | None = None,
              granularity: int = 1, capacity_factor: float | None = None, noise_std: float = 0.01,
              drop_rate: float = 0.5) -> bool:
    """True when `init` reproduces the dense FFN exactly at init under this routing (see `PRESERVATION`).

    `init` may be an `UpcycleConfig`; its router_init, granularity, noise_std and drop_rate then override
    the keyword arguments. router_init None means the strategy's default ("zeros" for split, else random).
    """
    if isinstance(init, UpcycleConfig):
        cfg = init
        init, router_init = cfg.init, cfg.resolved_router_init
        granularity, noise_std, drop_rate = cfg.granularity, cfg.noise_std, cfg.drop_rate
    if init not in INITS:
        raise ValueError(f"unknown upcycling init {init!r}; valid: {', '.join(INITS)}")
    if router_init is None:
        router_init = _default_router_init(init)
    E = num_experts
    if init == "none" or router != "topk" or capacity_factor is not None or not 1 <= k <= E:
        return False
    if init == "noise" and noise_std != 0 or init == "drop" and drop_rate != 0:
        return False
    if init in ("copy", "noise", "drop"):
        # output = (sum of the selected weights) * dense(x)
        return normalize or (score_fn == "softmax" and k == E)
    if init == "split":
        # every expert must be selected with the same weight g0: all of them, under tied logits
        return k == E and router_init == "zeros"
    # granular: the selection must be whole virtual groups and the selected weights must sum to g0 * k
    G = granularity
    if E % G or k % G:
        return False
    if normalize:
        return k == E or router_init in ("random", "kmeans")
    if k != E:
        return False
    return score_fn == "softmax" or router_init == "zeros"


def preserves_config(upcycle: UpcycleConfig, moe) -> bool:
    """`preserves` for an `UpcycleConfig` and the `MoEConfig` of the layer it fills."""
    return preserves(upcycle, moe.router, moe.k, moe.num_experts, moe.normalize, score_fn=moe.score_fn,
                     capacity_factor=moe.capacity_factor)
