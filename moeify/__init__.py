"""moeify: turn dense PyTorch models into Mixture-of-Experts models."""

from moeify.config import ConfigError, MoEConfig
from moeify.layer import MoELayer, aux_loss
from moeify.sharing import share_router
from moeify.stats import RoutingStats, routing_stats

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "MoEConfig", "MoELayer", "RoutingStats", "aux_loss", "export_onnx", "parallelize",
    "routing_stats", "share_router",
]


def __getattr__(name):
    # Lazy: moeify.parallel imports torch.distributed's DTensor/checkpoint stack (~1 s); only pay on use.
    if name == "parallelize":
        from moeify.parallel import parallelize

        return parallelize
    # ONNX export is loaded on first use too: importing moeify does not import onnx / onnxscript.
    if name == "export_onnx":
        from moeify.lowering.export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")
