"""Records the analysis hands out: `FFNMatch` (a found FFN), `LinearRef` (where one projection's weights
live), `Rejection` (a candidate that is not converted, and why). All frozen and plain, so `moeify inspect`
can print them and tests can compare them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinearRef:
    """One projection of an FFN, as the model stores it.

    kind: "linear" (nn.Linear, weight [out, in]), "conv1d" (HF Conv1D, weight [in, out]) or "function"
    (`F.linear(x, W, b)` on parameters, W [out, in]). `rows` selects a slice of the output rows when
    one matrix holds two projections (a fused [gate; up] weight).
    """

    kind: str
    module: str | None  # path of the linear-like module; None for F.linear on parameters
    weight: str  # path of the weight parameter from the model root
    bias: str | None  # path of the bias parameter, or None
    in_features: int
    out_features: int
    rows: tuple[int, int] | None = None

    @property
    def transposed(self) -> bool:
        return self.kind == "conv1d"

    @property
    def where(self) -> str:
        return self.module if self.module is not None else self.weight


@dataclass(frozen=True)
class FFNMatch:
    """A feed-forward block found in the model: `down(act(up(x)))` or `down(act(gate(x)) * up(x))`.

    name: the smallest module containing the whole FFN, as `model.named_modules()` spells it ("" for
        the model itself). For BERT that is the layer (the FFN spans `intermediate` and `output`).
    site: where it was traced: the name, plus the method when it was not `forward`.
    rewrite: the surgery `convert` will do: "module" (the module is replaced by an MoELayer),
        "chain" (the down projection becomes the MoELayer, the up projection and activation
        pass-throughs), or "forward" (the traced method is regenerated around an MoELayer).
    causal: the FFN sits in a causal decoder (its MoELayer gets causal=True).
    bias: either projection has a bias (a missing one becomes zeros in the experts).
    """

    name: str
    d_model: int
    d_ff: int
    activation: str
    gated: bool
    bias: bool
    up: LinearRef
    down: LinearRef
    gate: LinearRef | None
    rule: str
    site: str
    rewrite: str
    causal: bool

    @property
    def dense_params(self) -> int:
        """Parameters of the dense FFN (weights and biases of its projections)."""
        h1 = 2 * self.d_ff if self.gated else self.d_ff
        n = h1 * self.d_model + self.d_model * self.d_ff
        refs = [self.up, self.down] + ([self.gate] if self.gate is not None else [])
        n += sum((r.rows[1] - r.rows[0]) if r.rows else r.out_features for r in refs if r.bias is not None)
        return n


@dataclass(frozen=True)
class Rejection:
    """A candidate that looked like an FFN (or a module that could not be looked into), and why not."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name or '<model>'}: {self.reason}"
