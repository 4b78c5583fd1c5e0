"""The FFN rules, tried in this order on every linear-like node. Each is a small module with NAME,
REWRITES, pattern(down, cap) and check(candidate); see common.py for the contract."""

from moeify.passes.rules import fused_gated, gated, plain

RULES = (gated, fused_gated, plain)

__all__ = ["RULES"]
