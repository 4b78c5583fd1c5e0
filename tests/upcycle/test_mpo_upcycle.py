"""Upcycling into MPO experts (MPOE): exact at full bond, truncation reported, report formula, save/load."""

from __future__ import annotations

import json

import pytest
import torch

import moeify
from moeify.errors import MoeifyError
from moeify.io.loader import load_model
from moeify.io.streaming import convert_checkpoint
from moeify.mpo_experts import mpo_params
from moeify.report import count_params
from moeify.upcycle import DenseFFNWeights, UpcycleConfig, UpcycleError, preserves_config, upcycle_layer

from tests.upcycle.test_upcycle import D, E, H, make_dense, make_layer, rel_err

MPO = {"expert_param": "mpo"}


@pytest.mark.parametrize("activation, gated, bias, cores", [("gelu", False, True, 3), ("silu", True, True, 3),
                                                             ("relu", False, False, 5)])
def test_copy_at_full_bond_reproduces_the_dense_ffn(activation, gated, bias, cores):
    ffn = make_dense(activation, gated, bias)
    ucfg = UpcycleConfig(init="copy")
    layer = make_layer(ucfg, ffn, **MPO, mpo_cores=cores)
    upcycle_layer(layer, DenseFFNWeights.from_module(ffn), ucfg)
    x = torch.randn(3, 7, D)
    assert rel_err(layer, ffn, x) <= 1e-5
    assert layer.mpo.w1.truncation_error < 1e-6 and layer.mpo.w2.truncation_error < 1e-6
    w1, w2 = layer.expert_weights()
    for e in range(E):  # every expert starts as the decomposed dense FFN
        torch.testing.assert_close(w1[e], ffn.w1, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(w2[e], ffn.w2, atol=1e-5, rtol=1e-5)
    assert preserves_config(ucfg, layer.config)


def test_truncated_bond_reports_its_error_and_claims_no_preservation():
    ffn = make_dense("gelu", False, True)
    ucfg = UpcycleConfig(init="copy")
    layer = make_layer(ucfg, ffn, **MPO, mpo_bond=2)
    upcycle_layer(layer, DenseFFNWeights.from_module(ffn), ucfg)
    with torch.no_grad():
        w1, _ = layer.expert_weights()
        manual = float(torch.linalg.norm(w1[0] - ffn.w1) / torch.linalg.norm(ffn.w1))
    assert layer.mpo.w1.truncation_error == pytest.approx(manual, rel=1e-4)
    assert manual > 0.05
    assert not preserves_config(ucfg, layer.config)


@pytest.mark.parametrize("init", ["noise", "drop", "split"])
def test_other_inits_are_refused_with_what_to_use(init):
    ffn = make_dense("gelu", False, True)
    ucfg = UpcycleConfig(init=init)
    layer = make_layer(ucfg, ffn, **MPO)
    with pytest.raises(UpcycleError, match="init='copy'"):
        upcycle_layer(layer, DenseFFNWeights.from_module(ffn), ucfg)


def _converted(**layer):
    loaded = load_model("moeify.zoo:tiny_mlp")
    dense = loaded.model.eval()
    x = torch.randint(0, dense.embed.num_embeddings, (2, 5))  # token ids [B, S]
    with torch.no_grad():
        want = dense(x)
    model = moeify.convert(dense, experts=4, k=2, init="copy", layer={**MPO, **layer})
    return model, loaded.source, x, want


def test_convert_at_full_bond_equals_dense_and_report_has_the_formula():
    model, _, x, want = _converted()
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max()))
    report = moeify.conversion_report(model)
    layers = [m for m in model.modules() if isinstance(m, moeify.MoELayer)]
    assert len(report.ffns) == len(layers) > 0
    for f, layer in zip(report.ffns, layers, strict=True):
        c = layer.config
        assert f.mpo is not None and f.mpo.bond is None
        assert f.mpo.central + c.num_experts * f.mpo.aux_per_expert == mpo_params(c)
        bias = c.num_experts * (c.expert_in_width + c.d_model)
        assert f.params_after == count_params(layer) == mpo_params(c) + bias + count_params(layer.router)
        assert max(f.mpo.truncation_error) < 1e-6
        # k of E experts run per token: the idle experts' auxiliaries and biases are not active
        idle = (c.num_experts - c.k) * (f.mpo.aux_per_expert + c.expert_in_width + c.d_model)
        assert f.active_params_per_token == f.params_after - idle
    text = str(report)
    assert "MPO experts" in text and "central + E x aux" in text and "truncation error" in text
    assert json.loads(report.to_json())["ffns"][0]["mpo"]["central"] == report.ffns[0].mpo.central


def test_convert_with_a_bond_cap_reports_the_truncation_per_layer():
    model, _, x, want = _converted(mpo_bond=2)
    report = moeify.conversion_report(model)
    assert all(min(f.mpo.truncation_error) > 0.01 for f in report.ffns)
    with torch.no_grad():
        assert (model(x) - want).abs().max() > 1e-3  # truncated: not the dense function any more


def test_save_load_round_trip(tmp_path):
    model, source, x, _ = _converted(mpo_grad_mask=0.25)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # experts differ, so a wrong layout would show
        for layer in (m for m in model.modules() if isinstance(m, moeify.MoELayer)):
            for p in layer.mpo.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    out = moeify.save(model, tmp_path / "out", source=source)
    again = moeify.load(out)
    assert model.state_dict().keys() == again.state_dict().keys()
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    layer = next(m for m in again.modules() if isinstance(m, moeify.MoELayer))
    assert layer.config.expert_param == "mpo" and layer.config.mpo_grad_mask == 0.25
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))


def test_streaming_conversion_refuses_mpo_experts(tmp_path):
    loaded = load_model("moeify.zoo:tiny_mlp")
    with pytest.raises(MoeifyError, match="not streamed"):
        convert_checkpoint(loaded.model, tmp_path / "out", moeify.ConvertConfig(experts=4, layer=MPO))
