"""moeify: turn dense PyTorch models into Mixture-of-Experts models."""

from moeify.config import ConfigError, MoEConfig
from moeify.convert import convert, explain_ffns, find_ffns
from moeify.convert_config import ConvertConfig
from moeify.freeze import freeze, unfreeze
from moeify.io import load, save
from moeify.last_forward import aux_loss, routing_stats
from moeify.layer import MoELayer
from moeify.report import ConversionReport, conversion_report
from moeify.sharing import share_router
from moeify.stats import RoutingStats
from moeify.thor import ThorLoss, thor_loss
from moeify.passes.match import FFNMatch, Rejection
from moeify.version import __version__ as __version__

__all__ = [
    "ConfigError", "ConversionReport", "ConvertConfig", "FFNMatch", "MoEConfig", "MoELayer", "Rejection",
    "RoutingStats", "ThorLoss", "aux_loss", "conversion_report", "convert", "explain_ffns", "export_genai",
    "export_onnx", "find_ffns", "freeze", "load", "parallelize", "routing_stats", "save", "share_router",
    "thor_loss", "unfreeze",
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
    if name == "export_genai":  # ONNX Runtime GenAI folders (the `genai` extra)
        from moeify.genai import export_genai

        return export_genai
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")
