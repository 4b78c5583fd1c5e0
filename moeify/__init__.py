"""moeify: turn dense PyTorch models into Mixture-of-Experts models."""

from moeify.config import ConfigError, MoEConfig
from moeify.convert import convert, explain_ffns, find_ffns  # noqa: E402  (after the layer it builds)
from moeify.layer import MoELayer, aux_loss
from moeify.report import ConversionReport, conversion_report
from moeify.stats import RoutingStats, routing_stats
from passes.match import FFNMatch, Rejection

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "ConversionReport", "FFNMatch", "MoEConfig", "MoELayer", "Rejection", "RoutingStats",
    "aux_loss",
    "conversion_report", "convert", "explain_ffns", "find_ffns", "routing_stats",
]
