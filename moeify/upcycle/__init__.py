"""Upcycling: fill an MoE layer's experts and router from a dense FFN's weights.

Interface (stable; strategies are added behind it):
- `DenseFFNWeights`: a dense FFN in moeify's conventions, extracted by the passes from whatever module
  held it (nn.Linear, HF Conv1D, F.linear on parameters, ...).
- `UpcycleConfig`: which strategy and its options (frozen, validated, JSON-able).
- `expert_d_ff(cfg, dense_d_ff, num_experts)`: the hidden width each expert gets under the strategy
  (copy-like strategies keep d_ff; split gives d_ff / E; granular d_ff / G).
- `upcycle_layer(layer, dense, cfg, calibration=None)`: fills `layer` in place (returns an `UpcycleResult`).
  `upcycle_layer_lazily(...)`: the same, but the experts come back one at a time (`ExpertTensors`) instead
  of being filled (what streaming conversion writes from). Each strategy is `EXPERT_PLANS[init]`: its
  experts made one at a time, expert order; `upcycle_layer` copies them into the layer.
- `PRESERVATION`, `preserves(...)`, `preserves_config(upcycle, moe)`: which strategies reproduce the dense
  FFN exactly at init, under which router / k / normalisation.

One file per strategy: copying.py (copy), noise.py, drop.py, split.py, granular.py; router_init.py for
the router, kmeans.py for the clustering both use.
"""

from moeify.upcycle._common import ExpertTensors, UpcycleResult
from moeify.upcycle.config import (
    INITS,
    ROUTER_INITS,
    SPLIT_METHODS,
    DenseFFNWeights,
    UpcycleConfig,
    UpcycleError,
)
from moeify.upcycle.preservation import PRESERVATION, preserves, preserves_config
from moeify.upcycle.strategies import (
    EXPERT_PLANS,
    STRATEGIES,
    expert_d_ff,
    upcycle_layer,
    upcycle_layer_lazily,
)

__all__ = [
    "EXPERT_PLANS",
    "INITS",
    "PRESERVATION",
    "ROUTER_INITS",
    "SPLIT_METHODS",
    "STRATEGIES",
    "DenseFFNWeights",
    "ExpertTensors",
    "UpcycleConfig",
    "UpcycleError",
    "UpcycleResult",
    "expert_d_ff",
    "preserves",
    "preserves_config",
    "upcycle_layer",
    "upcycle_layer_lazily",
]
