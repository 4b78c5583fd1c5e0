"""moeify: turn dense PyTorch models into Mixture-of-Experts models."""

from moeify.config import ConfigError, MoEConfig
from moeify.layer import MoELayer, aux_loss
from moeify.sharing import share_router
from moeify.stats import RoutingStats, routing_stats

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "MoEConfig", "MoELayer", "RoutingStats", "aux_loss", "parallelize", "routing_stats",
    "share_router",
]


def __getattr__(name):
    # Lazy: moeify.parallel imports torch.distributed's DTensor/checkpoint stack (~1 s); only pay on use.
    if name == "parallelize":
        from moeify.parallel import parallelize

        return parallelize
    raise AttributeError(f"module 'moeify' has no attribute {name!r}")
