"""`MoEConfig`: the one frozen description of an MoE layer.

Everything a layer needs to be rebuilt lives here, so a config written as JSON next to the weights
rebuilds the same layer. Validation happens in `__post_init__` and raises `ConfigError` with a message a
user can act on (what is wrong, what the valid values are).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moeify.activations import ACTIVATIONS, CUSTOM
from moeify.errors import ConfigError
from moeify.json_config import JsonConfig
from moeify.routers import router_class

CONFIG_VERSION = 1

# Router names are checked against the router registry when a config is made, so a router registered
# later (`moeify.routers.register_router`, from any package) is accepted from then on.
SCORE_FUNCTIONS = ("softmax", "sigmoid")
RANDOM_EVAL_RULES = ("hash", "mean")
SOFT_GROUPS = ("batch", "sequence")
EXPERT_PARAMS = ("dense", "mpo")


@dataclass(frozen=True)
class MoEConfig(JsonConfig):
    """Shape, routing and losses of one MoE layer.

    Shapes: `d_model` is the model width D, `d_ff` the hidden width H of *each* expert.
    A gated expert computes `down(act(gate(x)) * up(x))` (SwiGLU when activation="silu",
    GeGLU when activation="gelu"); a plain one `down(act(up(x)))`. activation="custom": the layer is given
    its activation as a module (`MoELayer(config, activation=module)`).
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
    eval_capacity_factor: float | None = None  # in eval mode (ST-MoE: 2.0); None = capacity_factor
    expert_dropout: float = 0.0  # on the experts' hidden activations, in training (Switch: 0.4 to fine-tune)
    # --- other routers
    slots_per_expert: int = 1  # soft MoE
    soft_normalize: bool = False  # soft MoE: L2-normalised tokens and slots, learned scale (paper §2.3)
    soft_groups: str = "batch"  # soft MoE: "batch" (all tokens of a forward) or "sequence" (own slots)
    sinkhorn_iters: int = 8  # balanced (BASE / Sinkhorn)
    random_eval_rule: str = "hash"  # random router at inference: "hash" (fixed expert per token) or "mean"
    hash_seed: int = 0
    hash_vocab_size: int | None = None  # hash/random: a lookup table over ids [0, V) (balanced hash)
    sparsemixer_eps: float = 0.01  # sparsemixer: mask s with (max - s) / max(|s|, max) > 2 eps (Phi-3.5-MoE)
    router_groups: int = 1  # smile: nodes N; node n holds experts [n*E/N, (n+1)*E/N) (node-major)
    # --- shared experts (DeepSeekMoE): always on, summed with the routed output
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # hidden width of each shared expert (default d_ff)
    # --- losses
    aux_loss_coef: float = 0.01  # Switch load-balancing loss
    z_loss_coef: float = 0.001  # ST-MoE router z-loss
    router_dtype: str = "float32"  # router math runs in this dtype whatever the model dtype
    # --- how expert weights are stored (MPOE, Gao et al. 2022: see moeify/mpo_experts.py)
    expert_param: str = "dense"  # "dense": stacked matrices; "mpo": MPOs sharing one central tensor
    mpo_cores: int = 3  # tensors per MPO (odd; the middle one is the shared central tensor; the paper: 5)
    mpo_bond: int | None = None  # bond dimension cap; None = full bond (exact decomposition)
    mpo_grad_mask: float = 0.0  # probability of dropping each central-tensor gradient entry (paper: p_M)
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        def need(cond: bool, message: str) -> None:
            if not cond:
                raise ConfigError(message)

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return is_int(value) or (isinstance(value, float) and math.isfinite(value))

        def one_of(name: str, valid) -> None:
            value = getattr(self, name)
            need(isinstance(value, str) and value in valid,
                 f"unknown {name} {value!r}; valid: {', '.join(sorted(valid))}")

        for name in ("d_model", "d_ff", "num_experts"):
            value = getattr(self, name)
            need(is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        need(
            is_int(self.k) and 1 <= self.k <= self.num_experts,
            f"k must satisfy 1 <= k <= num_experts ({self.num_experts}), got k={self.k!r}",
        )
        router_class(self.router)  # ConfigError naming the registered routers when unknown
        one_of("activation", (*ACTIVATIONS, CUSTOM))
        for name in ("gated", "bias", "normalize", "soft_normalize"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        one_of("score_fn", SCORE_FUNCTIONS)
        need(
            self.capacity_factor is None or (is_number(self.capacity_factor) and self.capacity_factor > 0),
            f"capacity_factor must be a finite number > 0 (or None for dropless routing), "
            f"got {self.capacity_factor!r}",
        )
        need(self.eval_capacity_factor is None
             or (self.capacity_factor is not None and is_number(self.eval_capacity_factor)
                 and self.eval_capacity_factor > 0),
             f"eval_capacity_factor must be a finite number > 0 and needs a training capacity_factor "
             f"(None: use capacity_factor in eval too), got {self.eval_capacity_factor!r} with "
             f"capacity_factor={self.capacity_factor!r}")
        need(is_number(self.expert_dropout) and 0 <= self.expert_dropout < 1,
             f"expert_dropout must be a number in [0, 1), got {self.expert_dropout!r}")
        for name in ("jitter_noise", "aux_loss_coef", "z_loss_coef", "sparsemixer_eps"):
            value = getattr(self, name)
            need(is_number(value) and value >= 0, f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("slots_per_expert", "sinkhorn_iters", "router_groups"):
            value = getattr(self, name)
            need(is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        one_of("random_eval_rule", RANDOM_EVAL_RULES)
        one_of("soft_groups", SOFT_GROUPS)
        need(is_int(self.hash_seed), f"hash_seed must be an integer, got {self.hash_seed!r}")
        need(self.hash_vocab_size is None or (is_int(self.hash_vocab_size) and self.hash_vocab_size >= 1),
             f"hash_vocab_size must be an integer >= 1 (or None for no lookup table), "
             f"got {self.hash_vocab_size!r}")
        need(is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
             f"num_shared_experts must be an integer >= 0, got {self.num_shared_experts!r}")
        need(
            self.shared_d_ff is None or (is_int(self.shared_d_ff) and self.shared_d_ff >= 1),
            f"shared_d_ff must be an integer >= 1 (or None for d_ff), got {self.shared_d_ff!r}",
        )
        one_of("router_dtype", ("float32", "float64"))
        if self.router_groups > 1:
            self._check_router_groups(need)
        one_of("expert_param", EXPERT_PARAMS)
        need(is_int(self.mpo_cores) and self.mpo_cores >= 3 and self.mpo_cores % 2 == 1,
             f"mpo_cores must be an odd integer >= 3 (the middle tensor is the shared one), "
             f"got {self.mpo_cores!r}")
        need(self.mpo_bond is None or (is_int(self.mpo_bond) and self.mpo_bond >= 1),
             f"mpo_bond must be an integer >= 1 (or None for the full, exact bond), got {self.mpo_bond!r}")
        need(is_number(self.mpo_grad_mask) and 0 <= self.mpo_grad_mask <= 1,
             f"mpo_grad_mask must be a probability in [0, 1], got {self.mpo_grad_mask!r}")
        need(self.expert_param == "mpo"
             or (self.mpo_cores == 3 and self.mpo_bond is None and self.mpo_grad_mask == 0),
             'mpo_cores, mpo_bond and mpo_grad_mask apply to MPO experts only: set expert_param="mpo" '
             "or leave them at their defaults")
        need(
            self.version == CONFIG_VERSION,
            f"config version {self.version!r} is not supported by this moeify (expects {CONFIG_VERSION}); "
            "upgrade moeify or re-create the config",
        )

    def _check_router_groups(self, need) -> None:
        """router_groups > 1: the router must route by groups, and each group must hold at least k experts."""
        G, E = self.router_groups, self.num_experts
        need(router_class(self.router).capabilities(self).expert_groups > 1,
             f"router {self.router!r} does not route by expert groups, so router_groups={G} would be "
             "ignored; use router=\"smile\" (bi-level routing) or leave router_groups at 1")
        need(E % G == 0, f"num_experts ({E}) must be divisible by router_groups ({G}): each group (node) "
                         "holds E / router_groups experts")
        need(self.k <= E // G, f"k ({self.k}) must be <= the experts of one group, num_experts / "
                               f"router_groups = {E // G}: a token's experts all lie in the group it chose")

    # --- derived values
    @property
    def expert_in_width(self) -> int:
        """Rows of the first expert matrix: 2H for gated experts ([gate; up] stacked), else H."""
        return 2 * self.d_ff if self.gated else self.d_ff

