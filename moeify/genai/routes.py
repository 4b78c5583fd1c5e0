"""Which way `export_genai` writes a model's GenAI folder.

- "builder": ONNX Runtime GenAI's builder on the dense skeleton, then MLP surgery (moeify.genai.surgery):
  the builder's fused attention and int4/int8 linears, for the architectures it knows and surgery
  recognises (skeleton.BUILDER_ARCHITECTURES).
- "own": moeify's export with explicit past/present KV (moeify.genai.own_route): any transformers causal LM
  whose forward takes a DynamicCache of full-attention layers; fp32/fp16, and int8/int4 by quantising its
  fp32 graph (moeify.genai.own_quant).

"auto" takes the builder route where it can (a known architecture whose every MoE layer surgery can place)
and the own route elsewhere; a model neither takes gets one line with both reasons.
"""

from __future__ import annotations

import logging

from torch import nn

from moeify.errors import MoeifyError
from moeify.genai.kv_cache import CacheShape
from moeify.genai.own_route import own_route_check
from moeify.genai.skeleton import BUILDER_ARCHITECTURES, builder_refusal

ROUTES = ("auto", "builder", "own")
log = logging.getLogger(__name__)


def choose_route(model: nn.Module, route: str = "auto") -> tuple[str, CacheShape | None]:
    """("builder", None) or ("own", the cache shape) for `model` (in eval mode); MoeifyError saying why
    neither (or the asked route) takes it."""
    if route not in ROUTES:
        raise MoeifyError(f"unknown GenAI route {route!r}; valid: {', '.join(ROUTES)}")
    from moeify.layer import MoELayer

    name = type(model).__name__
    if not any(isinstance(m, MoELayer) for m in model.modules()):
        raise MoeifyError(
            f"{name} has no MoE layer; convert it first (moeify convert), or use the onnxruntime_genai "
            "builder on the dense model directly"
        )
    builder_why = builder_refusal(model) if route != "own" else None
    if route == "builder" and builder_why is not None:
        raise MoeifyError(f"--genai: {builder_why}")
    if route == "builder" or (route == "auto" and builder_why is None):
        return "builder", None
    shape, own_why = own_route_check(model)
    if shape is not None:
        if route == "auto" and name in BUILDER_ARCHITECTURES:
            log.info(
                "--genai: the builder route cannot take this %s (%s): moeify's own KV-cache export",
                name,
                builder_why,
            )
        return "own", shape
    if route == "own":
        raise MoeifyError(f"--genai: moeify's own KV-cache export cannot take {name}: {own_why}")
    raise MoeifyError(
        f"--genai: no route takes {name}: {builder_why}; and moeify's own KV-cache export: {own_why}"
    )
