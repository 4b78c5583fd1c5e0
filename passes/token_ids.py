"""Wire the model's token ids to its MoE layers, for routers that hash token ids (`hash`, and `random`
at inference with its hash rule).

Hash Layers route each token by its *id*; an MoELayer deep inside a model only sees hidden states. When
the model's forward takes `input_ids` and every converted layer sees one position per input token, two
forward pre-hooks carry the ids there:

- on the model: remember this call's `input_ids` (on the model object itself);
- on each MoE layer: pass them as `token_ids` when the layer's input has exactly their shape
  ([B, S, D] against [B, S]); otherwise (a pooled or resampled sequence) pass nothing, and the router
  hashes a fixed projection of the hidden state as it does without ids.

With a KV cache, `generate` calls the model with only the new tokens, which are also the only positions
the layers see, so ids and positions stay aligned. Encoder-decoder models are not wired: their decoder
layers see `decoder_input_ids`, not `input_ids`.

The hooks are module-level functions and find their state through the modules they are attached to, so
a deep copy of the model carries working hooks of its own.
"""

from __future__ import annotations

import inspect

from torch import nn

IDS_ATTR = "_moeify_token_ids"
ROOT_ATTR = "_moeify_ids_root"
HASHING_ROUTERS = ("hash", "random")


def _remember_ids(model: nn.Module, args: tuple, kwargs: dict):
    ids = kwargs.get("input_ids", args[0] if args else None)
    object.__setattr__(model, IDS_ATTR, ids)  # a plain attribute, not a buffer: never saved


def _give_ids(layer: nn.Module, args: tuple, kwargs: dict):
    if kwargs.get("token_ids") is not None or len(args) > 1:
        return None
    ids = getattr(layer.__dict__.get(ROOT_ATTR), IDS_ATTR, None)
    x = args[0] if args else kwargs.get("x")
    if ids is None or x is None or tuple(x.shape[:-1]) != tuple(ids.shape):
        return None
    return args, {**kwargs, "token_ids": ids}


def wire_token_ids(model: nn.Module, layers: list[nn.Module]) -> str:
    """Install the hooks when the model can give ids to `layers`; returns a line for the report."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_ids" not in params:
        return (
            "token ids: not wired (the model's forward takes no input_ids); the router hashes hidden states"
        )
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "token ids: not wired (encoder-decoder model); the router hashes hidden states"
    model.register_forward_pre_hook(_remember_ids, with_kwargs=True)
    for layer in layers:
        layer.__dict__[ROOT_ATTR] = model  # unregistered back-reference: not a submodule, not saved
        layer.register_forward_pre_hook(_give_ids, with_kwargs=True)
    return f"token ids: wired from input_ids to {len(layers)} layers"
