"""moeify: turn dense PyTorch models into Mixture-of-Experts models."""

from moeify.config import ConfigError, MoEConfig
from moeify.layer import MoELayer, aux_loss
from moeify.stats import RoutingStats, routing_stats

__version__ = "0.1.0"

__all__ = ["ConfigError", "MoEConfig", "MoELayer", "RoutingStats", "aux_loss", "export_onnx", "routing_stats"]


def __getattr__(name: str):
    # ONNX export is loaded on first use: importing moeify does not import onnx / onnxscript.
    if name == "export_onnx":
        from moeify.lowering.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")
