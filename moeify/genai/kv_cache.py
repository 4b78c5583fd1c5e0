"""A transformers causal LM with its KV cache as flat tensors, for an ONNX graph in ONNX Runtime GenAI's
naming.

Shape legend: B batch, S new positions, P past positions, N total positions (P + S), Hk key/value heads,
Dh head size, V vocabulary, L decoder layers.

transformers keeps the cache in a `DynamicCache` object, which is not a tensor an ONNX graph can take. The
wrapper `FlatKVDecoder` takes the 2L past tensors flat (key, value of layer 0, then layer 1, ...), builds the
cache from them, runs the model and returns the logits and the 2L present tensors (past + the new positions).
`probe_cache` runs the model once to learn the cache's shape and says, in one line, why a model does not fit.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CacheShape:
    """What GenAI's config states about the cache: L layers of [B, kv_heads, P, head_size] keys and values."""

    num_layers: int
    kv_heads: int
    head_size: int


def cache_argument(model: nn.Module) -> str | None:
    """The name under which the model's forward takes the cache (`cache` in transformers >= 5.x, formerly
    `past_key_values`), None when it takes none."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def takes_position_ids(model: nn.Module) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


class FlatKVDecoder(nn.Module):
    """forward(input_ids [B, S], attention_mask [B, N], (position_ids [B, S],) past: 2L x [B, Hk, P, Dh])
    -> (logits [B, S, V], present: 2L x [B, Hk, N, Dh])."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model = model
        self.num_layers = num_layers
        self.cache_name = cache_argument(model)
        self.position_ids = takes_position_ids(model)

    def forward(self, input_ids, attention_mask, *rest):
        from transformers import DynamicCache

        position_ids, past = (rest[0], rest[1]) if self.position_ids else (None, rest[0])
        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)])
        extra = {"position_ids": position_ids} if self.position_ids else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **{self.cache_name: cache},
            **extra,
        )
        present = []
        for layer in returned_cache(out).layers:
            present += [layer.keys, layer.values]  # [B, Hk, N, Dh] each
        return (out.logits, *present)


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def probe_cache(model: nn.Module) -> tuple[CacheShape | None, str | None]:
    """(the cache's shape, None), or (None, why a GenAI KV export cannot take the model), from one forward of
    3 tokens with an empty `DynamicCache`."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    name = cache_argument(model)
    if name is None:
        return (
            None,
            f"{type(model).__name__}.forward takes no KV cache (no `cache`/`past_key_values` argument)",
        )
    vocab = model.config.vocab_size
    ids = torch.arange(3, dtype=torch.long).remainder(vocab)[None]  # [1, 3]
    try:
        with torch.no_grad():
            out = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, **{name: DynamicCache()}
            )
        cache = returned_cache(out)
    except Exception as e:  # a model that will not run with a dynamic cache: the reason, one line
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return (
            None,
            f"{type(model).__name__} did not run with a transformers DynamicCache "
            f"({type(e).__name__}: {first})",
        )
    layers = getattr(cache, "layers", None)
    if not layers or getattr(out, "logits", None) is None:
        return None, f"{type(model).__name__} returned no logits and KV cache layers"
    kinds = {type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer}
    if kinds:
        return None, (
            f"its cache has {', '.join(sorted(kinds))} layers (sliding-window or recurrent state); this "
            "export writes full-attention key/value caches only"
        )
    shapes = {tuple(t.shape) for layer in layers for t in (layer.keys, layer.values)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        return (
            None,
            f"its layers cache keys/values of shapes {sorted(shapes)}; GenAI states one "
            "[B, heads, P, head_size]",
        )
    _, kv_heads, _, head_size = shapes.pop()
    return CacheShape(len(layers), kv_heads, head_size), None
