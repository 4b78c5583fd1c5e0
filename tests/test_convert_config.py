"""ConvertConfig: validation in one place with one-line messages, JSON round trip, version check, the keyword
form and the config form give the same model, the deprecated `config=` dict still works with a warning."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest
import torch

import moeify
from moeify import ConfigError, ConvertConfig, MoELayer
from moeify.upcycle import UpcycleConfig
from tests.zoo import ZOO

E = 4


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"experts": 0}, "experts must be an integer >= 1, got 0"),
        ({"experts": True}, "experts must be an integer >= 1"),
        ({"k": 5}, r"k must be an integer with 1 <= k <= experts \(4\), got 5"),
        ({"every": 0}, "every must be an integer >= 1"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"router": "nope"}, "unknown router 'nope'; valid: "),
        ({"init": "nope"}, "unknown upcycling init 'nope'"),
        ({"init": 3}, "init must be a strategy name"),
        ({"init": {"init": "copy", "noise_std": 0.5}}, "noise_std=0.5 is only used by init='noise'"),
        ({"init": {"bogus": 1}}, "unknown UpcycleConfig field"),
        ({"include": 3}, "include must be a module-path glob or a list of them"),
        ({"exclude": ["*.mlp", 2]}, "exclude must be a module-path glob"),
        ({"layer": {"num_experts": 2}}, "pass experts= to convert"),
        ({"layer": {"gated": True}}, "'gated', which comes from each FFN found"),
        ({"layer": {"d_ff": 2}}, "set expert_d_ff for the experts' width"),
        ({"layer": {"bogus": 1}}, "unknown layer field 'bogus'.*valid: .*capacity_factor"),
        ({"layer": {"capacity_factor": 0}}, "capacity_factor must be a finite number > 0"),
        ({"layer": {"score_fn": "tanh"}}, "unknown score_fn 'tanh'"),
        ({"layer": [("capacity_factor", 2.0)]}, "layer must be a mapping of MoEConfig fields"),
        ({"expert_d_ff": 0}, "expert_d_ff must be an integer >= 1 or a {ffn name: width} mapping"),
        ({"expert_d_ff": {"a.mlp": -1}}, "expert_d_ff for 'a.mlp' must be an integer >= 1"),
        ({"version": 2}, "ConvertConfig version 2 is not supported by this moeify"),
    ],
)
def test_bad_fields_are_one_line_config_errors(fields, words):
    with pytest.raises(ConfigError, match=words) as info:
        ConvertConfig(**{"experts": E, **fields})
    assert "\n" not in str(info.value)


def test_from_dict_and_from_json_errors():
    with pytest.raises(ConfigError, match="unknown ConvertConfig field.*bogus; valid: .*experts"):
        ConvertConfig.from_dict({"experts": 4, "bogus": 1})
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ConvertConfig.from_dict([4])
    with pytest.raises(ConfigError, match="not valid JSON"):
        ConvertConfig.from_json("{experts: 4")
    newer = json.loads(ConvertConfig().to_json()) | {"version": 2}
    with pytest.raises(ConfigError, match="version 2 is not supported.*upgrade moeify"):
        ConvertConfig.from_dict(newer)


FULL = dict(
    experts=6,
    k=3,
    router="topk",
    layer={"capacity_factor": 2.0, "num_shared_experts": 1, "score_fn": "sigmoid"},
    init={"init": "noise", "noise_std": 0.02},
    include=["model.*"],
    exclude="*.0.mlp",
    every=2,
    expert_d_ff={"model.layers.1.mlp": 32},
    seed=7,
)


def test_json_round_trip_and_copies():
    cfg = ConvertConfig(**FULL)
    text = cfg.to_json()
    assert ConvertConfig.from_json(text) == cfg
    assert ConvertConfig.from_json(text).to_json() == text
    data = json.loads(text)
    assert data["version"] == 1 and data["include"] == ["model.*"] and data["exclude"] == ["*.0.mlp"]
    assert data["init"] == UpcycleConfig(init="noise", noise_std=0.02, seed=7).to_dict()
    assert data["layer"] == FULL["layer"] and data["expert_d_ff"] == FULL["expert_d_ff"]
    for again in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert again == cfg and hash(again) == hash(cfg)
    assert ConvertConfig() == ConvertConfig.from_dict({})  # every field has a default


def test_accepted_spellings_are_normalised_and_frozen():
    cfg = ConvertConfig(experts=E, init="split", seed=3, include="a.*")
    assert cfg.init == UpcycleConfig(init="split", seed=3)  # a name gets the config's seed
    assert ConvertConfig(init={"init": "copy", "seed": 9}, seed=3).init.seed == 9  # a dict may set its own
    assert cfg.include == ("a.*",)
    assert ConvertConfig(include=["a.*", "b.*"]).include == ("a.*", "b.*")
    layered = ConvertConfig(layer={"z_loss_coef": 0.0, "aux_loss_coef": 0.1})
    with pytest.raises(TypeError):
        layered.layer["aux_loss_coef"] = 1.0  # read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.experts = 2
    assert cfg.replace(experts=8).experts == 8
    with pytest.raises(ConfigError, match="k must be an integer"):
        cfg.replace(experts=1)  # replace validates again
    moe_cfg = layered.layer_config(d_model=16, d_ff=32, activation="silu", gated=True)
    assert (moe_cfg.num_experts, moe_cfg.k, moe_cfg.aux_loss_coef, moe_cfg.gated) == (8, 2, 0.1, True)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_keyword_form_equals_config_form():
    entry = ZOO["llama"]
    options = dict(experts=E, k=1, init={"init": "noise", "noise_std": 0.05}, seed=5,
                   layer={"num_shared_experts": 1}, exclude="*.1.mlp")
    by_keywords = moeify.convert(entry.build(), **options)
    by_config = moeify.convert(entry.build(), ConvertConfig(**options))
    assert _same_state(_state(by_keywords), _state(by_config))
    a, b = moeify.conversion_report(by_keywords), moeify.conversion_report(by_config)
    assert a.config == b.config and a.converted == b.converted == ("model.layers.0.mlp",)
    layer = next(m for m in by_config.modules() if isinstance(m, MoELayer))
    assert (layer.config.k, layer.config.num_shared_experts) == (1, 1)
    # a different seed does change the noise: the seed is not ignored by either form
    other = moeify.convert(entry.build(), ConvertConfig(**{**options, "seed": 6}))
    assert not _same_state(_state(by_config), _state(other))


def test_report_records_the_config_and_rebuilds_from_it():
    entry = ZOO["llama"]
    config = ConvertConfig(experts=E, k=E, init="split", layer={"z_loss_coef": 0.0})
    moe = moeify.convert(entry.build(), config)
    report = moeify.conversion_report(moe)
    names = tuple(f"model.layers.{i}.mlp" for i in range(2))
    assert report.config.include == names and report.config.every == 1 and report.config.exclude is None
    assert dict(report.config.expert_d_ff) == {n: ZOO["llama"].ffns[n][1] // E for n in names}
    assert report.config.layer == {"z_loss_coef": 0.0} and report.init == "split"
    recorded = report.config.to_dict()
    assert report.options == {k: v for k, v in recorded.items() if k not in ("init", "version")}
    assert json.loads(report.to_json())["config"] == recorded
    rebuild = ConvertConfig.from_json(report.config.to_json()).replace(init="none")
    fresh = moeify.convert(entry.build(), rebuild)
    fresh.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert torch.allclose(entry.run(fresh), entry.run(moe))


def test_deprecated_config_dict_still_works_with_a_warning():
    entry = ZOO["sequential"]
    with pytest.warns(DeprecationWarning, match=r"pass them as layer=\{\.\.\.\} \(ConvertConfig.layer\)"):
        old = moeify.convert(entry.build(), experts=E, config={"capacity_factor": 2.0})
    new = moeify.convert(entry.build(), experts=E, layer={"capacity_factor": 2.0})
    assert moeify.conversion_report(old).config == moeify.conversion_report(new).config
    assert _same_state(_state(old), _state(new))
    with pytest.warns(DeprecationWarning), pytest.raises(ConfigError, match="pass layer= only"):
        moeify.convert(entry.build(), experts=E, config={"capacity_factor": 2.0}, layer={})


@pytest.mark.parametrize(
    "call, words",
    [
        (lambda m: moeify.convert(m, ConvertConfig(experts=E), k=1), r"and keyword options \(k\)"),
        (lambda m: moeify.convert(m, 8), "config must be a ConvertConfig, got int 8; pass options as"),
        (lambda m: moeify.convert(m, experts=E, expert=2), "unknown option\\(s\\) expert; valid: experts, k"),
        (lambda m: moeify.convert(m, experts=E, filter_fn=3), "filter_fn must be callable"),
        (lambda m: moeify.convert(m, experts=E, inplace=1), "inplace must be True or False"),
    ],
)
def test_call_mistakes_are_config_errors(call, words):
    with pytest.raises(ConfigError, match=words) as info:
        call(ZOO["sequential"].build())
    assert "\n" not in str(info.value)
