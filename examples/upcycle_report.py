"""Tables and the verdict of the upcycling experiment (examples/upcycle_gpt.py), from its results dict.

The numbers are test-split losses (held-out files never used to choose anything), read off each run's
curve at a budget by linear interpolation between the evaluations around it; every budget step is itself
an evaluation point, so at a FLOP budget the value is measured, not interpolated. Spread over seeds is
min-max: "1.8312 (1.8290-1.8340)" is the mean over seeds and, in brackets, the smallest and largest.

Verdict rule: with gap = mean(dense) - mean(arm) (positive: the arm's loss is lower) and spread = the
larger of the two arms' min-max ranges, an arm BEATS dense continuation when gap > spread, is BEHIND when
gap < -spread, and is otherwise within the seed spread (no difference this experiment can resolve).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from gpt_training import interpolate


@dataclass(frozen=True)
class Spread:
    """One arm's loss at one budget over its seeds."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    @property
    def range(self) -> float:
        return self.hi - self.lo

    def __str__(self) -> str:
        if any(math.isnan(v) for v in self.values):
            return "n/a"
        return f"{self.mean:.4f} ({self.lo:.4f}-{self.hi:.4f})"


def loss_at(arm: dict, column: str, x: float, loss: str = "test_loss") -> Spread:
    """The arm's `loss` over its seeds where its `column` ("flops", "seconds", "tokens") reaches x."""
    return Spread(tuple(interpolate(curve[column], curve[loss], x) for curve in arm["seeds"].values()))


def budgets(results: dict) -> list[tuple[str, float, float]]:
    """(label, extra FLOPs, dense wall seconds at those FLOPs) per budget, smallest first."""
    dense = results["arms"]["dense"]
    curve = next(iter(dense["seeds"].values()))
    out = []
    for fraction, flops in zip(results["budget"]["fractions"], results["budget"]["flops"], strict=True):
        seconds = interpolate(curve["flops"], curve["seconds"], flops)
        out.append((f"{fraction:.3g} x pretraining", flops, seconds))
    return out


def compare(arm: Spread, dense: Spread) -> tuple[str, float, float]:
    """(word, gap, spread) by the verdict rule of the module docstring."""
    gap, spread = dense.mean - arm.mean, max(dense.range, arm.range)
    if math.isnan(gap):
        return "n/a", gap, spread
    if gap > spread:
        return "BEATS", gap, spread
    if gap < -spread:
        return "BEHIND", gap, spread
    return "within spread", gap, spread


def setup_table(results: dict) -> str:
    rows = ["| arm | what | active params/token | total params | FLOPs/token vs dense | ms/step (in turns) "
            "| steps | extra tokens |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    dense_fpt = results["arms"]["dense"]["flops_per_token"]
    for name, arm in results["arms"].items():
        curve = next(iter(arm["seeds"].values()))
        rows.append(f"| {name} | {arm['what']} | {arm['active_params']:,d} | {arm['total_params']:,d} "
                    f"| {arm['flops_per_token'] / dense_fpt:.3f} | {1000 * arm['step_seconds']:.0f} "
                    f"| {curve['step'][-1]:,d} | {curve['tokens'][-1]:,d} |")
    return "\n".join(rows)


def budget_table(results: dict, column: str) -> str:
    """Test loss of every arm at each budget: equal extra FLOPs (column "flops") or equal wall time
    ("seconds", at the time dense continuation needed for that FLOP budget)."""
    marks = budgets(results)
    what = "extra FLOPs" if column == "flops" else "wall time of dense at"
    head = "| arm | loss@0 | " + " | ".join(f"{what} {label}" for label, _, _ in marks) + " |"
    rows = [head, "|---|---:|" + "---:|" * len(marks)]
    dense = results["arms"]["dense"]
    for name, arm in results["arms"].items():
        cells = [str(loss_at(arm, "step", 0))]
        for _, flops, seconds in marks:
            x = flops if column == "flops" else seconds
            mine = loss_at(arm, column, x)
            word, gap, _ = compare(mine, loss_at(dense, column, x))
            note = "" if name == "dense" else f" {gap:+.4f} {word}"
            cells.append(f"{mine}{note}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def seed_table(results: dict) -> str:
    """Every arm and seed: test loss at each FLOP budget."""
    marks = budgets(results)
    rows = ["| arm | seed | loss@0 | " + " | ".join(f"FLOPs {label}" for label, _, _ in marks) + " |",
            "|---|---:|---:|" + "---:|" * len(marks)]
    for name, arm in results["arms"].items():
        for seed, curve in arm["seeds"].items():
            cells = [f"{curve['test_loss'][0]:.4f}"]
            cells += [f"{interpolate(curve['flops'], curve['test_loss'], f):.4f}" for _, f, _ in marks]
            rows.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _where(found: list[tuple[str, str, float, float]], word: str) -> str:
    """The budget labels at which the comparison said `word`, comma-separated ("" when none)."""
    return ", ".join(label for label, w, _, _ in found if w == word)


def verdict(results: dict) -> list[str]:
    """Plain sentences: per arm, at which budgets it beats dense continuation by more than the seed spread."""
    dense = results["arms"]["dense"]
    lines = []
    for column, axis in (("flops", "equal extra FLOPs"), ("seconds", "equal wall time")):
        lines.append(f"At {axis} (test split; spread = min-max over {results['config']['seeds']} seeds):")
        winners = []
        for name, arm in results["arms"].items():
            if name == "dense":
                continue
            found = []
            for label, flops, seconds in budgets(results):
                x = flops if column == "flops" else seconds
                word, gap, spread = compare(loss_at(arm, column, x), loss_at(dense, column, x))
                found.append((label, word, gap, spread))
            wins = _where(found, "BEATS")
            parts = [f"BEATS dense continuation by more than the seed spread at {wins}" if wins
                     else "does NOT beat dense continuation by more than the seed spread at any budget"]
            parts += [f"{what} at {_where(found, word)}" for word, what in
                      (("within spread", "within the spread"), ("BEHIND", "behind by more than the spread"))
                      if _where(found, word)]
            winners += [f"{name} ({wins})"] if wins else []
            detail = "; ".join(f"{label}: gap {gap:+.4f}, spread {spread:.4f}"
                               for label, _, gap, spread in found)
            lines.append(f"  {name} {'; '.join(parts)} [{detail}]")
        lines.append(f"  => beat dense continuation at {axis}: {', '.join(winners) if winners else 'none'}")
    return lines


def markdown(results: dict) -> str:
    """The whole report: setup, budgets, the three tables and the verdict."""
    b = results["budget"]
    return "\n\n".join([
        f"Pretraining: {b['pretrain_tokens']:,d} tokens, {b['pretrain_flops']:.3g} FLOPs. Extra budgets "
        f"(every arm trains until it has spent the largest): "
        f"{', '.join(f'{f:.3g}' for f in b['fractions'])} x the "
        "pretraining FLOPs. Losses in nats/byte on the test split: mean (min-max) over seeds; after a "
        "budget cell, the gap to dense (positive = lower loss than dense) and the verdict.",
        "### Arms\n\n" + setup_table(results),
        "### Test loss at equal extra FLOPs\n\n" + budget_table(results, "flops"),
        "### Test loss at equal wall time (timed in turns; see the note on load)\n\n"
        + budget_table(results, "seconds"),
        "### Every seed (test loss at equal extra FLOPs)\n\n" + seed_table(results),
        "### Verdict\n\n```\n" + "\n".join(verdict(results)) + "\n```",
    ]) + "\n"
