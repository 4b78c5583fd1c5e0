"""Omni-router through convert: one router per width, initialised once, kept through save and load."""

from __future__ import annotations

import pytest
import torch

import moeify
from moeify.io import load_model


def converted(**options):
    loaded = load_model("moeify.zoo:tiny_mlp")
    return moeify.convert(loaded.model, experts=4, k=2, inplace=True, **options), loaded.source


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, moeify.MoELayer)]


def test_one_router_initialised_once_by_the_first_layer():
    shared_model, _ = converted(share_router=True, init={"init": "copy", "router_init": "random"})
    plain_model, _ = converted(init={"init": "copy", "router_init": "random"})
    shared, plain = moe_layers(shared_model), moe_layers(plain_model)
    assert len(shared) == 3 and all(m.router is shared[0].router for m in shared)
    assert not torch.equal(plain[0].router.weight, plain[-1].router.weight)  # layers' own inits differ
    torch.testing.assert_close(shared[0].router.weight, plain[0].router.weight)  # the first layer's, kept
    router_params = [p for n, p in shared_model.named_parameters() if ".router." in n]
    assert len(router_params) == 1  # one optimizer entry
    x = torch.randint(0, 16, (2, 5))  # token ids
    with torch.no_grad():  # copied experts: the shared router still preserves the dense function
        torch.testing.assert_close(shared_model(x), load_model("moeify.zoo:tiny_mlp").model(x))


def test_sharing_survives_save_and_load(tmp_path):
    model, source = converted(share_router=True)
    with torch.no_grad():
        moe_layers(model)[0].router.weight.add_(1.0)
    again = moeify.load(moeify.save(model, tmp_path / "out", source=source))
    layers = moe_layers(again)
    assert all(m.router is layers[0].router for m in layers)
    torch.testing.assert_close(layers[0].router.weight, moe_layers(model)[0].router.weight)


def test_config_field():
    config = moeify.ConvertConfig(share_router=True)
    assert moeify.ConvertConfig.from_dict(config.to_dict()).share_router is True
    with pytest.raises(moeify.ConfigError, match="share_router must be true or false"):
        moeify.ConvertConfig(share_router="yes")


def test_cli_flag(run, tmp_path):
    result = run("convert", "moeify.zoo:tiny_mlp", "-e", "4", "--share-router", "-o", "out")
    assert result.exit_code == 0, result.output
    layers = moe_layers(moeify.load(tmp_path / "out"))
    assert len(layers) == 3 and all(m.router is layers[0].router for m in layers)
