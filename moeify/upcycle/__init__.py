"""Upcycling: fill an MoE layer's experts and router from a dense FFN's weights.

Interface (stable; strategies are added behind it):
- `DenseFFNWeights`: a dense FFN in moeify's conventions, extracted by the passes from whatever module
  held it (nn.Linear, HF Conv1D, F.linear on parameters, ...).
- `UpcycleConfig`: which strategy and its options (frozen, validated, JSON-able).
- `expert_d_ff(cfg, dense_d_ff, num_experts)`: the hidden width each expert gets under the strategy
  (copy-like strategies keep d_ff; split gives d_ff / E; granular d_ff / G).
- `upcycle_layer(layer, dense, cfg, calibration=None)`: fills `layer` in place.
"""

from moeify.upcycle.strategies import DenseFFNWeights, UpcycleConfig, expert_d_ff, upcycle_layer

__all__ = ["DenseFFNWeights", "UpcycleConfig", "expert_d_ff", "upcycle_layer"]
