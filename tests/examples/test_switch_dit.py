"""examples/switch_dit.py: a diffusers-style DiT with a shared expert plus routed experts per block
(Switch-DiT), quick mode end to end."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

import moeify

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import switch_dit  # noqa: E402


def test_each_block_feedforward_becomes_shared_plus_routed_experts():
    model = switch_dit.switch_dit(depth=2, experts=4)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, moeify.MoELayer)}
    assert sorted(layers) == ["blocks.0.ff", "blocks.1.ff"]  # the timestep MLP stays dense
    for layer in layers.values():
        cfg = layer.config
        assert (cfg.num_experts, cfg.k, cfg.num_shared_experts) == (4, 1, 1)
        assert cfg.activation == "gelu_tanh" and layer.shared is not None
        assert not layer.shared.w2.any()  # upcycling starts the shared expert at zero output


def test_converted_dit_predicts_noise_of_the_image_shape():
    model = switch_dit.switch_dit().eval()
    g = torch.Generator().manual_seed(0)
    x0 = switch_dit.gratings(3, g)
    t = torch.tensor([0, 50, 99])
    with torch.no_grad():
        out = model(switch_dit.noised(x0, t, torch.randn(x0.shape, generator=g)), t)
    assert out.shape == x0.shape and torch.isfinite(out).all()
    assert float(x0.abs().max()) <= 1.0


@pytest.mark.slow
def test_quick_run_lowers_the_loss_and_writes_the_heatmaps(tmp_path, capsys):
    result = switch_dit.main(["--quick", "--out", str(tmp_path)])
    assert math.isfinite(result["last_loss"]) and result["last_loss"] < 0.8 * result["first_loss"]
    assert result["moe_layers"] == 2 and result["shared_experts"] == [1, 1]
    for key in ("heatmap", "heatmap_by_timestep"):
        picture = Path(result[key])
        assert picture.parent == tmp_path and picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "result.json").read_text())["steps"] == result["steps"]
    assert "denoising loss" in capsys.readouterr().out
