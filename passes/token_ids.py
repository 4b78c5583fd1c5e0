"""Wire the model's token ids to its MoE layers, for routers that read token ids (`reads_token_ids` in
their capabilities: `hash`, and `random` at inference with its hash rule).

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
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

IDS_ATTR = "_moeify_token_ids"
ROOT_ATTR = "_moeify_ids_root"


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


def reads_token_ids(layer: nn.Module) -> bool:
    """Whether `layer`'s router routes on token ids when given them (its capabilities say so): the layers
    to give to `WireTokenIds`."""
    return layer.router.caps.reads_token_ids


def _why_not_wired(model: nn.Module) -> str | None:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "input_ids" not in params:
        return "the model's forward takes no input_ids"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "encoder-decoder model"
    return None


@dataclass(frozen=True)
class TokenIdsResult:
    wired: int  # layers that get the ids
    why_not: str | None = None  # why nothing was wired

    @property
    def summary(self) -> str:
        if self.why_not is not None:
            return f"token ids: not wired ({self.why_not}); the router hashes hidden states"
        return f"token ids: wired from input_ids to {self.wired} layers"


@dataclass(frozen=True)
class WireTokenIds:
    """The token-ids pass: install the hooks when the model can give ids to `layers`.

    It changes the model (forward pre-hooks; parameters, buffers and the module tree stay) and what a
    router that reads token ids computes, so it does not claim to preserve the computation.
    """

    name: ClassVar[str] = "token_ids"
    modifies_model: ClassVar[bool] = True
    preserves_computation: ClassVar[bool] = False
    layers: tuple[nn.Module, ...]

    def run(self, model: nn.Module) -> TokenIdsResult:
        why_not = _why_not_wired(model)
        if why_not is not None:
            return TokenIdsResult(0, why_not)
        model.register_forward_pre_hook(_remember_ids, with_kwargs=True)
        for layer in self.layers:
            layer.__dict__[ROOT_ATTR] = model  # unregistered back-reference: not a submodule, not saved
            layer.register_forward_pre_hook(_give_ids, with_kwargs=True)
        return TokenIdsResult(len(self.layers))

