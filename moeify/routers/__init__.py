"""Routers by name. Importing this package registers every built-in router.

| name           | kind          | paper                                   |
| -------------- | ------------- | --------------------------------------- |
| topk           | token choice  | Switch (k=1), GShard / Mixtral (k=2)    |
| expert_choice  | expert choice | Zhou et al. 2022                        |
| hash           | fixed hash    | Roller et al. 2021 (Hash Layers)        |
| soft           | soft slots    | Puigcerver et al. 2023 (Soft MoE)       |
| random         | stochastic    | Zuo et al. 2022 (THOR)                  |
| balanced       | assignment    | Lewis et al. 2021 (BASE), Sinkhorn      |
| sparsemixer    | token choice  | Liu et al. 2023 (SparseMixer), GRIN     |
| avg_k          | token choice  | Liu et al. 2023 (Avg-K), tied to experts |
| smile          | bi-level      | He et al. 2022 (SMILE)                  |

A router written anywhere else subclasses `Router`, declares what it can do (its class attributes, or
`capabilities` / `preserves_dense`), and registers with `@register_router("name")`: convert, training,
save/load and export then take it by name like the built-in ones.
"""

from moeify.routers import (  # noqa: F401
    avg_k,
    balanced,
    expert_choice,
    hash,
    random,
    smile,
    soft,
    sparsemixer,
    topk,
)
from moeify.routers.balanced_hash import balanced_hash_table, set_hash_table
from moeify.routers.base import GROUPED_FFN, ORT_MOE, SOFT_EXPERTS, Router, RouterCapabilities
from moeify.routers.registry import ROUTERS, register_router, router_class, unregister_router


def build_router(config) -> Router:
    """The router named by `config.router`, built for `config`."""
    return router_class(config.router)(config)


__all__ = ["GROUPED_FFN", "ORT_MOE", "ROUTERS", "SOFT_EXPERTS", "Router", "RouterCapabilities",
           "balanced_hash_table", "build_router", "register_router", "router_class", "set_hash_table",
           "unregister_router"]
