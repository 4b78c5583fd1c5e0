"""The builder route beyond LLaMA: Mistral, Qwen2 (attention biases) and Qwen3 (q/k norms, tied LM head)
decoders, their experts perturbed so a wrong expert or route would change the tokens."""

import numpy as np
import pytest
import torch

import moeify
from moeify.genai import export_genai
from tests.genai.tiny import genai_greedy, prompt_ids, save_byte_tokenizer, transformers_greedy

pytestmark = [pytest.mark.slow, pytest.mark.ort]
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)


def build(kind: str):
    import transformers as T

    torch.manual_seed(0)
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**CONFIG)).eval()
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**CONFIG)).eval()
    tied = {**CONFIG, "tie_word_embeddings": True}  # small Qwen checkpoints tie the LM head to the embedding
    return T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=16, **tied)).eval()


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3"])
def test_builder_architectures_generate_like_transformers(kind, tmp_path):
    dense = build(kind)
    dense.save_pretrained(str(tmp_path / "hf"))
    save_byte_tokenizer(tmp_path / "hf")
    moe = moeify.convert(dense, experts=4, k=2, init="copy")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in moe.modules():
            if isinstance(layer, moeify.MoELayer):
                layer.w1.mul_(1 + torch.randn(layer.w1.shape, generator=g))
                layer.w2.mul_(1 + torch.randn(layer.w2.shape, generator=g))
                layer.router.weight.normal_(0, 1, generator=g)
    out = export_genai(moe, tmp_path / "genai", tokenizer_dir=tmp_path / "hf")
    prompt = prompt_ids()
    with torch.no_grad():
        want = moe(prompt).logits[0, -1].numpy()  # [V]
        assert not np.allclose(want, dense(prompt).logits[0, -1].numpy(), atol=1e-3)  # the experts matter
    np.testing.assert_allclose(genai_last_logits(out, prompt), want, atol=1e-4, rtol=1e-4)
    assert genai_greedy(out, prompt, 32) == transformers_greedy(moe, prompt, 32)


def genai_last_logits(folder, prompt: torch.Tensor) -> np.ndarray:
    """The logits [V] GenAI computes for the last prompt position."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    generator = og.Generator(model, og.GeneratorParams(model))
    generator.append_tokens(prompt.numpy().astype(np.int32))
    return np.asarray(generator.get_logits())[0, -1]
