"""Plots of the upcycling experiment (examples/upcycle_gpt.py): loss against extra FLOPs and wall time.

One figure per x axis, one panel per active width (top-1 arms | top-2 arms, dense in both): the line is
the mean over seeds, the band its min-max. The seeds of one arm share their x values (the same steps,
the same per-step cost), so the band is taken point by point.
"""

from __future__ import annotations

from pathlib import Path

from moeify.plot import save_figure

AXES = {"flops": "extra training FLOPs", "seconds": "extra wall time (s, timed in turns)"}
SPLIT = {"loss": "validation", "test_loss": "test"}


def _pyplot():
    import matplotlib  # the plot extra (pip install "moeify[plot]")

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    return plt


def _mean_band(arm: dict, column: str, loss: str) -> tuple[list[float], ...]:
    """(x, mean, min, max) over the arm's seeds, point by point."""
    curves = list(arm["seeds"].values())
    xs = curves[0][column]
    ys = list(zip(*(c[loss] for c in curves), strict=True))  # [points][seeds]
    return xs, [sum(y) / len(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def loss_figure(results: dict, column: str, path: Path, loss: str = "loss") -> Path:
    """Write the figure of `loss` ("loss": validation, "test_loss": test) against `column` to `path`."""
    plt = _pyplot()
    groups = [(w, [n for n in results["arms"] if n == "dense" or n.startswith(f"top{w}-")]) for w in (1, 2)]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 4.2), squeeze=False, sharey=True)
    for ax, (width, names) in zip(axes[0], groups, strict=True):
        for name in names:
            xs, mean, lo, hi = _mean_band(results["arms"][name], column, loss)
            line, = ax.plot(xs, mean, label=name, linewidth=1.6 if name == "dense" else 1.2,
                            color="black" if name == "dense" else None)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        for flops in results["budget"]["flops"] if column == "flops" else ():
            ax.axvline(flops, color="grey", linestyle=":", linewidth=0.8)
        ax.set_title(f"top-{width} arms vs dense continuation", fontsize=9)
        ax.set_xlabel(AXES[column])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"{SPLIT[loss]} loss (nats/byte)")
    seeds = results["config"]["seeds"]
    fig.suptitle(f"Continuing a pretrained dense GPT: mean over {seeds} seeds, band = min-max"
                 + ("; dotted: the FLOP budgets" if column == "flops" else ""), fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def write_figures(results: dict, folder: Path) -> list[Path]:
    return [loss_figure(results, "flops", folder / "loss_vs_extra_flops.png"),
            loss_figure(results, "seconds", folder / "loss_vs_wall_time.png")]
