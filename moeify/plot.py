"""Pictures of routing and training: did routing collapse, and did the experiment pay off?

matplotlib is the optional `plot` extra (`pip install "moeify[plot]"`); it is imported only when a figure is
drawn, so `import moeify.plot` works without it and drawing raises a one-line `MoeifyError`.

Three figures:
- `expert_load_heatmap(stats)`: expert load per layer (from `moeify.routing_stats(model)`), coloured
  relative to a perfectly balanced router: white = balanced, red = overloaded, blue = starved. Each row is
  labelled with its balance (normalised entropy of the load: 1.00 = uniform, 0.00 = one expert takes all).
- `load_over_steps(history)`: each layer's load shares over training steps as stacked bands (equal bands =
  balanced; one band swallowing the others = collapse), from a `LoadHistory` recorded while training.
- `loss_curves(runs)`: held-out loss of several runs against one or more x axes (extra FLOPs, wall time).

Every function returns the matplotlib Figure and, given `path`, writes it there (temp file, then rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moeify.errors import MoeifyError
from moeify.last_forward import routing_stats
from moeify.stats import RoutingStats

Tensor = torch.Tensor

# Below this share of the uniform load an expert counts as "dead" in the summaries.
DEAD_FRACTION_OF_UNIFORM = 0.1


def _pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or a MoeifyError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise MoeifyError(
            "plotting needs matplotlib, which is not installed; run: pip install \"moeify[plot]\""
        ) from None
    matplotlib.use("Agg")  # files only: never open a window, works on headless machines
    import matplotlib.pyplot as plt

    return plt


@dataclass(frozen=True)
class LoadSummary:
    """How balanced one layer's routing is."""

    balance: float  # normalised entropy of the load in [0, 1]: 1 = uniform, 0 = one expert takes all
    max_over_uniform: float  # busiest expert's share / (1/E): 1.0 = balanced, E = collapsed onto one
    dead_experts: int  # experts with less than DEAD_FRACTION_OF_UNIFORM of the uniform share


def summarize_load(load: Tensor | Sequence[float]) -> LoadSummary:
    """load [E] (shares or counts) -> LoadSummary."""
    p = torch.as_tensor(load, dtype=torch.float64).flatten()  # [E]
    E = p.numel()
    if E == 0:
        raise ValueError("load must have at least one expert")
    p = p / p.sum().clamp(min=1e-12)
    if E == 1:
        return LoadSummary(1.0, 1.0, 0)
    entropy = -(p * p.clamp(min=1e-12).log()).sum().item()
    return LoadSummary(
        balance=max(0.0, entropy / math.log(E)),  # max(): no "-0.00" in labels
        max_over_uniform=p.max().item() * E,
        dead_experts=int((p * E < DEAD_FRACTION_OF_UNIFORM).sum().item()),
    )


def _as_loads(stats: Mapping[str, RoutingStats | Tensor | Sequence[float]]) -> tuple[list[str], Tensor]:
    """Layer name -> stats (or raw load) into (names, loads [L, E] as shares)."""
    if not stats:
        raise MoeifyError("no routing statistics to plot: run a forward pass through the MoE model first")
    names, rows = [], []
    for name, s in stats.items():
        load = s.load if isinstance(s, RoutingStats) else torch.as_tensor(s, dtype=torch.float64)
        load = load.double().flatten()  # [E]
        rows.append(load / load.sum().clamp(min=1e-12))
        names.append(name)
    widths = {r.numel() for r in rows}
    if len(widths) != 1:
        raise MoeifyError(f"layers have different expert counts {sorted(widths)}; plot them separately")
    return names, torch.stack(rows)  # [L, E]


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Write `fig` to `path` (format from its suffix) via a temp file: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def expert_load_heatmap(stats: Mapping[str, RoutingStats | Tensor | Sequence[float]],
                        path: str | os.PathLike | None = None, title: str = "Expert load per layer"):
    """Heatmap of expert load (layers x experts), coloured as load / uniform load."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    names, loads = _as_loads(stats)  # [L, E]
    L, E = loads.shape
    ratio = (loads * E).numpy()  # [L, E]; 1.0 = the uniform share
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * E + 3.5), max(2.2, 0.42 * L + 1.4)))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(ratio.max())))
    im = ax.imshow(ratio, cmap="RdBu_r", norm=norm, aspect="auto")
    ax.set_xticks(range(E))
    ax.set_xlabel("expert")
    ax.set_yticks(range(L), [_short(n) for n in names])
    if E <= 16:
        for i in range(L):
            for j in range(E):
                dark = ratio[i, j] < 0.35 or ratio[i, j] > 0.75 * norm.vmax  # saturated cell: white text
                ax.text(j, i, f"{loads[i, j].item():.0%}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    summaries = [summarize_load(row) for row in loads]
    for i, s in enumerate(summaries):
        flag = "  COLLAPSED" if s.balance < 0.5 or s.dead_experts >= E // 2 else ""
        label = f" bal {s.balance:.2f}, max {s.max_over_uniform:.1f}x, dead {s.dead_experts}{flag}"
        ax.text(E - 0.4, i, label, va="center", fontsize=8, color="darkred" if flag else "black")
    worst = min(s.balance for s in summaries)
    ax.set_title(f"{title}\n(worst layer balance {worst:.2f}; 1.00 = uniform, 0.00 = one expert takes all)",
                 fontsize=10)
    cbar = fig.colorbar(im, ax=ax, pad=0.36 if E <= 16 else 0.05, fraction=0.05)
    cbar.set_label("load / uniform load")
    if path is not None:
        save_figure(fig, path)
    return fig


@dataclass
class LoadHistory:
    """Expert load of every MoE layer over training steps; call `record(step, model)` after a forward."""

    steps: list[int] = field(default_factory=list)
    loads: dict[str, list[Tensor]] = field(default_factory=dict)  # layer -> one [E] share per step

    def record(self, step: int, model_or_stats) -> None:
        stats = model_or_stats if isinstance(model_or_stats, Mapping) else routing_stats(model_or_stats)
        if not stats:
            return
        names, loads = _as_loads(stats)
        self.steps.append(int(step))
        for name, row in zip(names, loads, strict=True):
            self.loads.setdefault(name, []).append(row.float())

    def __len__(self) -> int:
        return len(self.steps)


def load_over_steps(history: LoadHistory, path: str | os.PathLike | None = None,
                    title: str = "Expert load over training", max_layers: int = 12):
    """One small panel per layer: each expert's load share over steps, stacked to 100%."""
    plt = _pyplot()
    if len(history) == 0:
        raise MoeifyError("the load history is empty: call history.record(step, model) during training")
    names = list(history.loads)[:max_layers]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, sharex=True,
                             sharey=True)
    cmap = plt.get_cmap("tab20")
    for ax, name in zip(axes.flat, names, strict=False):
        loads = torch.stack(history.loads[name]).numpy()  # [S, E]
        steps = history.steps[-len(loads):]
        E = loads.shape[1]
        ax.stackplot(steps, loads.T, colors=[cmap(e % 20) for e in range(E)], linewidth=0)
        for e in range(1, E):  # where the band edges would sit if routing were uniform
            ax.axhline(e / E, color="white", lw=0.5, alpha=0.6)
        s = summarize_load(loads[-1])
        ax.set_title(f"{_short(name, 36)}\nlast: bal {s.balance:.2f}, max {s.max_over_uniform:.1f}x",
                     fontsize=8, color="darkred" if s.balance < 0.5 else "black")
        ax.set_ylim(0, 1)
        ax.margins(x=0)
    used = list(axes.flat)[:len(names)]
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for i, ax in enumerate(used):
        if i + cols >= len(names):  # lowest panel of its column: give it the step axis
            ax.set_xlabel("step")
            ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("load share")
    fig.suptitle(f"{title} (equal bands = balanced; one band taking over = collapse)", fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


def loss_curves(runs: Mapping[str, Mapping[str, Sequence[float]]], xs: Sequence[tuple[str, str]],
                y: str = "loss", ylabel: str = "held-out loss", path: str | os.PathLike | None = None,
                title: str = "", logx: Sequence[bool] | None = None):
    """One panel per x axis; each run a line.

    runs: run name -> {column: values}, e.g. {"dense": {"flops": [...], "seconds": [...], "loss": [...]}}.
    xs: (column, axis label) per panel, e.g. [("flops", "extra FLOPs"), ("seconds", "extra wall time (s)")].
    """
    plt = _pyplot()
    if not runs:
        raise MoeifyError("no runs to plot")
    fig, axes = plt.subplots(1, len(xs), figsize=(5.2 * len(xs), 3.8), squeeze=False)
    for p, (ax, (col, label)) in enumerate(zip(axes[0], xs, strict=True)):
        for name, data in runs.items():
            if col not in data or y not in data:
                raise MoeifyError(f"run {name!r} has no {col!r} or {y!r} column to plot")
            ax.plot(data[col], data[y], marker="o", markersize=3, label=name)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        if logx is not None and logx[p]:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = ["LoadHistory", "LoadSummary", "expert_load_heatmap", "load_over_steps", "loss_curves",
           "save_figure", "summarize_load"]
