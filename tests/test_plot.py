"""moeify.plot: load summaries, the three figures, and the error when matplotlib is missing."""

import sys

import pytest
import torch

import moeify
from moeify.errors import MoeifyError
from moeify.plot import (
    LoadHistory,
    expert_load_heatmap,
    load_over_steps,
    loss_curves,
    save_figure,
    summarize_load,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_layers(n_layers=2, E=4):
    """A few real MoELayers after one forward, so the stats come from moeify.routing_stats."""
    torch.manual_seed(0)
    cfg = moeify.MoEConfig(d_model=8, d_ff=16, num_experts=E, k=2)
    model = torch.nn.Sequential(*[moeify.MoELayer(cfg) for _ in range(n_layers)])
    model(torch.randn(32, 8))
    return model


def _is_png(path):
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC


def test_summarize_load_uniform_and_collapsed():
    uniform = summarize_load([5, 5, 5, 5])
    assert uniform.balance == pytest.approx(1.0)
    assert uniform.max_over_uniform == pytest.approx(1.0)
    assert uniform.dead_experts == 0
    collapsed = summarize_load([100, 0, 0, 0])
    assert collapsed.balance == pytest.approx(0.0, abs=1e-9)
    assert collapsed.max_over_uniform == pytest.approx(4.0)
    assert collapsed.dead_experts == 3
    half = summarize_load([1, 1, 0, 0])  # two of four experts carry everything: entropy log 2 / log 4
    assert half.balance == pytest.approx(0.5)


@pytest.mark.slow
def test_heatmap_from_routing_stats(tmp_path):
    model = _run_layers(n_layers=3, E=4)
    stats = moeify.routing_stats(model)
    assert len(stats) == 3
    fig = expert_load_heatmap(stats, tmp_path / "sub" / "load.png")
    assert _is_png(tmp_path / "sub" / "load.png")
    image = fig.axes[0].images[0].get_array()
    assert image.shape == (3, 4)  # layers x experts
    # the image holds load / uniform load, so every row averages to 1
    assert torch.tensor(image.mean(axis=1)).allclose(torch.ones(3, dtype=torch.float64))
    assert not list(tmp_path.glob("sub/.*tmp*"))  # temp file renamed away


def test_heatmap_flags_a_collapsed_layer():
    fig = expert_load_heatmap({"ok": torch.tensor([1.0, 1, 1, 1]), "bad": torch.tensor([9.0, 0, 0, 0])})
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert sum("COLLAPSED" in t for t in texts) == 1
    assert "worst layer balance 0.00" in fig.axes[0].get_title()


@pytest.mark.slow
def test_load_history_and_plot(tmp_path):
    model = _run_layers(n_layers=2, E=4)
    history = LoadHistory()
    for step in range(5):
        model(torch.randn(16, 8))
        history.record(step, model)
    assert history.steps == [0, 1, 2, 3, 4]
    assert set(history.loads) == {"0", "1"}
    assert all(len(v) == 5 and v[0].sum().item() == pytest.approx(1.0) for v in history.loads.values())
    load_over_steps(history, tmp_path / "steps.png")
    assert _is_png(tmp_path / "steps.png")


def test_loss_curves(tmp_path):
    runs = {"dense": {"flops": [0, 1e12, 2e12], "seconds": [0, 1, 2], "loss": [3.0, 2.5, 2.2]},
            "moe": {"flops": [0, 2e12, 4e12], "seconds": [0, 2, 4], "loss": [3.0, 2.3, 2.0]}}
    fig = loss_curves(runs, [("flops", "extra FLOPs"), ("seconds", "seconds")], path=tmp_path / "loss.png")
    assert _is_png(tmp_path / "loss.png")
    assert len(fig.axes) == 2 and all(len(ax.lines) == 2 for ax in fig.axes)
    with pytest.raises(MoeifyError, match="no 'tokens'"):
        loss_curves(runs, [("tokens", "tokens")])


def test_empty_inputs_are_user_errors():
    with pytest.raises(MoeifyError, match="forward pass"):
        expert_load_heatmap({})
    with pytest.raises(MoeifyError, match="history is empty"):
        load_over_steps(LoadHistory())


def test_missing_matplotlib_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(MoeifyError, match=r"pip install \"moeify\[plot\]\"") as info:
        expert_load_heatmap({"a": [1.0, 1.0]})
    assert "\n" not in str(info.value)


def test_save_figure_replaces_existing_file(tmp_path):
    target = tmp_path / "f.png"
    target.write_bytes(b"old")
    fig = loss_curves({"a": {"x": [0, 1], "loss": [1, 0]}}, [("x", "x")])
    save_figure(fig, target)
    assert _is_png(target)
