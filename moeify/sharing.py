"""One router for several MoE layers (Omni-router: the layers share their routing decisions' weights).

`share_router(layers)` points every layer at one router module. PyTorch de-duplicates shared modules, so the
router's parameters appear once in `model.parameters()` (one optimizer entry; the gradients of every layer
that used it accumulate there). `state_dict()` still lists the weight under each layer's path (all naming
the same tensor); `load_state_dict` restores it consistently.
"""

from __future__ import annotations

from collections.abc import Iterable

from moeify.config import ConfigError
from moeify.layer import MoELayer
from moeify.routers import Router


def share_router(layers: Iterable[MoELayer], router: Router | None = None) -> Router:
    """Make every layer in `layers` route with one router; returns that router.

    `router` defaults to the first layer's router. The shared router routes with its own config (k,
    score_fn, capacity, ...); every layer must have its d_model and num_experts. The causal check of
    `MoELayer` applies: a token-mixing router cannot be shared into a causal layer.
    """
    layers = list(layers)
    if not layers:
        raise ConfigError("share_router needs at least one MoELayer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, MoELayer):
            raise ConfigError(f"share_router takes MoELayer modules; item {i} is {type(layer).__name__}")
    shared = layers[0].router if router is None else router
    rc = shared.config
    for layer in layers:
        c = layer.config
        if (c.d_model, c.num_experts) != (rc.d_model, rc.num_experts):
            raise ConfigError(
                f"cannot share a router built for d_model={rc.d_model}, num_experts={rc.num_experts} with a "
                f"layer of d_model={c.d_model}, num_experts={c.num_experts}"
            )
        if layer.causal and shared.caps.mixes_tokens:
            raise ConfigError(f"router {shared.name!r} mixes information across tokens; it cannot be shared "
                              "into a causal layer")
    for layer in layers:
        layer.router = shared
    return shared
