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
"""

from moeify.routers import balanced, expert_choice, hash, random, soft, sparsemixer, topk  # noqa: F401  (registers)
from moeify.routers.balanced_hash import balanced_hash_table, set_hash_table
from moeify.routers.base import Router, RouterCapabilities
from moeify.routers.registry import ROUTERS, register_router


def build_router(config) -> Router:
    """The router named by `config.router`, built for `config`."""
    return ROUTERS[config.router](config)


__all__ = ["ROUTERS", "Router", "RouterCapabilities", "balanced_hash_table", "build_router",
           "register_router", "set_hash_table"]
