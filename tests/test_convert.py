"""convert on the zoo: outputs preserved where the README's table says so, the user's class kept, the input
untouched, HF models still generate and save, selection options, report numbers, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from tests.zoo import ZOO, D, H, rel_err

import moeify
from moeify import ConfigError, MoELayer
from moeify.errors import MoeifyError

E = 4


def _converted(name, **kw):
    entry = ZOO[name]
    model = entry.build()
    with torch.no_grad():
        ref = entry.run(model)
    kw.setdefault("experts", E)
    return entry, model, ref, moeify.convert(model, **kw)


def _moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoELayer)]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ZOO))
def test_copy_topk_preserves_outputs_and_class(name):
    entry = ZOO[name]
    model = entry.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = entry.run(model)
    moe = moeify.convert(model, experts=E, k=2, init="copy")
    assert type(moe) is type(model) and moe is not model
    assert len(_moe_layers(moe)) == len(entry.ffns)
    with torch.no_grad():
        assert rel_err(entry.run(moe), ref) <= 1e-5
    # the input is untouched: same weights, no MoE layer, same outputs
    assert not _moe_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(entry.run(model), ref)
    report = moeify.conversion_report(moe)
    assert report.summary == f"{len(entry.ffns)}/{len(entry.ffns)} FFNs converted"
    assert [r for r in report.passes if r.startswith("rewrite:")][0].startswith(
        f"rewrite: {len(entry.ffns)}/{len(entry.ffns)} FFNs converted"
    )


# The README table, row by row: (init, router, k, other MoEConfig fields, preserves the dense function?)
TABLE = [
    ("copy", "topk", 1, {}, True),
    ("copy", "topk", 2, {}, True),
    ("copy", "topk", E, {}, True),
    ("copy", "topk", 2, {"score_fn": "sigmoid"}, True),
    ("copy", "topk", 2, {"normalize": False}, False),
    ("copy", "topk", E, {"normalize": False}, True),
    ({"init": "copy", "router_init": "zeros"}, "topk", 2, {}, True),
    ({"init": "copy", "router_init": "kmeans"}, "topk", 2, {}, True),
    ("copy", "topk", 2, {"num_shared_experts": 1}, True),
    ("copy", "topk", 2, {"jitter_noise": 0.1}, True),  # jitter acts in training only
    ("copy", "topk", 2, {"capacity_factor": E / 2}, True),  # capacity >= T: nothing dropped
    ("copy", "topk", 2, {"capacity_factor": 0.5}, False),
    ("copy", "hash", 2, {}, True),
    ("copy", "random", 2, {}, True),  # eval: the hash rule, weight 1/k
    ("copy", "expert_choice", 2, {}, False),
    ("copy", "soft", 2, {}, False),
    ("copy", "balanced", 1, {}, False),
    ("noise", "topk", 2, {}, False),
    ("drop", "topk", 2, {}, False),
    ("split", "topk", E, {}, True),
    ("split", "topk", 2, {}, False),
    ({"init": "split", "split_method": "cluster"}, "topk", E, {}, True),
    ({"init": "granular", "granularity": 2}, "topk", 2, {}, True),
    ({"init": "granular", "granularity": 2}, "topk", 1, {}, False),
    ("none", "topk", 2, {}, False),
]
MIXING = {"expert_choice", "soft", "balanced"}


def _row_id(row):
    init, router, k, cfg, _ = row
    init = init if isinstance(init, str) else "-".join(str(v) for v in init.values())
    return "-".join([init, router, f"k{k}", *(f"{a}={b}" for a, b in cfg.items())])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "bert"])  # gated + causal; split FFN (chain surgery)
@pytest.mark.parametrize("row", TABLE, ids=_row_id)
def test_preservation_table(name, row):
    from moeify.upcycle import UpcycleConfig
    from moeify.upcycle.preservation import preserves_config

    init, router, k, cfg, preserved = row
    entry = ZOO[name]
    model = entry.build()
    needs_data = "kmeans" in str(init) or "cluster" in str(init)
    kwargs = dict(
        experts=E,
        router=router,
        k=k,
        init=init,
        layer=cfg,
        calibration=entry.inputs() if needs_data else None,
    )
    causal = any(c for *_, c in entry.ffns.values())
    if causal and (router in MIXING or "capacity_factor" in cfg):
        with pytest.raises(ConfigError, match="FFN 'model.layers.0.mlp'.*causal"):  # refused in a decoder
            moeify.convert(model, **kwargs)
        return
    with torch.no_grad():
        ref = entry.run(model)
    moe = moeify.convert(model, **kwargs)
    with torch.no_grad():
        err = rel_err(entry.run(moe), ref)
    assert (err <= 1e-5) == preserved, err
    if "capacity_factor" not in cfg and init != "none":  # (a capacity that drops nothing is not claimed)
        ucfg = UpcycleConfig(**init) if isinstance(init, dict) else UpcycleConfig(init=init)
        assert preserves_config(ucfg, _moe_layers(moe)[0].config) == preserved  # the router's claim agrees


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_hf_decoders_still_generate(name):
    entry, model, _, moe = _converted(name)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        dense = model.generate(ids, max_new_tokens=4, do_sample=False)
        out = moe.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out, dense)
    assert all(layer.causal for layer in _moe_layers(moe))


@pytest.mark.slow
def test_t5_decoder_layers_are_causal():
    _, _, _, moe = _converted("t5")
    for name, m in moe.named_modules():
        if isinstance(m, MoELayer):
            assert m.causal == name.startswith("decoder"), name


@pytest.mark.slow
def test_save_pretrained_and_rebuild_from_report(tmp_path):
    entry, _, ref, moe = _converted("llama", k=1)
    moe.save_pretrained(tmp_path)
    report = moeify.conversion_report(moe)
    options = json.loads(json.dumps(report.options))  # JSON-able
    fresh = moeify.convert(entry.build(), **options, init="none")
    state = moe.state_dict()
    assert fresh.state_dict().keys() == state.keys()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert rel_err(entry.run(fresh), ref) <= 1e-5
    assert (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "t5", "raw_linear", "torch_encoder", "albert"])
def test_rebuild_recipe_every_surgery(name):
    entry, _, ref, moe = _converted(name, every=2 if name == "t5" else 1)
    fresh = moeify.convert(entry.build(), **moeify.conversion_report(moe).options, init="none")
    fresh.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert rel_err(entry.run(fresh), entry.run(moe)) <= 1e-6


def _names(model):
    return list(moeify.conversion_report(model).converted)


@pytest.mark.slow
def test_selection_every_include_exclude_filter():
    t5 = ZOO["t5"].build()
    enc = [f"encoder.block.{i}.layer.1.DenseReluDense" for i in range(2)]
    dec = [f"decoder.block.{i}.layer.2.DenseReluDense" for i in range(2)]
    assert _names(moeify.convert(t5, experts=E)) == enc + dec
    assert _names(moeify.convert(t5, experts=E, every=2)) == [enc[1], dec[1]]
    assert _names(moeify.convert(t5, experts=E, include="encoder.*")) == enc
    assert _names(moeify.convert(t5, experts=E, exclude=["*decoder*"])) == enc
    assert _names(moeify.convert(t5, experts=E, include=["*block.0*"], exclude="decoder*")) == enc[:1]
    assert (
        _names(moeify.convert(t5, experts=E, filter_fn=lambda m, n: n.endswith("1.layer.2.DenseReluDense")))
        == dec[1:]
    )
    seen = []
    moeify.convert(t5, experts=E, filter_fn=lambda m, n: seen.append((type(m).__name__, n)) or True)
    assert seen == [("T5DenseActDense", n) for n in enc + dec]
    report = moeify.conversion_report(moeify.convert(t5, experts=E, every=2))
    assert report.summary == "2/4 FFNs converted" and "select: 2/4 FFNs selected (every=2)" in report.passes


def test_report_numbers():
    entry = ZOO["llama"]
    model = entry.build()
    moe = moeify.convert(model, experts=E, k=2)
    report = moeify.conversion_report(moe)
    dense_ffn = 3 * D * H  # gate, up, down; no bias
    expert = 3 * D * H
    router = E * D
    total_before = sum(p.numel() for p in model.parameters())
    assert report.params_before == total_before
    assert report.params_after == total_before - 2 * dense_ffn + 2 * (E * expert + router)
    assert report.params_after == sum(p.numel() for p in moe.parameters())
    assert report.active_params_per_token == report.params_after - 2 * (E - 2) * expert
    for f in report.ffns:
        assert (f.params_before, f.params_after, f.active_params_per_token) == (
            dense_ffn,
            E * expert + router,
            2 * expert + router,
        )
        assert (f.d_model, f.d_ff, f.expert_d_ff, f.num_experts, f.k, f.activation, f.gated) == (
            D,
            H,
            H,
            E,
            2,
            "silu",
            True,
        )
    # with biases (GPT-2: Conv1D, d_ff = 4D) and a shared layer counted once (ALBERT)
    gpt2 = moeify.conversion_report(moeify.convert(ZOO["gpt2"].build(), experts=E, k=1))
    h = 4 * D
    per_expert = 2 * D * h + h + D
    assert gpt2.ffns[0].params_before == per_expert
    assert gpt2.ffns[0].params_after == E * per_expert + E * D
    assert gpt2.ffns[0].active_params_per_token == per_expert + E * D
    albert = ZOO["albert"].build()
    rep = moeify.conversion_report(moeify.convert(albert, experts=E))
    per_expert = 2 * D * H + H + D
    assert rep.params_after - rep.params_before == (E - 1) * per_expert + E * D
    json.loads(rep.to_json())
    assert "1/1 FFNs converted" in str(rep)


@pytest.mark.slow
def test_inplace_and_training_step():
    entry = ZOO["bert"]
    model = entry.build()
    out = moeify.convert(model, experts=E, inplace=True)
    assert out is model and len(_moe_layers(model)) == 2
    model.train()
    y = entry.run(model)
    loss = y.pow(2).mean() + moeify.aux_loss(model)
    loss.backward()
    assert all(m.w1.grad is not None for m in _moe_layers(model))


def test_calibration_reaches_the_upcycling(monkeypatch):
    import sys

    conv = sys.modules["moeify.convert"]  # the module (moeify.convert is the function)
    seen = {}

    def spy(layer, dense, cfg, calibration=None, key=0):
        seen[len(seen)] = None if calibration is None else tuple(calibration.shape)

    monkeypatch.setattr(conv, "upcycle_layer", spy)
    entry = ZOO["raw_linear"]  # F.linear FFNs: recorded through a temporary copy of the traced forward
    moeify.convert(entry.build(), experts=E, calibration=entry.inputs())
    assert seen == {0: (14, D), 1: (14, D)}
    seen.clear()
    entry = ZOO["albert"]  # a shared layer run twice: both calls recorded
    moeify.convert(entry.build(), experts=E, calibration=entry.inputs())
    assert seen == {0: (2 * 14, D)}


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"experts": 0}, "experts must be an integer >= 1"),
        ({"k": 9}, "k must be an integer with 1 <= k <= experts"),
        ({"every": 0}, "every must be an integer >= 1"),
        ({"router": "nope"}, "unknown router 'nope'"),
        ({"init": "nope"}, "unknown upcycling init 'nope'"),
        ({"include": "nothing*"}, "include pattern 'nothing\\*' matches no FFN"),
        ({"include": 3}, "include must be a module-path glob"),
        ({"layer": {"k": 2}}, "pass k= to convert"),
        ({"layer": {"d_ff": 2}}, "comes from each FFN"),
        ({"layer": {"capacity_factor": -1}}, "capacity_factor must be a finite number > 0"),
        ({"layer": {"bogus": 1}}, "unknown layer field 'bogus'"),
        ({"filter_fn": 3}, "filter_fn must be callable"),
        ({"expert_d_ff": 16}, "conflicts with init='copy'"),
    ],
)
def test_bad_options_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=words) as info:
        moeify.convert(ZOO["sequential"].build(), **{"experts": E, **kwargs})
    assert "\n" not in str(info.value)


def test_config_as_moeconfig():
    cfg = moeify.MoEConfig(d_model=1, d_ff=1, num_experts=E, k=1, capacity_factor=2.0, aux_loss_coef=0.0)
    with pytest.warns(DeprecationWarning, match="layer="):  # config= an MoEConfig: before ConvertConfig
        moe = moeify.convert(ZOO["sequential"].build(), experts=E, k=1, config=cfg)
    (layer,) = _moe_layers(moe)
    assert (layer.config.capacity_factor, layer.config.aux_loss_coef, layer.config.d_model) == (2.0, 0.0, D)
    with pytest.raises(ConfigError, match="disagrees with k=2"), pytest.warns(DeprecationWarning):
        moeify.convert(ZOO["sequential"].build(), experts=E, k=2, config=cfg)


def test_no_ffn_and_nothing_selected():
    with pytest.raises(MoeifyError, match="moeify inspect -v"):
        moeify.convert(nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D)))
    with pytest.raises(MoeifyError, match="no FFN selected"):
        moeify.convert(ZOO["sequential"].build(), every=2)
    with pytest.raises(MoeifyError, match="not converted by moeify.convert"):
        moeify.conversion_report(nn.Linear(2, 2))


def test_seed_is_deterministic_and_leaves_global_rng():
    model = ZOO["llama"].build()
    state = torch.random.get_rng_state()
    a = moeify.convert(model, experts=E, seed=3, init="none")
    assert torch.equal(torch.random.get_rng_state(), state)
    b = moeify.convert(ZOO["llama"].build(), experts=E, seed=3, init="none")
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_new_layers_follow_the_model_mode_and_mixed_biases():
    model = nn.Sequential(nn.Linear(D, H, bias=True), nn.GELU(), nn.Linear(H, D, bias=False)).eval()
    x = torch.randn(5, D)
    moe = moeify.convert(model, experts=E, layer={"jitter_noise": 0.5})
    assert all(not m.training for m in moe.modules())
    with torch.no_grad():
        assert rel_err(moe(x), model(x)) <= 1e-5
    (layer,) = _moe_layers(moe)
    assert layer.config.bias and torch.equal(layer.b2, torch.zeros_like(layer.b2))  # the missing bias is 0
    assert all(m.training for m in moeify.convert(ZOO["llama"].build().train(), experts=E).modules())


@pytest.mark.slow
def test_converted_model_is_not_converted_again():
    moe = moeify.convert(ZOO["llama"].build(), experts=E)
    with pytest.raises(MoeifyError, match="no FFN found"):
        moeify.convert(moe, experts=E)


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_hash_router_gets_the_token_ids(name):
    entry = ZOO[name]
    moe = moeify.convert(entry.build(), experts=E, router="hash", k=1)
    assert "token ids: wired from input_ids to 2 layers" in moeify.conversion_report(moe).passes
    seen = []
    layer = _moe_layers(moe)[0]
    layer.router.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(
            (kwargs.get("token_ids", args[1] if len(args) > 1 else None), out.expert_idx)
        ),
        with_kwargs=True,
    )
    ids = torch.tensor([[5, 7, 5, 9, 7, 5]])
    with torch.no_grad():
        moe(input_ids=ids)
    token_ids, experts = seen[-1]
    assert torch.equal(token_ids, ids.reshape(-1))
    by_id = {}
    for t, e in zip(token_ids.tolist(), experts.tolist(), strict=True):
        assert by_id.setdefault(t, e) == e  # one expert per token id, wherever it stands
    copy_of = __import__("copy").deepcopy(moe)  # the copy's hooks read the copy's ids
    with torch.no_grad():
        copy_of(input_ids=ids)
    if name == "gpt2":
        with torch.no_grad():
            out = moe.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 6) and torch.equal(seen[-1][0], out[0, -2:-1])  # last step: the new token


def test_hash_router_not_wired_without_input_ids():
    moe = moeify.convert(ZOO["t5"].build(), experts=E, router="hash")
    assert any("not wired (encoder-decoder" in p for p in moeify.conversion_report(moe).passes)
    moe = moeify.convert(ZOO["sequential"].build(), experts=E, router="hash")
    assert any(
        "not wired (the model's forward takes no input_ids" in p for p in moeify.conversion_report(moe).passes
    )


@pytest.mark.parametrize("surgery, name", [("module", "llama"), ("chain", "bert"), ("forward", "raw_linear")])
def test_every_surgery_keeps_its_promise(surgery, name):
    from moeify.passes import plan

    promises = {s.name: s.preserves_computation for s in plan.SURGERIES}
    assert set(promises) == {"module", "chain", "forward"}
    entry, _, ref, moe = _converted(name)
    assert {f.rewrite for f in moeify.conversion_report(moe).ffns} == {surgery}
    with torch.no_grad():
        assert (rel_err(entry.run(moe), ref) <= 1e-5) == promises[surgery]


@pytest.mark.slow
def test_rebuild_recipe_keeps_split_widths():
    entry, _, ref, moe = _converted("llama", init="split", k=E)
    report = moeify.conversion_report(moe)
    assert {f.expert_d_ff for f in report.ffns} == {H // E}
    assert report.options["expert_d_ff"] == {f"model.layers.{i}.mlp": H // E for i in range(2)}
    fresh = moeify.convert(ZOO["llama"].build(), **json.loads(json.dumps(report.options)), init="none")
    fresh.load_state_dict(moe.state_dict())
    with torch.no_grad():
        assert rel_err(entry.run(fresh), ref) <= 1e-5
