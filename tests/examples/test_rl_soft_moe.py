"""examples/rl_soft_moe.py: per-sample Soft MoE in a value network, quick mode end to end."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import rl_soft_moe  # noqa: E402


@pytest.mark.slow
def test_quick_run_lowers_the_td_loss(capsys):
    result = rl_soft_moe.main(["--quick"])
    assert result["last_loss"] < 0.7 * result["first_loss"]
    assert "TD loss" in capsys.readouterr().out


def test_slots_are_per_sample():
    torch.manual_seed(0)
    net = rl_soft_moe.SoftMoEValueNet().eval()
    obs = torch.randn(3, rl_soft_moe.OBS)
    alone = torch.cat([net(obs[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(net(obs), alone)  # a sample's value never depends on the rest of the batch
