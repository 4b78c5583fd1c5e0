"""`ConversionReport`: what `convert` did, in numbers, attached to the converted model.

Parameter counts are over unique parameters (a shared layer counts once). "Active per token" is every
parameter except the experts a token does not run: a token-choice router runs k of E experts per
token, so each MoE layer contributes router + shared experts + k experts; the rest of the model is
dense and fully active. (Soft MoE runs every expert on its slots: E; balanced is top-1: 1; expert choice
runs cf*k experts per token on average.)

`config` is the `ConvertConfig` used, with the converted FFNs as its selection and their expert widths:
`convert(fresh_model, report.config.replace(init="none"))` gives a model whose `state_dict` has the same keys
and shapes, so the converted weights load into it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

from torch import nn

from moeify.errors import MoeifyError

if TYPE_CHECKING:
    from moeify.convert_config import ConvertConfig

REPORT_ATTR = "_moeify_report"


@dataclass(frozen=True)
class MPOReport:
    """MPO experts (expert_param="mpo"): where their parameters are and how exact the decomposition is.

    Expert weights = `central` + num_experts * `aux_per_expert` (over w1 and w2: for each matrix
    |G_c| + E * sum_{k != c} |G_k|, |G_k| = r_{k-1} o_k i_k r_k), biases E * (H1 + D) beside them.
    """

    cores: int
    bond: int | None  # the cap; None = full bond
    central: int  # shared central tensors of w1 and w2
    aux_per_expert: int  # one expert's auxiliary tensors of w1 and w2
    truncation_error: tuple[float, float] | None  # ||W - MPO(W)||_F / ||W||_F for w1, w2 (None: not upcycled)

    def formula(self, num_experts: int) -> str:
        return (f"{self.central:,} + {num_experts} x {self.aux_per_expert:,} = "
                f"{self.central + num_experts * self.aux_per_expert:,}")


@dataclass(frozen=True)
class FFNReport:
    name: str
    d_model: int
    d_ff: int  # the dense FFN's hidden width
    expert_d_ff: int  # each expert's hidden width
    activation: str
    gated: bool
    num_experts: int
    k: int
    router: str
    causal: bool
    rewrite: str  # "module" | "chain" | "forward" (see passes/plan.py)
    params_before: int  # the dense FFN's weights and biases
    params_after: int  # the MoE layer's (experts, router, shared experts)
    active_params_per_token: int  # router + shared + k experts
    mpo: MPOReport | None = None  # MPO experts only


@dataclass(frozen=True)
class ConversionReport:
    ffns: tuple[FFNReport, ...]
    found: int  # FFNs found (before selection)
    params_before: int  # whole model
    params_after: int
    active_params_per_token: int
    config: ConvertConfig  # the options used; selection = the converted FFNs, expert_d_ff = their widths
    converted: tuple[str, ...]  # names (module paths) of the converted FFNs
    passes: tuple[str, ...]  # one count line per pass

    @property
    def summary(self) -> str:
        return f"{len(self.ffns)}/{self.found} FFNs converted"

    @property
    def options(self) -> dict:
        """`config` as JSON-able keyword arguments of convert, without init (and version):
        `convert(fresh_model, **report.options, init="none")` rebuilds the structure."""
        return {k: v for k, v in self.config.to_dict().items() if k not in ("init", "version")}

    @property
    def init(self) -> str | dict:
        """The init used: its name when `config.init` is that strategy with default options, else its dict."""
        ucfg = self.config.init
        plain = type(ucfg)(init=ucfg.init, seed=self.config.seed)
        return ucfg.init if ucfg == plain else ucfg.to_dict()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["ffns"] = [asdict(f) for f in self.ffns]
        d["config"] = self.config.to_dict()
        d["converted"] = list(self.converted)
        d["passes"] = list(self.passes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def __str__(self) -> str:
        lines = [self.summary, *self.passes]
        lines.append(
            f"{'FFN':<44} {'D':>6} {'H':>6} {'H/exp':>6} {'act':<11} {'E':>3} {'k':>2} "
            f"{'before':>10} {'after':>10} {'active':>10}"
        )
        for f in self.ffns:
            act = f.activation + ("*" if f.gated else "")
            lines.append(
                f"{(f.name or '<model>')[:44]:<44} {f.d_model:>6} {f.d_ff:>6} {f.expert_d_ff:>6} {act:<11} "
                f"{f.num_experts:>3} {f.k:>2} {f.params_before:>10,} {f.params_after:>10,} "
                f"{f.active_params_per_token:>10,}"
            )
        for f in self.ffns:
            if f.mpo is not None:
                err = ("not upcycled" if f.mpo.truncation_error is None else
                       "truncation error w1 {:.2e}, w2 {:.2e}".format(*f.mpo.truncation_error))
                lines.append(f"  {f.name or '<model>'}: MPO experts (cores={f.mpo.cores}, bond={f.mpo.bond}): "
                             f"central + E x aux = {f.mpo.formula(f.num_experts)} expert weights; {err}")
        lines.append(
            f"model: {self.params_before:,} -> {self.params_after:,} parameters, "
            f"{self.active_params_per_token:,} active per token  (* = gated)"
        )
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> ConversionReport:
    """The report `moeify.convert` attached to `model`."""
    report = getattr(model, REPORT_ATTR, None)
    if report is None:
        raise MoeifyError(
            f"this {type(model).__name__} was not converted by moeify.convert (no report attached); "
            "convert it with moeify.convert(model, ...) first"
        )
    return report


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
