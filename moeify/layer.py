"""`MoELayer`: router + stacked experts (+ optional always-on shared experts).

Shape legend: T tokens (all leading dims flattened), D d_model, H d_ff per expert, H1 = 2H when gated
else H, E experts, N assignments.

Expert weights are stacked tensors in the layout ONNX Runtime's MoE op takes:
  w1 [E, H1, D] (first projection; gated: rows [0, H) are the gate, [H, 2H) the up projection)
  w2 [E, D, H]  (down projection)
With `expert_param="mpo"` (MPOE) they are not stored: `mpo` (`MPOExperts`) holds their MPO tensors and
`expert_weights()` contracts them into these stacks once per forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeify.activations import CUSTOM, Activation
from moeify.config import ConfigError, MoEConfig
from moeify.dense_ffn import DenseFFN
from moeify.deprecation import moved
from moeify.dispatch import grouped_ffn, soft_experts
from moeify.lowering.context import export_target
from moeify.mpo_experts import MPOExperts
from moeify.routers import Router, build_router
from moeify.routing import Routing, SoftRouting
from moeify.stats import RoutingStats

Tensor = torch.Tensor


class MoELayer(nn.Module):
    """A drop-in replacement for a feed-forward block: x [..., D] -> [..., D].

    After each forward (outside export), `last_aux_loss` holds the sum of the router's auxiliary losses
    (with gradient) and `last_stats` the routing statistics; `moeify.aux_loss(model)` sums the former over
    the model.

    Args:
        config: the layer's `MoEConfig`.
        router: an existing router to share (Omni-router: one router for several layers); it must have
            been built for the same d_model and expert count. Default: a new router from the config.
        causal: True when the layer sits in a causal decoder; routers that mix tokens (expert choice, soft,
            balanced, top-k with a capacity factor) are refused there since they let a token's output depend
            on later tokens.
        init_experts: False leaves the expert weights w1 and w2 uninitialised (`torch.empty`), for a caller
            that overwrites them next, as upcycling does: their random init was most of conversion time.
        activation: the experts' activation as a module (squared ReLU, nn.PReLU, ...), applied elementwise
            (gated: act(gate) * up); `config.activation` must then be "custom". It is a submodule, so its
            parameters train and are saved with the layer's state_dict. The experts run a pure-torch path
            (the fast kernel knows activations by name) and export as standard ONNX ops.
    """

    def __init__(self, config: MoEConfig, router: Router | None = None, causal: bool = False, *,
                 init_experts: bool = True, activation: nn.Module | None = None):
        super().__init__()
        if (activation is not None) != (config.activation == CUSTOM):
            raise ConfigError(
                f'activation="{CUSTOM}" needs the module: MoELayer(config, activation=module)'
                if activation is None else
                f'MoELayer got an activation module, so config.activation must be "{CUSTOM}", '
                f"not {config.activation!r}")
        self.config = config
        self.activation = activation
        self.router = router if router is not None else build_router(config)
        if router is not None and (router.config.d_model != config.d_model
                                   or router.config.num_experts != config.num_experts):
            raise ConfigError("a shared router must have the layer's d_model and num_experts")
        if causal and self.router.caps.mixes_tokens:
            raise ConfigError(
                f"router {self.router.name!r} mixes information across tokens and would break causality in "
                "a causal decoder; use a token-choice router there (topk without capacity_factor, hash, "
                "random)"
            )
        self.causal = causal
        E, D, H = config.num_experts, config.d_model, config.d_ff
        H1 = config.expert_in_width
        if config.expert_param == "mpo":
            self.mpo = MPOExperts(config, init=init_experts)  # w1, w2 as MPOs sharing their central tensors
        else:
            self.w1 = nn.Parameter(torch.empty(E, H1, D))  # [E, H1, D]
            self.w2 = nn.Parameter(torch.empty(E, D, H))  # [E, D, H]
            if init_experts:
                nn.init.normal_(self.w1, std=1.0 / math.sqrt(D))
                nn.init.normal_(self.w2, std=1.0 / math.sqrt(H))
        self.b1 = nn.Parameter(torch.zeros(E, H1)) if config.bias else None  # [E, H1]
        self.b2 = nn.Parameter(torch.zeros(E, D)) if config.bias else None  # [E, D]
        self.shared = None
        if config.num_shared_experts > 0:
            width = config.num_shared_experts * (config.shared_d_ff or H)
            self.shared = DenseFFN(D, width, self.expert_activation, config.gated, config.bias)
        self.dispatch_impl = "fast"  # "reference" selects the slow reference (tests, debugging)
        # Expert parallelism: when set (by moeify.parallel), it runs the experts (sparse or soft routing):
        # expert_parallel(x [T, D], routing, layer) -> [T, D].
        self.expert_parallel: nn.Module | None = None
        self.last_aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    @property
    def expert_activation(self) -> Activation:
        """What the experts apply: the activation module when given one, else the config's name."""
        return self.activation if self.activation is not None else self.config.activation

    def expert_weights(self) -> tuple[Tensor, Tensor]:
        """The routed experts' stacked weights (w1 [E, H1, D], w2 [E, D, H]): the parameters themselves, or
        with MPO experts the matrices contracted from their tensors (differentiable, made on each call)."""
        if self.config.expert_param == "mpo":
            return self.mpo()
        return self.w1, self.w2

    def __getattr__(self, name: str):
        # An MPO layer has no w1/w2 parameters: say what to read instead of "has no attribute".
        if name in ("w1", "w2") and "mpo" in self.__dict__.get("_modules", {}):
            raise AttributeError(f"this MoELayer stores its experts as MPO tensors (expert_param='mpo'): it has "
                                 f"no {name} parameter; read layer.expert_weights() for the contracted stacks")
        return super().__getattr__(name)

    def forward(self, x: Tensor, token_ids: Tensor | None = None) -> Tensor:
        """x [..., D] -> [..., D]: route, run the routed experts, add the shared experts.

        The same steps run while exporting to ONNX; only the experts step becomes the op of the layer's
        lowering (see `experts`).
        """
        cfg = self.config
        lead = x.shape[:-1]
        if x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoELayer expects last dim {cfg.d_model}, got input of shape {tuple(x.shape)}")
        x2 = x.reshape(-1, cfg.d_model)  # [T, D]
        ids = None if token_ids is None else token_ids.reshape(-1)  # [T]
        routing = self.router(x2, token_ids=ids, **self.routing_groups(lead), **self.expert_keys())
        out = self.experts(x2, routing)  # [T, D]
        if self.shared is not None:
            out = out + self.shared(x2)
        self._record(routing, x2.shape[0])
        return out.reshape(*lead, cfg.d_model)

    def experts(self, x: Tensor, routing: Routing) -> Tensor:
        """x [T, D] and its routing -> the routed experts' output [T, D].

        While `moeify.export_onnx` traces the layer, the op of the layer's lowering (`moeify.lowering`);
        with expert parallelism (training), the parallel experts; else `local_experts`.
        """
        if torch.compiler.is_exporting() and export_target() is not None:
            from moeify.lowering.export import lowered_experts  # the ONNX op chosen for this layer

            return lowered_experts(self, x, routing)
        if self.expert_parallel is not None:
            return self.expert_parallel(x, routing, self)  # [T, D]
        return self.local_experts(x, routing)

    def local_experts(self, x: Tensor, routing: Routing) -> Tensor:
        """The routed experts on this process: x [T, D] -> [T, D]."""
        cfg, act = self.config, self.expert_activation
        dropout = cfg.expert_dropout if self.training else 0.0  # expert dropout (Switch §2.4): training only
        w1, w2 = self.expert_weights()  # [E, H1, D], [E, D, H]
        if isinstance(routing, SoftRouting):
            return soft_experts(x, routing.dispatch, routing.combine, w1, self.b1, w2, self.b2,
                                act, cfg.gated, impl=self.dispatch_impl, dropout=dropout)  # [T, D]
        return grouped_ffn(x, routing.token_idx, routing.expert_idx, routing.weight.to(x.dtype), w1,
                           self.b1, w2, self.b2, act, cfg.gated, impl=self.dispatch_impl,
                           dropout=dropout)  # [T, D]

    def routing_groups(self, lead: tuple[int, ...]) -> dict:
        """Extra router arguments for x of leading dims `lead`: with `soft_groups="sequence"` the router
        gets `groups` = the number of sequences (every leading dim but the last, the sequence dim), since it
        only sees the flattened tokens [T, D]."""
        if self.config.soft_groups != "sequence":
            return {}
        return {"groups": math.prod(lead[:-1]) if len(lead) > 1 else 1}

    def expert_keys(self) -> dict:
        """Extra router arguments for a router tied to the experts (`reads_expert_weights`, Avg-K): this
        layer's first-layer weights `expert_w1` [E, H1, D]."""
        if not self.router.caps.reads_expert_weights:
            return {}
        return {"expert_w1": self.mpo.w1() if self.config.expert_param == "mpo" else self.w1}  # [E, H1, D]

    def _record(self, routing, num_tokens: int) -> None:
        """Keep this forward's aux loss and statistics on the layer (not in any global)."""
        if torch.compiler.is_exporting() or torch.jit.is_tracing():
            return
        losses = list(routing.losses.values())
        self.last_aux_loss = torch.stack(losses).sum() if losses else None
        with torch.no_grad():
            self.last_stats = RoutingStats(  # device tensors: read only when asked (no GPU stall here)
                device_tokens_per_expert=routing.tokens_per_expert(self.num_experts).detach(),
                device_dropped_fraction=routing.dropped_fraction(self.num_experts).detach(),
                num_tokens=num_tokens,
            )

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's aux loss: it is part of that step's autograd graph
        (deepcopy of a non-leaf tensor fails) and means nothing to another copy."""
        state = super().__getstate__()
        return {**state, "last_aux_loss": None}

    def extra_repr(self) -> str:
        c = self.config
        return (f"d_model={c.d_model}, d_ff={c.d_ff}, experts={c.num_experts}, k={c.k}, router={c.router}, "
                f"activation={c.activation}{' (gated)' if c.gated else ''}, bias={c.bias}, "
                f"shared={c.num_shared_experts}"
                + (f", experts as MPO (cores={c.mpo_cores}, bond={c.mpo_bond})" if c.expert_param == "mpo" else ""))


__getattr__ = moved(__name__, {"aux_loss": "moeify.last_forward:aux_loss"})
