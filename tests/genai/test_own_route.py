"""moeify's own GenAI export (explicit past/present KV) for decoders ONNX Runtime GenAI's builder does not
know.

A tiny GPT-2 (Conv1D FFN, learned positions: the builder refuses it) converted to E=4 k=2 with copied experts
and a router trained a few steps, exported once per module (the export takes ~30 s on a 2-core machine).
"""

import json

import numpy as np
import pytest
import torch

import moeify
from moeify.errors import MoeifyError
from moeify.genai import export_genai
from tests.genai.test_export import train_a_few_steps
from tests.genai.tiny import genai_greedy, prompt_ids, save_byte_tokenizer, transformers_greedy

pytestmark = [pytest.mark.slow, pytest.mark.ort]
TOTAL = 32  # tokens in a generated sequence, prompt included (22 new ones)


def tiny_gpt2(n_embd: int = 64):
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(
        vocab_size=256, n_embd=n_embd, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return T.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2(tokenizer, tmp_path_factory):
    """(the dense GPT-2, its converted and trained MoE, the MoE's GenAI folder)."""
    dense = tiny_gpt2()
    moe = moeify.convert(dense, experts=4, k=2, init="copy")
    train_a_few_steps(moe)
    out = export_genai(moe, tmp_path_factory.mktemp("gpt2") / "genai", tokenizer_dir=tokenizer)
    return dense, moe, out


def test_gpt2_folder_holds_moe_ops_and_genai_names(gpt2):
    import onnx

    _, _, out = gpt2
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MoE" and n.domain == "com.microsoft" for n in graph.node) == 2
    assert [i.name for i in graph.input][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert [o.name for o in graph.output][:3] == ["logits", "present.0.key", "present.0.value"]
    decoder = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert (decoder["head_size"], decoder["num_key_value_heads"], decoder["num_hidden_layers"]) == (16, 4, 2)


def test_gpt2_generates_like_transformers_with_and_without_cache(gpt2):
    dense, moe, out = gpt2
    prompt = prompt_ids()
    want = transformers_greedy(moe, prompt, TOTAL)
    with torch.no_grad():
        uncached = moe.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_length=TOTAL, do_sample=False, use_cache=False
        )[0].tolist()
    assert want == uncached and len(want) == TOTAL  # no early eos: 22 cached decode steps compared
    assert want != transformers_greedy(dense, prompt, TOTAL)  # the trained router changed the tokens
    assert genai_greedy(out, prompt, TOTAL) == want


def test_cached_step_equals_the_full_forward_in_onnxruntime(gpt2):
    """Prefill 10 tokens (empty past), then one token with the returned present as past: its logits equal
    the 11-token forward's last ones, so the graph reads its past."""
    import onnxruntime as ort

    _, moe, out = gpt2
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = prompt_ids(11, seed=7).numpy()  # [1, 11]
    empty = np.zeros((1, 4, 0, 16), np.float32)  # [B, Hk, P=0, Dh]

    def run(tokens, start, past):
        feed = {
            "input_ids": tokens,
            "attention_mask": np.ones((1, start + tokens.shape[1]), np.int64),
            "position_ids": np.arange(start, start + tokens.shape[1])[None],
        }
        feed.update(
            {
                f"past_key_values.{i}.{kv}": past[2 * i + j]
                for i in range(2)
                for j, kv in enumerate(("key", "value"))
            }
        )
        return session.run(None, feed)

    prefill = run(ids[:, :10], 0, [empty] * 4)
    assert prefill[1].shape == (1, 4, 10, 16)
    step = run(ids[:, 10:], 10, prefill[1:])
    full = run(ids, 0, [empty] * 4)
    assert step[1].shape == (1, 4, 11, 16)
    np.testing.assert_allclose(step[0][0, -1], full[0][0, -1], atol=1e-4)
    with torch.no_grad():
        np.testing.assert_allclose(
            step[0][0, -1], moe(torch.from_numpy(ids)).logits[0, -1].numpy(), atol=1e-4
        )
    stale = run(ids[:, 10:], 10, [np.zeros_like(p) for p in prefill[1:]])  # a zero past changes the logits
    assert np.abs(stale[0][0, -1] - step[0][0, -1]).max() > 1e-2


def test_left_padded_batch_row_equals_its_prompt_alone_in_onnxruntime(gpt2):
    """A batch of a 10-token prompt and a 6-token one left-padded to 10 (attention mask 0 on the pads,
    positions counted from the first real token): the padded row's logits equal the short prompt's run
    alone, and the long row's equal its own run: the graph honours the mask and mixes no rows. (ONNX Runtime
    GenAI 0.18's `append_tokens` itself feeds an all-ones mask for a batch: the README says so.)"""
    import onnxruntime as ort

    _, _, out = gpt2
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    long, short = prompt_ids(10, seed=3).numpy(), prompt_ids(6, seed=4).numpy()  # [1, 10], [1, 6]

    def logits(ids, mask, positions):
        empty = np.zeros((ids.shape[0], 4, 0, 16), np.float32)  # [B, Hk, P=0, Dh]
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feed.update({f"past_key_values.{i}.{kv}": empty for i in range(2) for kv in ("key", "value")})
        return session.run(["logits"], feed)[0]  # [B, S, V]

    pad = 4
    ids = np.concatenate([long, np.concatenate([np.full((1, pad), 2), short], axis=1)])  # [2, 10]
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    positions = np.stack([np.arange(10), np.concatenate([np.zeros(pad, np.int64), np.arange(6)])])
    batch = logits(ids, mask, positions)
    alone_long = logits(long, np.ones_like(long), np.arange(10)[None])
    alone_short = logits(short, np.ones_like(short), np.arange(6)[None])
    np.testing.assert_allclose(batch[0], alone_long[0], atol=1e-4)
    np.testing.assert_allclose(batch[1, pad:], alone_short[0], atol=1e-4)
    unmasked = logits(ids, np.ones_like(ids), positions)  # the pads attended: the short row changes
    assert np.abs(unmasked[1, -1] - alone_short[0, -1]).max() > 1e-3


# --- refusals (fast: before any export) -------------------------------------------------------------------


def test_builder_route_asked_for_an_architecture_it_does_not_know(tokenizer, tmp_path):
    moe = moeify.convert(tiny_gpt2(), experts=4, k=1, init="copy")
    with pytest.raises(MoeifyError, match="builder route covers LlamaForCausalLM.*not GPT2LMHeadModel"):
        export_genai(moe, tmp_path / "g", tokenizer_dir=tokenizer, route="builder")


def test_router_that_mixes_tokens_is_refused_by_the_own_route(tokenizer, tmp_path):
    """convert refuses such routers in a causal decoder; one set by hand is refused too."""
    import dataclasses

    moe = moeify.convert(tiny_gpt2(), experts=4, k=1, init="copy")
    layer = moe.transformer.h[0].mlp.moe
    layer.router = moeify.MoELayer(dataclasses.replace(layer.config, router="expert_choice")).router
    with pytest.raises(MoeifyError, match="no route takes GPT2LMHeadModel.*mixes tokens"):
        export_genai(moe, tmp_path / "g", tokenizer_dir=tokenizer)


def test_models_neither_route_takes(tokenizer, tmp_path):
    from tests.zoo import ZOO

    bert = moeify.convert(ZOO["bert"].build(), experts=4, k=1, init="copy")
    with pytest.raises(
        MoeifyError, match="no route takes BertForSequenceClassification.*not a causal language model"
    ):
        export_genai(bert, tmp_path / "g", tokenizer_dir=tokenizer)
    plain = moeify.convert(ZOO["raw_linear"].build(), experts=4, k=1, init="copy")
    with pytest.raises(MoeifyError, match="is not a transformers model"):
        export_genai(plain, tmp_path / "g", tokenizer_dir=tokenizer)
    with pytest.raises(MoeifyError, match="unknown GenAI route 'fast'"):
        export_genai(bert, tmp_path / "g", tokenizer_dir=tokenizer, route="fast")


# --- more decoders ---------------------------------------------------------------------------


def other_decoder(kind: str):
    """(dense model, its converted and trained MoE) of a GPT-2 with hash routing (token ids reach the
    routers through the wrapper), a Falcon (multi-query attention: one KV head, rotary,
    GELU FFN) or a LLaMA (grouped-query attention, SwiGLU FFN) whose top-k does not renormalise, which the
    builder route's surgery refuses, so `route="auto"` takes the own route."""
    import transformers as T

    torch.manual_seed(0)
    if kind == "falcon":
        dense = T.FalconForCausalLM(
            T.FalconConfig(
                vocab_size=256,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                bos_token_id=1,
                eos_token_id=2,
            )
        ).eval()
        moe = moeify.convert(dense, experts=4, k=2, init="copy")
    elif kind == "gpt2_hash":
        dense = tiny_gpt2()
        moe = moeify.convert(dense, experts=4, k=2, init="copy", router="hash")
    else:
        from moeify.zoo import tiny_llama

        dense = tiny_llama(bos_token_id=1, eos_token_id=2, num_hidden_layers=2)
        moe = moeify.convert(dense, experts=4, k=2, init="copy", layer={"normalize": False})
    train_a_few_steps(moe)
    return dense, moe


@pytest.mark.parametrize("kind, kv_heads", [("gpt2_hash", 4), ("falcon", 1), ("llama", 2)])
def test_other_decoders_generate_like_transformers(kind, kv_heads, tokenizer, tmp_path):
    import onnx

    dense, moe = other_decoder(kind)
    out = export_genai(moe, tmp_path / "genai", tokenizer_dir=tokenizer)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    assert not any(n.op_type == "GroupQueryAttention" for n in graph.node)  # the own route's graph
    assert (
        json.loads((out / "genai_config.json").read_text())["model"]["decoder"]["num_key_value_heads"]
        == kv_heads
    )
    prompt = prompt_ids(seed=2)
    want = transformers_greedy(moe, prompt, TOTAL)
    assert len(want) == TOTAL and want != transformers_greedy(dense, prompt, TOTAL)
    assert genai_greedy(out, prompt, TOTAL) == want
