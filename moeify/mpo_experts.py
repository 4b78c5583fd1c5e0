"""MPO experts (MPOE): E expert matrices that share one central tensor and keep their own auxiliary tensors.

Gao et al. 2022, "Parameter-Efficient Mixture-of-Experts Architecture for Pre-trained Language Models"
(arXiv 2203.01104). Section "MPO-based MoE architecture": every expert weight matrix is an MPO
(`moeify.mpo`); the experts share the central tensor (the large one, holding the core information) and each
keeps its auxiliary tensors, so E experts cost about one matrix plus E small auxiliaries. Section "gradient
mask strategy": the shared central tensor receives gradient from every expert's tokens while each auxiliary
tensor only from its own, an unbalanced optimisation; the paper masks the central tensor's gradient, each
entry dropped with probability p_M in every backward pass (`GradMask`, `MoEConfig.mpo_grad_mask`).

Dispatch: each forward contracts every expert's tensors into its matrix once ([E, O, I], `expert_matrices`)
and the layer's usual grouped expert path runs on them; `benchmarks/moe_layer.py --mpo` compares it with
contracting each expert's tokens on the fly (`moeify.mpo.apply`): that was 7x slower forward and 8.5x in
training at T=256, E=8, d=512, d_ff=2048 (README, "MPO experts").

Shape legend: E experts, O rows, I columns of one expert matrix, r bond dims.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeify.mpo import MPOShape, contract, decompose, relative_error
from moeify.report import MPOReport

Tensor = torch.Tensor


class GradMask(torch.autograd.Function):
    """Identity forward; backward zeroes each gradient entry with probability p (no rescaling)."""

    @staticmethod
    def forward(ctx, t: Tensor, p: float) -> Tensor:
        ctx.p = p
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        keep = torch.rand_like(grad) >= ctx.p  # [same as grad]
        return grad * keep, None


class MPOWeight(nn.Module):
    """A stack of E matrices [E, O, I] as MPOs sharing the central tensor.

    Parameters: `central` [r_{c-1}, o_c, i_c, r_c] (shared) and `aux` (ParameterList, tensors k != c in
    order), each [E, r_{k-1}, o_k, i_k, r_k]. Count: `shape.params(E)` = |G_c| + E * sum_{k != c} |G_k|.
    """

    def __init__(self, num_experts: int, rows: int, cols: int, cores: int, max_bond: int | None,
                 grad_mask: float = 0.0, *, init: bool = True, std: float = 1.0):
        super().__init__()
        self.layout = MPOShape.for_matrix(rows, cols, cores, max_bond)
        self.num_experts = num_experts
        self.grad_mask = grad_mask
        self.truncation_error: float | None = None  # set by load_dense: ||W - MPO(W)||_F / ||W||_F
        c = self.layout.central
        self.central = nn.Parameter(torch.empty(self.layout.core_shape(c)))  # [r_{c-1}, o_c, i_c, r_c]
        self.aux = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, *self.layout.core_shape(k)))  # [E, r_{k-1}, o_k, i_k, r_k]
            for k in range(self.layout.cores) if k != c)
        if init:
            self.reset_parameters(std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Random tensors whose product has entries of standard deviation `std`: an entry of W is a sum over
        prod(r_k) bond paths of a product of n entries, so each tensor draws with std
        (std^2 / prod(r_k)) ** (1 / 2n)."""
        paths = math.prod(self.layout.bonds)
        each = (std ** 2 / paths) ** (1 / (2 * self.layout.cores))
        for p in self.parameters():
            nn.init.normal_(p, std=each)

    def cores(self) -> list[Tensor]:
        """The n tensors in chain order: the central one [r, o, i, r'] (through the gradient mask while
        training with p_M > 0) among the per-expert ones [E, r, o, i, r']."""
        central = self.central
        if self.grad_mask > 0 and self.training and torch.is_grad_enabled():
            central = GradMask.apply(central, self.grad_mask)
        out = list(self.aux)
        out.insert(self.layout.central, central)
        return out

    def forward(self) -> Tensor:
        """Every expert's matrix: [E, O, I]."""
        return contract(self.cores(), self.layout)

    @torch.no_grad()
    def load_dense(self, w: Tensor) -> float:
        """Start every expert from one dense matrix w [O, I]: its MPO's central tensor shared, its auxiliary
        tensors copied into each expert. Returns the relative Frobenius truncation error (0 at full bond,
        up to float rounding)."""
        cores = decompose(w, self.layout)
        c = self.layout.central
        self.central.copy_(cores[c])
        for p, g in zip(self.aux, cores[:c] + cores[c + 1:], strict=True):
            p.copy_(g.unsqueeze(0).expand_as(p))  # [E, r, o, i, r']
        self.truncation_error = relative_error(w, contract(cores, self.layout))
        return self.truncation_error

    def extra_repr(self) -> str:
        s = self.layout
        return (f"experts={self.num_experts}, out={s.out_factors}, in={s.in_factors}, bonds={s.bonds}, "
                f"central={s.central_params}, aux/expert={s.aux_params}, grad_mask={self.grad_mask}")


class MPOExperts(nn.Module):
    """The routed experts' two weight stacks as MPOs: w1 [E, H1, D] and w2 [E, D, H] (see `MoELayer`)."""

    def __init__(self, config, *, init: bool = True):
        super().__init__()
        E, D, H, H1 = config.num_experts, config.d_model, config.d_ff, config.expert_in_width
        mpo = dict(cores=config.mpo_cores, max_bond=config.mpo_bond, grad_mask=config.mpo_grad_mask, init=init)
        self.w1 = MPOWeight(E, H1, D, std=1.0 / math.sqrt(D), **mpo)  # -> [E, H1, D]
        self.w2 = MPOWeight(E, D, H, std=1.0 / math.sqrt(H), **mpo)  # -> [E, D, H]

    def forward(self) -> tuple[Tensor, Tensor]:
        """(w1 [E, H1, D], w2 [E, D, H]), contracted from the tensors (once per call)."""
        return self.w1(), self.w2()


def mpo_shapes(config) -> tuple[MPOShape, MPOShape]:
    """The MPO shapes of w1 ([H1, D] per expert) and w2 ([D, H]) for an MoEConfig with expert_param="mpo"."""
    D, H, H1 = config.d_model, config.d_ff, config.expert_in_width
    return (MPOShape.for_matrix(H1, D, config.mpo_cores, config.mpo_bond),
            MPOShape.for_matrix(D, H, config.mpo_cores, config.mpo_bond))


def mpo_params(config) -> int:
    """The expert weights' parameter count (biases not included): for w1 and w2 each,
    |G_c| + E * sum_{k != c} |G_k| with |G_k| = r_{k-1} o_k i_k r_k."""
    return sum(s.params(config.num_experts) for s in mpo_shapes(config))


def mpo_report(layer) -> MPOReport:
    """The conversion report's MPO line for an MoE layer with MPO experts."""
    cfg, w1, w2 = layer.config, layer.mpo.w1, layer.mpo.w2
    errors = (w1.truncation_error, w2.truncation_error)
    return MPOReport(cores=cfg.mpo_cores, bond=cfg.mpo_bond,
                     central=w1.layout.central_params + w2.layout.central_params,
                     aux_per_expert=w1.layout.aux_params + w2.layout.aux_params,
                     truncation_error=None if None in errors else errors)
