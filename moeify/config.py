"""`MoEConfig`: the one frozen description of an MoE layer.

Everything a layer needs to be rebuilt lives here, so a config written as JSON next to the weights
rebuilds the same layer. Validation happens in `__post_init__` and raises `ConfigError` with a message a
user can act on (what is wrong, what the valid values are).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from moeify.activations import ACTIVATIONS
from moeify.errors import MoeifyError

CONFIG_VERSION = 1

# Router names are validated against the registry lazily (routers import this module).
SCORE_FUNCTIONS = ("softmax", "sigmoid")
RANDOM_EVAL_RULES = ("hash", "mean")


class ConfigError(MoeifyError, ValueError):
    """A configuration value is invalid; the message says which and what to use instead."""


@dataclass(frozen=True)
class MoEConfig:
    """Shape, routing and losses of one MoE layer.

    Shapes: `d_model` is the model width D, `d_ff` the hidden width H of *each* expert.
    A gated expert computes `down(act(gate(x)) * up(x))` (SwiGLU when activation="silu",
    GeGLU when activation="gelu"); a plain one `down(act(up(x)))`.
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    k: int = 2
    router: str = "topk"
    activation: str = "gelu"
    gated: bool = False
    bias: bool = True
    # --- token-choice routing
    score_fn: str = "softmax"  # softmax over experts, or an independent sigmoid per expert
    normalize: bool = True  # renormalise the k selected weights to sum to 1 (Mixtral); keeps copies exact
    capacity_factor: float | None = None  # None = dropless; else capacity = ceil(cf * T * k / E) per expert
    jitter_noise: float = 0.0  # multiplicative uniform noise on router input in training (Switch)
    # --- other routers
    slots_per_expert: int = 1  # soft MoE
    sinkhorn_iters: int = 8  # balanced (BASE / Sinkhorn)
    random_eval_rule: str = "hash"  # random router at inference: "hash" (fixed expert per token) or "mean"
    hash_seed: int = 0
    # --- shared experts (DeepSeekMoE): always on, summed with the routed output
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # hidden width of each shared expert (default d_ff)
    # --- losses
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_dtype: str = "float32"  # router math runs in this dtype whatever the model dtype
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        from moeify.routers import ROUTERS  # late: routers import config

        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        for name in ("d_model", "d_ff", "num_experts"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        need(
            isinstance(self.k, int) and 1 <= self.k <= self.num_experts,
            f"k must satisfy 1 <= k <= num_experts ({self.num_experts}), got k={self.k!r}",
        )
        need(
            self.router in ROUTERS,
            f"unknown router {self.router!r}; valid routers: {', '.join(sorted(ROUTERS))}",
        )
        need(
            self.activation in ACTIVATIONS,
            f"unknown activation {self.activation!r}; valid activations: {', '.join(sorted(ACTIVATIONS))}",
        )
        need(
            self.score_fn in SCORE_FUNCTIONS,
            f"unknown score_fn {self.score_fn!r}; valid: {', '.join(SCORE_FUNCTIONS)}",
        )
        need(
            self.capacity_factor is None or (isinstance(self.capacity_factor, (int, float))
                                              and self.capacity_factor > 0),
            f"capacity_factor must be > 0 (or None for dropless routing), got {self.capacity_factor!r}",
        )
        need(self.jitter_noise >= 0, f"jitter_noise must be >= 0, got {self.jitter_noise!r}")
        need(self.slots_per_expert >= 1, f"slots_per_expert must be >= 1, got {self.slots_per_expert!r}")
        need(self.sinkhorn_iters >= 1, f"sinkhorn_iters must be >= 1, got {self.sinkhorn_iters!r}")
        need(
            self.random_eval_rule in RANDOM_EVAL_RULES,
            f"unknown random_eval_rule {self.random_eval_rule!r}; valid: {', '.join(RANDOM_EVAL_RULES)}",
        )
        need(self.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {self.num_shared_experts}")
        need(
            self.shared_d_ff is None or self.shared_d_ff >= 1,
            f"shared_d_ff must be >= 1 (or None for d_ff), got {self.shared_d_ff!r}",
        )
        need(self.aux_loss_coef >= 0, f"aux_loss_coef must be >= 0, got {self.aux_loss_coef!r}")
        need(self.z_loss_coef >= 0, f"z_loss_coef must be >= 0, got {self.z_loss_coef!r}")
        need(
            self.router_dtype in ("float32", "float64"),
            f"router_dtype must be 'float32' or 'float64', got {self.router_dtype!r}",
        )
        need(
            self.version == CONFIG_VERSION,
            f"config version {self.version} is not supported by this moeify (expects {CONFIG_VERSION}); "
            "upgrade moeify or re-create the config",
        )

    # --- derived values
    @property
    def expert_in_width(self) -> int:
        """Rows of the first expert matrix: 2H for gated experts ([gate; up] stacked), else H."""
        return 2 * self.d_ff if self.gated else self.d_ff

    def replace(self, **changes) -> MoEConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # --- serialisation
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> MoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown MoEConfig field(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        return cls.from_dict(json.loads(text))
