"""Which strategies reproduce the dense FFN exactly at init, and under which routing.

"Exact" means: for every input, every activation, gated or not, with or without biases, the upcycled
MoELayer's output equals the dense FFN's up to float rounding (the tests hold it to relative error 1e-5).
Claims cover shared experts, whose output projection upcycling zeroes.

Each router class makes its own claim (`Router.preserves_dense(upcycle, moe_config)`): `topk` the ones
`PRESERVATION` states (without a capacity limit: a dropped assignment contributes nothing), `hash` and
`random` exact copies (weights 1/k on k copies sum to 1), the others none. `preserves(...)` and
`preserves_config(upcycle, moe)` ask the router class.

`PRESERVATION` is the human-readable table (README, docs).
"""

from __future__ import annotations

from moeify.config import MoEConfig
from moeify.routers import router_class
from moeify.upcycle.config import INITS, UpcycleConfig

PRESERVATION: dict[str, str] = {
    "copy": ("yes, with normalize=True (any k, score_fn, router_init), or softmax scores with k = E; "
             "under hash and random always (weights 1/k)"),
    "noise": "no (weights move by noise_std relative to their std; noise_std=0 is copy)",
    "drop": "no (round(drop_rate*H) neurons re-drawn per expert; drop_rate=0 is copy)",
    "split": ("yes, with k = E and router_init='zeros' (split's default); any score_fn, normalize "
              "(not with 'avg_k' or router='avg_k': unequal expert weights)"),
    "granular": ("yes, with normalize=True, k a multiple of G and router_init 'random' or 'kmeans' "
                 "(router rows tied per virtual group); or k = E with normalize=True or softmax "
                 "(any router_init but 'avg_k' with G > 1), or sigmoid with router_init='zeros' "
                 "(router_init='avg_k' and router='avg_k' with G = 1: rows tie, exact as copy is)"),
    "none": "not applicable (weights left as they are)",
}

# Option of UpcycleConfig -> the one init that reads it (the config refuses it for the others).
_OWN_OPTION = {"noise_std": "noise", "drop_rate": "drop", "granularity": "granular"}


def preserves(init: str | UpcycleConfig, router: str = "topk", k: int = 2, num_experts: int = 8,
              normalize: bool = True, *, score_fn: str = "softmax", router_init: str | None = None,
              granularity: int = 1, capacity_factor: float | None = None, noise_std: float = 0.01,
              drop_rate: float = 0.5) -> bool:
    """True when `init` reproduces the dense FFN exactly at init under this routing (see `PRESERVATION`).

    `init` may be an `UpcycleConfig`; its router_init, granularity, noise_std and drop_rate then override
    the keyword arguments. router_init None means the strategy's default ("zeros" for split, else random).
    """
    if not isinstance(init, UpcycleConfig):
        if init not in INITS:
            raise ValueError(f"unknown upcycling init {init!r}; valid: {', '.join(INITS)}")
        options = {"noise_std": noise_std, "drop_rate": drop_rate, "granularity": granularity}
        init = UpcycleConfig(init=init, router_init=router_init,
                             **{name: v for name, v in options.items() if _OWN_OPTION[name] == init})
    if not 1 <= k <= num_experts:
        return False
    moe = MoEConfig(d_model=1, d_ff=1, num_experts=num_experts, k=k, router=router, normalize=normalize,
                    score_fn=score_fn, capacity_factor=capacity_factor)
    return preserves_config(init, moe)


def preserves_config(upcycle: UpcycleConfig, moe: MoEConfig) -> bool:
    """`preserves` for an `UpcycleConfig` and the `MoEConfig` of the layer it fills: the router's claim.
    MPO experts are exact copies only at full bond (mpo_bond=None); then the router's claim for "copy"."""
    if moe.expert_param == "mpo" and moe.mpo_bond is not None:
        return False
    return router_class(moe.router).preserves_dense(upcycle, moe)
