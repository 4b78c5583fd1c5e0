"""find_ffns / explain_ffns on the zoo: the right FFNs with the right widths, no attention, pooler or head,
and rejections that say why."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tests.zoo import ZOO, D, H

import moeify
from moeify import FFNMatch, Rejection

# module-path words that must never be part of a found FFN
NOT_FFN = re.compile(
    r"(attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value|pooler|classifier|lm_head|"
    r"predictions|pre_classifier|SelfAttention|EncDecAttention|\.q$|\.k$|\.v$|\.o$)"
)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_finds_the_ffns(name):
    entry = ZOO[name]
    model = entry.build()
    found = moeify.find_ffns(model)
    assert all(isinstance(m, FFNMatch) for m in found)
    got = {m.name: (m.d_model, m.d_ff, m.activation, m.gated, m.causal) for m in found}
    assert got == entry.ffns
    modules = dict(model.named_modules())
    for m in found:
        refs = [m.up, m.down] + ([m.gate] if m.gate else [])
        for ref in refs:
            assert not NOT_FFN.search(ref.where), f"{ref.where} is not an FFN projection"
            weight = model.get_parameter(ref.weight)
            out_in = weight.shape[::-1] if ref.transposed else weight.shape
            assert ref.rows is not None or tuple(out_in) == (ref.out_features, ref.in_features)
            if ref.module is not None:
                assert ref.module in modules
        assert m.up.in_features == m.down.out_features == m.d_model
        assert m.down.in_features == m.d_ff
        assert m.bias == any(r.bias is not None for r in refs)
        assert m.rewrite in ("module", "chain", "forward")


def test_split_ffn_found_across_siblings():
    """BERT: up projection + activation in `intermediate`, down projection in `output`."""
    (first, _) = moeify.find_ffns(ZOO["bert"].build())
    assert first.up.module == "bert.encoder.layer.0.intermediate.dense"
    assert first.down.module == "bert.encoder.layer.0.output.dense"
    assert first.rewrite == "chain"


def test_conv1d_and_gated_weights_located():
    gpt2 = moeify.find_ffns(ZOO["gpt2"].build())[0]
    assert (gpt2.up.kind, gpt2.up.weight, gpt2.up.transposed) == (
        "conv1d",
        "transformer.h.0.mlp.c_fc.weight",
        True,
    )
    llama = moeify.find_ffns(ZOO["llama"].build())[0]
    assert llama.gate.module.endswith("gate_proj") and llama.up.module.endswith("up_proj")
    assert llama.down.module.endswith("down_proj") and not llama.bias
    raw = moeify.find_ffns(ZOO["raw_linear"].build())[0]
    assert (raw.up.kind, raw.up.module, raw.up.weight, raw.up.bias) == (
        "function",
        None,
        "blocks.0.w_in",
        "blocks.0.b_in",
    )
    assert raw.rewrite == "forward"


def test_find_does_not_change_the_model():
    model = ZOO["llama"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moeify.find_ffns(model)
    moeify.explain_ffns(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "forward" not in vars(model.model.layers[0].mlp)


def test_shared_albert_layer_found_once():
    model = ZOO["albert"].build()
    assert model.config.num_hidden_layers == 2  # the one layer runs twice
    assert len(moeify.find_ffns(model)) == 1


def test_fused_gate_up_projection():
    class Phi3Style(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Linear(D, 2 * H, bias=False)
            self.down_proj = nn.Linear(H, D, bias=False)
            self.act = nn.SiLU()

        def forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(up * self.act(gate))

    model = nn.Sequential(nn.LayerNorm(D), Phi3Style())
    (m,) = moeify.find_ffns(model)
    assert (m.name, m.gated, m.d_ff, m.rule, m.up.rows, m.gate.rows) == (
        "1",
        True,
        H,
        "fused_gated",
        (H, 2 * H),
        (0, H),
    )


class _Head(nn.Module):  # dense -> gelu -> out_proj to 3 labels: a head
    def __init__(self):
        super().__init__()
        self.dense, self.act, self.out_proj = nn.Linear(D, D), nn.GELU(), nn.Linear(D, 3)

    def forward(self, x):
        return self.out_proj(self.act(self.dense(x)))


class _SoftmaxFFN(nn.Module):  # softmax between the projections: not elementwise
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.Softmax(dim=-1), nn.Linear(H, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Leaky(nn.Module):  # returns its hidden activations too: converting would lose them
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, H), nn.Linear(H, D)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(h), h


class _Untraceable(nn.Module):  # data-dependent control flow and no method to trace instead
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.GELU(), nn.Linear(H, D)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize(
    "module, words",
    [
        (_Head(), "not back to the input width"),
        (_SoftmaxFFN(), "Softmax is not elementwise: its forward calls softmax: it normalises along a dim"),
        (_Leaky(), "also used outside"),
        (_Untraceable(), "did not trace"),
    ],
)
def test_rejections_have_reasons(module, words):
    model = nn.Sequential(nn.LayerNorm(D), module)
    assert moeify.find_ffns(model) == []
    rejections = moeify.explain_ffns(model)
    assert rejections and all(isinstance(r, Rejection) and r.reason for r in rejections)
    assert any(words in r.reason and r.name == "1" for r in rejections), rejections


def test_hf_squared_relu_is_found():
    import transformers as T

    model = T.BertModel(
        T.BertConfig(
            vocab_size=100,
            hidden_size=D,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=H,
            hidden_act="relu2",
        )
    )
    (m,) = moeify.find_ffns(model)
    assert (m.name, m.activation, m.d_ff) == ("encoder.layer.0", "relu2", H)


def test_analysis_writes_node_meta():
    from moeify.passes import analyse

    analysis = analyse(ZOO["gpt2"].build())
    site = analysis.sites[0]
    roles = {
        n.meta["moeify.analyse"]["role"] for n in site.cand.cap.graph.nodes if "moeify.analyse" in n.meta
    }
    assert roles == {"up", "act", "down"}
    assert "traced" in analysis.capture.summary and "found 2 FFNs" in analysis.summary
