"""Routers by name. Importing this package registers every built-in router."""

from moeify.routers import topk  # noqa: F401  (registers)
from moeify.routers.base import Router
from moeify.routers.registry import ROUTERS, register_router


def build_router(config) -> Router:
    """The router named by `config.router`, built for `config`."""
    return ROUTERS[config.router](config)


__all__ = ["ROUTERS", "Router", "build_router", "register_router"]
