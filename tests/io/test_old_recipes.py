"""A model saved by moeify 0.1.0 (recipe version 1: convert's keyword options, the old `config` dict) still
loads: same structure, same weights, same outputs. See fixtures/README.md for how the fixture was made."""

from pathlib import Path

import torch

import moeify

FIXTURES = Path(__file__).parent / "fixtures"


def test_recipe_v1_loads_with_its_options():
    model = moeify.load(FIXTURES / "recipe_v1")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, moeify.MoELayer)}
    assert list(layers) == ["blocks.1.mlp"]
    cfg = layers["blocks.1.mlp"].config
    assert (cfg.num_experts, cfg.k, cfg.d_ff, cfg.capacity_factor, cfg.aux_loss_coef) == (4, 4, 16, 2.0, 0.0)
    config = moeify.conversion_report(model).config  # the v1 options, read as a ConvertConfig
    assert (config.experts, config.k, config.seed, dict(config.layer)) == (
        4, 4, 1, {"aux_loss_coef": 0.0, "capacity_factor": 2.0})
    expected = torch.load(FIXTURES / "recipe_v1_expected.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(model(expected["ids"]), expected["logits"])


def test_resaved_v1_model_writes_the_current_recipe(tmp_path):
    model = moeify.load(FIXTURES / "recipe_v1")
    out = moeify.save(model, tmp_path / "again")
    import json

    recipe = json.loads((out / "moeify.json").read_text())
    assert recipe["version"] == 2 and recipe["conversion"]["config"]["version"] == 1
    assert recipe["conversion"]["config"]["layer"] == {"aux_loss_coef": 0.0, "capacity_factor": 2.0}
    again = moeify.load(out)
    expected = torch.load(FIXTURES / "recipe_v1_expected.pt", weights_only=True)
    with torch.no_grad():
        assert torch.equal(again(expected["ids"]), expected["logits"])
