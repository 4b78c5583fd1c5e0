"""Lowering to ONNX: `export_onnx` and the pieces it uses.

- `context`:   the export target flag `MoELayer.forward` reads (light; imported by the layer)
- `hook`:      the layer's export-time forward (which torch op each layer calls)
- `ops`:       export-only torch custom ops (moeify::topk_moe, moeify::export_soft_experts)
- `fused`:     when a layer may use ONNX Runtime's com.microsoft.MoE (and what that op computes)
- `schemas`:   ONNX schemas of moeify.GroupedFFN / moeify.SoftExperts (+ com.microsoft.MoE)
- `translate`: the torch op -> ONNX node table for torch.onnx.export
- `bodies`:    standard-op function bodies of the moeify ops (sparse capacity-buffer dispatch)
- `functions`: attach the bodies to the exported model, or inline them (portable target)
- `export`:    `export_onnx` itself

Attributes are loaded lazily so that importing the layer does not import onnx.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("export_onnx", "ExportResult", "hf_example_inputs"):
        from moeify.lowering import export

        return getattr(export, name)
    raise AttributeError(f"module 'moeify.lowering' has no attribute {name!r}")


__all__ = ["ExportResult", "export_onnx", "hf_example_inputs"]
