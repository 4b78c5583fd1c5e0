"""moeify: turn dense PyTorch models into Mixture-of-Experts models."""

from moeify.config import ConfigError, MoEConfig
from moeify.convert import convert, explain_ffns, find_ffns
from moeify.convert_config import ConvertConfig
from moeify.freeze import freeze, unfreeze
from moeify.io import load, save
from moeify.layer import MoELayer, aux_loss
from moeify.report import ConversionReport, conversion_report
from moeify.sharing import share_router
from moeify.stats import RoutingStats, routing_stats
from moeify.thor import ThorLoss, thor_loss
from moeify.passes.match import FFNMatch, Rejection

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ConversionReport", "ConvertConfig", "FFNMatch", "MoEConfig", "MoELayer", "Rejection", "RoutingStats",
    "aux_loss", "conversion_report", "convert", "explain_ffns", "export_onnx", "find_ffns", "load",
    "parallelize", "routing_stats", "save", "share_router", "thor_loss", "ThorLoss", "freeze",
    "unfreeze",
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
