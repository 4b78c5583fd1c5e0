"""Tiny transformers models (BERT, LLaMA) with MoE layers, exported and run end to end in ONNX Runtime."""

import numpy as np
import pytest
import torch
from torch import nn

import moeify
from moeify.runtime import make_session, run

transformers = pytest.importorskip("transformers")

VOCAB, D, H = 100, 32, 64


def _to_moe(model, kind, router="topk"):
    """Upcycle every FFN into 4 experts, top-2. Uses moeify.convert where available, else builds the layers
    by hand (BERT: intermediate -> MoELayer, output.dense -> Identity; LLaMA: mlp -> MoELayer)."""
    convert = getattr(moeify, "convert", None)
    if convert is not None:
        return convert(model, experts=4, k=2, router=router, init="copy")
    torch.manual_seed(0)
    if kind == "bert":
        for layer in model.encoder.layer:
            layer.intermediate = moeify.MoELayer(moeify.MoEConfig(d_model=D, d_ff=H, num_experts=4, k=2,
                                                                  activation="gelu"))
            layer.output.dense = nn.Identity()
    else:
        for layer in model.model.layers:
            cfg = moeify.MoEConfig(d_model=D, d_ff=H, num_experts=4, k=2, activation="silu", gated=True,
                                   bias=False)
            layer.mlp = moeify.MoELayer(cfg, causal=True)
    return model


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=H, max_position_embeddings=64)
    torch.manual_seed(0)
    return _to_moe(transformers.BertModel(cfg).eval(), "bert").eval()


def tiny_llama(router="topk"):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, intermediate_size=H,
                                   max_position_embeddings=64)
    torch.manual_seed(0)
    return _to_moe(transformers.LlamaForCausalLM(cfg).eval(), "llama", router).eval()


def _check(model, path, main_output):
    session = make_session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    for batch, seq in [(1, 3), (3, 11)]:
        ids = torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            want = getattr(model(input_ids=ids), main_output).numpy()
        got = next(iter(run(session, {"input_ids": ids.numpy()}).values()))
        assert got.shape == want.shape
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= 1e-4, f"{path.name} at {batch}x{seq}: relative error {err:.2e}"


def test_tiny_bert_end_to_end(tmp_path):
    model = tiny_bert()
    result = moeify.export_onnx(model, None, tmp_path / "bert.onnx")  # input_ids made from the config
    assert len(result.layers) == 2
    # BERT's exact (erf) gelu is not the fused op's tanh gelu: the experts lower to moeify.GroupedFFN
    assert set(result.layers.values()) == {"moeify.GroupedFFN"}
    _check(model, result.path, "last_hidden_state")


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_tiny_llama_end_to_end(tmp_path, target):
    model = tiny_llama()
    result = moeify.export_onnx(model, None, tmp_path / "llama.onnx", target=target)
    assert len(result.layers) == 2
    expected = "com.microsoft.MoE" if target == "ort" else "moeify.GroupedFFN (inlined)"
    assert set(result.layers.values()) == {expected}  # SwiGLU experts, renormalised top-2: fused
    _check(model, result.path, "logits")
    assert model.config.use_cache  # restored after export


def test_tiny_llama_hash_router_on_token_ids(tmp_path):
    """convert wires input_ids to the hash router's layers through hooks; they export as graph ops feeding
    com.microsoft.MoE log one-hot router logits (exact)."""
    model = tiny_llama(router="hash")
    result = moeify.export_onnx(model, None, tmp_path / "llama-hash.onnx")
    assert set(result.layers.values()) == {"com.microsoft.MoE"}
    _check(model, result.path, "logits")
