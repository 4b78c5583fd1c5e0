"""MoEConfig: validation messages, JSON round trip, version, unknown fields."""

from __future__ import annotations

import dataclasses
import json

import pytest

import moeify
from moeify.activations import ACTIVATIONS
from moeify.config import CONFIG_VERSION
from moeify.errors import MoeifyError
from moeify.routers import ROUTERS, build_router

BASE = dict(d_model=8, d_ff=16)


def make(**kw) -> moeify.MoEConfig:
    return moeify.MoEConfig(**{**BASE, **kw})


def test_defaults_are_valid():
    c = make()
    assert (c.num_experts, c.k, c.router, c.version) == (8, 2, "topk", CONFIG_VERSION)
    assert c.expert_in_width == 16 and make(gated=True).expert_in_width == 32


def test_config_error_is_a_value_error_and_a_moeify_error():
    assert issubclass(moeify.ConfigError, ValueError) and issubclass(moeify.ConfigError, MoeifyError)


# (field changes, words the message must contain)
BAD = [
    (dict(d_model=0), ["d_model", ">= 1", "0"]),
    (dict(d_ff=-3), ["d_ff", ">= 1", "-3"]),
    (dict(d_model=8.0), ["d_model", "integer"]),
    (dict(num_experts=0), ["num_experts", ">= 1"]),
    (dict(num_experts=True), ["num_experts", "integer"]),
    (dict(k=0), ["1 <= k <= num_experts (8)", "k=0"]),
    (dict(k=9), ["1 <= k <= num_experts (8)", "k=9"]),
    (dict(num_experts=2, k=3), ["num_experts (2)", "k=3"]),
    (dict(k=1.5), ["k=1.5"]),
    (dict(capacity_factor=0), ["capacity_factor", "> 0", "None"]),
    (dict(capacity_factor=-1.0), ["capacity_factor", "> 0"]),
    (dict(capacity_factor=float("inf")), ["capacity_factor", "finite"]),
    (dict(capacity_factor=float("nan")), ["capacity_factor"]),
    (dict(capacity_factor="1.0"), ["capacity_factor"]),
    (dict(router="switch"), ["unknown router 'switch'", "valid: " + ", ".join(sorted(ROUTERS))]),
    (dict(router=None), ["unknown router None"]),
    (dict(router=["topk"]), ["unknown router"]),
    (
        dict(activation="cosine"),
        ["unknown activation 'cosine'", "valid: " + ", ".join(sorted((*ACTIVATIONS, "custom")))],
    ),
    (dict(score_fn="sparsemax"), ["unknown score_fn 'sparsemax'", "softmax", "sigmoid"]),
    (dict(gated="yes"), ["gated", "true or false"]),
    (dict(bias=1), ["bias", "true or false"]),
    (dict(normalize=None), ["normalize", "true or false"]),
    (dict(jitter_noise=-0.1), ["jitter_noise", ">= 0"]),
    (dict(aux_loss_coef=-1), ["aux_loss_coef", ">= 0"]),
    (dict(z_loss_coef=float("nan")), ["z_loss_coef"]),
    (dict(z_loss_coef=None), ["z_loss_coef"]),
    (dict(slots_per_expert=0), ["slots_per_expert", ">= 1"]),
    (dict(sinkhorn_iters=0), ["sinkhorn_iters", ">= 1"]),
    (dict(random_eval_rule="sample"), ["unknown random_eval_rule 'sample'", "hash", "mean"]),
    (dict(hash_seed="0"), ["hash_seed", "integer"]),
    (dict(num_shared_experts=-1), ["num_shared_experts", ">= 0"]),
    (dict(shared_d_ff=0), ["shared_d_ff", ">= 1", "None"]),
    (dict(router_dtype="bfloat16"), ["router_dtype", "float32", "float64"]),
    (dict(version=CONFIG_VERSION + 1), [f"config version {CONFIG_VERSION + 1}", "not supported", "upgrade"]),
    (dict(version=0), ["config version 0"]),
]


@pytest.mark.parametrize("changes, words", BAD, ids=[str(c) for c, _ in BAD])
def test_bad_field_names_the_field_and_the_fix(changes, words):
    with pytest.raises(moeify.ConfigError) as info:
        make(**changes)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert "\n" not in message  # one line


@pytest.mark.parametrize(
    "changes",
    [
        dict(k=8),
        dict(num_experts=1, k=1),
        dict(capacity_factor=1),
        dict(capacity_factor=0.25),
        dict(capacity_factor=None),
        dict(jitter_noise=0.01),
        dict(shared_d_ff=4, num_shared_experts=2),
        dict(router_dtype="float64"),
        dict(score_fn="sigmoid", normalize=False),
        *[dict(router=name) for name in sorted(ROUTERS)],
        *[dict(activation=a) for a in ("relu", "gelu", "gelu_tanh", "silu", "quick_gelu", "identity")],
    ],
    ids=str,
)
def test_good_values_are_accepted(changes):
    make(**changes)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_builds_from_a_config(name):
    c = make(router=name)
    router = build_router(c)
    assert router.name == name and router.config is c


def test_config_is_frozen_and_replace_revalidates():
    c = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.k = 1
    assert c.replace(k=1).k == 1 and c.k == 2
    with pytest.raises(moeify.ConfigError, match="k must satisfy"):
        c.replace(k=99)


def test_json_round_trip():
    c = make(
        num_experts=6,
        k=3,
        router="expert_choice",
        activation="silu",
        gated=True,
        bias=False,
        capacity_factor=1.25,
        jitter_noise=0.01,
        slots_per_expert=2,
        sinkhorn_iters=5,
        random_eval_rule="mean",
        hash_seed=42,
        num_shared_experts=1,
        shared_d_ff=12,
        aux_loss_coef=0.02,
        z_loss_coef=0.0,
        score_fn="sigmoid",
        normalize=False,
        router_dtype="float64",
    )
    text = c.to_json()
    again = moeify.MoEConfig.from_json(text)
    assert again == c
    assert again.to_json() == text
    assert json.loads(text)["version"] == CONFIG_VERSION
    assert moeify.MoEConfig.from_dict(c.to_dict()) == c
    assert moeify.MoEConfig.from_json(make().to_json()) == make()  # None values survive too


def test_json_lists_every_field():
    data = json.loads(make().to_json())
    assert set(data) == {f.name for f in dataclasses.fields(moeify.MoEConfig)}


def test_json_from_a_newer_version_is_refused():
    data = make().to_dict()
    data["version"] = CONFIG_VERSION + 1
    with pytest.raises(moeify.ConfigError, match="not supported"):
        moeify.MoEConfig.from_json(json.dumps(data))


def test_old_json_without_version_gets_the_current_one():
    data = make().to_dict()
    del data["version"]
    assert moeify.MoEConfig.from_dict(data).version == CONFIG_VERSION


def test_unknown_fields_are_rejected_with_the_valid_ones_listed():
    data = {**make().to_dict(), "num_expert": 4, "top_k": 2}
    with pytest.raises(moeify.ConfigError) as info:
        moeify.MoEConfig.from_dict(data)
    message = str(info.value)
    assert "num_expert, top_k" in message and "num_experts" in message and "valid:" in message


def test_missing_required_fields_and_bad_json():
    with pytest.raises(moeify.ConfigError, match="missing required field.*d_ff"):
        moeify.MoEConfig.from_dict({"d_model": 8})
    with pytest.raises(moeify.ConfigError, match="not valid JSON"):
        moeify.MoEConfig.from_json("{d_model: 8")
    with pytest.raises(moeify.ConfigError, match="JSON object"):
        moeify.MoEConfig.from_json("[8, 16]")
