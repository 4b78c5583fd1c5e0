"""Hash routing (Roller et al.) on ONNX Runtime's fused com.microsoft.MoE: the export feeds the op
router_probs = log(one_hot(hash(input_ids))) with renormalisation, computed in the graph from the model's
input_ids (convert wires them to the layers). Exact: parity <= 1e-4 with PyTorch for a converted tiny
decoder, with the permutation hash and with a balanced hash table."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import moeify
from moeify.genai.router_logits import op_routing
from moeify.lowering.ops.ort_moe import MSFT_DOMAIN, NEVER_CHOSEN, log_weights, ort_attributes, topk_moe
from moeify.routers import balanced_hash_table, set_hash_table
from moeify.runtime import make_session, run

V, D, H, E = 60, 16, 32, 4
TABLE_IDS = 40  # the balanced table covers ids [0, 40); ids 40..59 keep the permutation hash


class Block(nn.Module):
    """Pre-norm causal self-attention and a SwiGLU MLP (LLaMA's shape), residuals around both."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.gate_proj, self.up_proj = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.down_proj = nn.Linear(H, D, bias=False)

    def forward(self, x):  # [B, S, D]
        B, S, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, S, 3, 2, D // 2).permute(2, 0, 3, 1, 4)  # [B, 2, S, D/2]
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, 2, S, D/2]
        x = x + self.proj(att.transpose(1, 2).reshape(B, S, D))
        h = self.norm2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, V)

    def forward(self, input_ids):  # [B, S] -> [B, S, V]
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def converted(k: int, balanced: bool) -> nn.Module:
    torch.manual_seed(0)
    options = {"layer": {"hash_vocab_size": TABLE_IDS}} if balanced else {}
    model = moeify.convert(TinyDecoder().eval(), experts=E, k=k, router="hash", init="noise", **options)
    if balanced:
        counts = (1000.0 / torch.arange(1, TABLE_IDS + 1)).long()  # Zipf-like token frequencies
        set_hash_table(model, balanced_hash_table(counts, E))
    return model.eval()


def _ancestors(graph: onnx.GraphProto, name: str) -> set[str]:
    """Every value `name` is computed from (graph inputs and initializers included)."""
    producer = {out: node for node in graph.node for out in node.output}
    seen, todo = set(), [name]
    while todo:
        value = todo.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in producer:
            todo.extend(i for i in producer[value].input if i)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(("k", "balanced"), [(1, False), (1, True), (2, False)],
                         ids=["hash-k1", "balanced-k1", "hash-k2"])
def test_hash_decoder_on_fused_moe_matches_pytorch(tmp_path, k, balanced):
    model = converted(k, balanced)
    result = moeify.export_onnx(model, {"input_ids": torch.randint(0, V, (2, 6))}, tmp_path / "h.onnx",
                                target="ort")
    assert set(result.layers.values()) == {"com.microsoft.MoE"} and len(result.layers) == 2, result.reasons

    onnx_model = onnx.load(result.path)
    graph = onnx_model.graph
    fused = [n for n in graph.node if n.domain == MSFT_DOMAIN and n.op_type == "MoE"]
    assert len(fused) == 2
    assert not [n for n in graph.node if n.domain == "moeify"] and not onnx_model.functions  # no moeify op
    for node in fused:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k"] == k and attrs["normalize_routing_weights"] == 1
        assert "input_ids" in _ancestors(graph, node.input[1])  # router_probs come from the token ids

    session = make_session(result.path)
    for batch, seq in [(1, 1), (1, 5), (3, 13)]:
        ids = torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = model(ids).numpy()
        got = next(iter(run(session, {"input_ids": ids.numpy()}).values()))
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), f"{batch}x{seq}"


def test_portable_target_keeps_standard_ops():
    """The fused op is for target="ort" only."""
    from moeify.lowering.export import plan_for

    layer = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=E, k=1, router="hash",
                                               activation="relu")).eval()
    assert plan_for(layer, "ort").lowering.name == "com.microsoft.MoE"
    assert plan_for(layer, "portable").lowering.name == "moeify.GroupedFFN"


def test_dense_weights_leave_dropped_assignments_out():
    from moeify.routing import SparseRouting

    routing = SparseRouting(token_idx=torch.tensor([0, 0, 1, 1]), expert_idx=torch.tensor([2, 0, 3, 4]),
                            weight=torch.tensor([0.75, 0.25, 1.0, 0.5]), logits=torch.zeros(2, 4))
    want = torch.tensor([[0.25, 0.0, 0.75, 0.0], [0.0, 0.0, 0.0, 1.0]])  # expert 4 = E: dropped
    assert torch.equal(routing.dense_weights(2, 4), want)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_log_weights_give_back_the_routing(k):
    """softmax -> top-k -> renormalise (what MoE computes) of log_weights(w) is w, for k-hot weights."""
    g = torch.Generator().manual_seed(k)
    chosen = torch.stack([torch.randperm(E + 2, generator=g)[:k] for _ in range(50)])  # [T, k]
    weights = torch.zeros(50, E + 2).scatter_(1, chosen, 1.0 / k)  # [T, E]
    logits = log_weights(weights)  # [T, E]
    assert float(logits.max()) <= 0.0 and float(logits.min()) == NEVER_CHOSEN
    assert torch.equal(op_routing(logits, k).float(), weights)


@pytest.mark.parametrize("never", [NEVER_CHOSEN, -float("inf")], ids=["finite", "inf"])
def test_onnxruntime_moe_takes_log_one_hot_logits(never):
    """The measurement behind NEVER_CHOSEN: onnxruntime's MoE fed log one-hot logits (finite or -inf for
    the experts not chosen) gives the reference output."""
    T, k = 9, 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)  # [T, D]
    w1, w2 = torch.randn(E, H, D, generator=g), torch.randn(E, D, H, generator=g)
    chosen = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k]
    weights = torch.zeros(T, E).scatter_(1, chosen, 1.0 / k)  # [T, E]
    want = topk_moe(x, log_weights(weights), w1, None, w2, None, k, True, "softmax", "relu", False)  # [T, D]
    probs = torch.where(weights > 0, weights.log(), torch.tensor(never)).numpy()  # [T, E]
    node = helper.make_node("MoE", ["x", "probs", "w1", "", "w2"], ["y"], domain=MSFT_DOMAIN,
                            **ort_attributes(k, True, "relu", False))
    value = functools.partial(helper.make_tensor_value_info, elem_type=TensorProto.FLOAT)
    weights_init = [numpy_helper.from_array(w1.numpy(), "w1"), numpy_helper.from_array(w2.numpy(), "w2")]
    graph = helper.make_graph([node], "moe", [value("x", shape=[T, D]), value("probs", shape=[T, E])],
                              [value("y", shape=[T, D])], weights_init)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid(MSFT_DOMAIN, 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x.numpy(), "probs": probs})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
