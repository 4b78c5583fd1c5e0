"""examples/hf_trainer.py --quick end to end: Trainer trains a converted tiny LLaMA with RoutingCallback,
the model saves, reloads to the same logits and generates the same tokens."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import hf_trainer  # noqa: E402


@pytest.mark.slow
def test_hf_trainer_quick(tmp_path):
    result = hf_trainer.main(["--quick", "--out", str(tmp_path)])
    assert result["finite"] and len(result["losses"]) == 3  # logging every 2 of 6 steps
    for entry in result["logged"]:
        assert entry["moe/aux_loss"] > 0
        assert {k for k in entry if k.endswith("/balance")} == {
            "moe/model.layers.0.mlp/balance", "moe/model.layers.1.mlp/balance"}
    assert result["heatmaps"] == ["trainer/checkpoint-6/expert_load.png"]
    assert result["load_diff"] == 0.0
    assert result["same_generation"] and len(result["generated"]) == 24
