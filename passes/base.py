"""What a pass is, and how passes run one after another.

A pass is a small object holding its inputs, with `run(model) -> result`. It declares its promise as
attributes (optimum's Transformation is the model), and tests/passes/test_pass_promises.py holds every
pass in `moeify.passes.PASSES` to what it declares:

- `modifies_model`: False for analysis passes (capture, analyse, select, calibrate): parameters,
  buffers, the module tree and every module's training flag are the same after the pass as before;
- `preserves_computation`: the model computes what it did (in eval mode, within float rounding). Always
  True for analysis passes; for rewrite it depends on the layers it puts in (see `Rewrite`).

A result is a small frozen dataclass with the counts and a one-line `summary`, which convert's report
collects ("rewrite: 12/12 FFNs converted (8 module, 4 chain)").
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from moeify.errors import MoeifyError


@runtime_checkable
class PassResult(Protocol):
    @property
    def summary(self) -> str: ...


@runtime_checkable
class Pass(Protocol):
    name: str
    modifies_model: bool
    preserves_computation: bool

    def run(self, model: nn.Module) -> PassResult: ...


class PassFailed(RuntimeError):
    """A pass failed for a reason that is not the user's (a bug, or a model the pass cannot handle)."""

    def __init__(self, name: str, before: tuple[str, ...], exc: BaseException):
        self.pass_name, self.before = name, before
        ran = ", ".join(before) or "nothing"
        super().__init__(f"moeify pass {name!r} failed (ran before it: {ran}): {exc}")


class PassRunner:
    """Runs passes in order on one model and keeps their results; a failing pass names itself and the
    passes that ran before it (a `MoeifyError`, the user's to fix, goes through unchanged)."""

    def __init__(self) -> None:
        self.results: list[tuple[str, PassResult]] = []

    @property
    def done(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.results)

    @property
    def summaries(self) -> tuple[str, ...]:
        return tuple(result.summary for _, result in self.results)

    def run(self, p: Pass, model: nn.Module):
        try:
            result = p.run(model)
        except MoeifyError:
            raise
        except Exception as exc:
            raise PassFailed(p.name, self.done, exc) from exc
        self.results.append((p.name, result))
        return result
