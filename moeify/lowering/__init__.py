"""Lowering to ONNX: `export_onnx` and the pieces it uses, organised by ONNX op.

- `context`:  the export target and per-layer plans `MoELayer.experts` reads (light; the layer imports it)
- `export`:   `export_onnx` and `ExportResult`; assembles the lowerings: `LOWERINGS` in order of preference,
              `plan_for` (the first eligible one the router declares), `lowered_experts` (the layer's experts
              step while tracing), schema registration, the translation table, attaching/inlining bodies
- `inputs`:   example inputs: normalising them, dynamic batch/sequence axes, `hf_example_inputs`
- `ops/`:     one file per lowering, each with its eligibility check (with a reason), export-only torch op,
              translation (onnxscript), schema and function body (see `moeify.lowering.ops`):
  - `ops/base`:         the `Lowering` protocol and the `Plan` of one layer
  - `ops/ort_moe`:      com.microsoft.MoE (ONNX Runtime's fused kernel, with the onnxruntime probe)
  - `ops/grouped_ffn`:  moeify.GroupedFFN (sparse dispatch)
  - `ops/soft_experts`: moeify.SoftExperts (Soft MoE)
  - `ops/portable`:     the portable (standard-op) bodies' shared pieces and the moeify ops' schema pieces
  - `ops/traced`:       standard ops traced from PyTorch, for activations given as modules

Attributes are loaded lazily so that importing the layer does not import onnx.
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("export_onnx", "ExportResult", "hf_example_inputs"):
        from moeify.lowering import export

        return getattr(export, name)
    raise AttributeError(f"module 'moeify.lowering' has no attribute {name!r}")


__all__ = ["ExportResult", "export_onnx", "hf_example_inputs"]
