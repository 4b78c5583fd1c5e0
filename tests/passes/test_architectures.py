"""Held-out architectures as a new user tries them: a tiny transformers model built from its config, then
find_ffns, explain_ffns, and convert (copy init, top-2 of 4, renormalised: the dense function at init).

Per architecture: the FFNs found (names, activation, gating, causality) and the near misses explained;
the converted model keeps its class, converts every FFN found and gives the dense outputs (eval mode);
decoders still generate the same greedy tokens. Architectures where nothing converts today are listed in
`REJECTED` with the reason every rejection must give. The slowest architectures are marked `slow`.
"""

import fnmatch

import pytest
import torch

import moeify
from moeify.errors import MoeifyError
from tests.architectures import ARCHS, EXPECTED, REJECTED, build, inputs, output
from tests.zoo import rel_err

# the two that stay in the fast subset: one decoder, one vision model
FAST = {"gemma2", "convnext"}


def _params(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in sorted(names)]


def test_every_architecture_has_an_expectation():
    assert set(EXPECTED) | set(REJECTED) == set(ARCHS)
    assert not set(EXPECTED) & set(REJECTED)


@pytest.mark.parametrize("name", _params(EXPECTED))
def test_architecture_converts_and_keeps_its_function(name):
    want = EXPECTED[name]
    kind = ARCHS[name][3]
    model = build(name)
    found = moeify.find_ffns(model)
    assert [f.name for f in found] == want.expected_names()
    assert {(f.activation, f.gated) for f in found} == {(want.activation, want.gated)}
    causal = want.causal if want.causal is not None else (len(found) if kind == "gen" else 0)
    assert sum(f.causal for f in found) == causal
    rejected = {r.name: r.reason for r in moeify.explain_ffns(model)}
    for candidate, words in want.near_misses:
        assert words in rejected[candidate]

    x = inputs(kind)
    with torch.no_grad():
        dense = output(model(**x))
    moe = moeify.convert(model, experts=4, k=2, init="copy")
    assert type(moe) is type(model)
    assert list(moeify.conversion_report(moe).converted) == want.expected_names()
    assert sum(isinstance(m, moeify.MoELayer) for m in moe.modules()) == len(found)
    with torch.no_grad():
        assert rel_err(output(moe(**x)), dense) <= 1e-5
    if kind == "gen":
        prompt = x["input_ids"][:1, :3]
        with torch.no_grad():
            a = model.generate(prompt, max_new_tokens=4, do_sample=False)
            b = moe.generate(prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_architecture_rejected_with_its_reason(name):
    model = build(name)
    assert moeify.find_ffns(model) == []
    rejections = moeify.explain_ffns(model)
    words = REJECTED[name]
    if words is None:
        assert rejections == []
    else:
        assert rejections and all(words in r.reason for r in rejections)
        assert all(fnmatch.fnmatch(r.name, "model.layers.*.mlp") for r in rejections)
    with pytest.raises(MoeifyError, match="FFN"):
        moeify.convert(model, experts=4, k=2)
