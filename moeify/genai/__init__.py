"""Serve a converted decoder with ONNX Runtime GenAI: `export_genai` writes the folder, `generate` runs it.

Needs the `genai` extra (onnxruntime-genai-cuda on Linux x86-64, onnxruntime-genai elsewhere, and onnx-ir for
the builder); importing this package does not import them.
"""

from moeify.genai.export import export_genai

__all__ = ["export_genai"]
