"""genai_config.json for a decoder exported with explicit past/present KV (moeify.genai.own_route).

The model type is "decoder", GenAI's generic decoder-only model: it feeds `input_ids`, `attention_mask`
[B, P + S], `position_ids` when the graph has them (from the attention mask), the past keys/values
[B, kv_heads, P, head_size] (empty at the first step), and reads `logits` and the present keys/values
[B, kv_heads, P + S, head_size]. past and present are separate buffers (past_present_share_buffer false):
the graph concatenates, as transformers does.
"""

from __future__ import annotations

from torch import nn

from moeify.genai.kv_cache import CacheShape

PAST = ("past_key_values.%d.key", "past_key_values.%d.value")
PRESENT = ("present.%d.key", "present.%d.value")
DEFAULT_CONTEXT = 2048  # when the config states no maximum position


def input_names(shape: CacheShape, position_ids: bool) -> list[str]:
    names = ["input_ids", "attention_mask"] + (["position_ids"] if position_ids else [])
    return names + [pattern % i for i in range(shape.num_layers) for pattern in PAST]


def output_names(shape: CacheShape) -> list[str]:
    return ["logits"] + [pattern % i for i in range(shape.num_layers) for pattern in PRESENT]


def context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_CONTEXT


def special_ids(model: nn.Module) -> dict:
    """bos/eos/pad ids, from the generation config where the model has one, else its config; pad falls back
    to eos (GenAI needs one)."""
    sources = [getattr(model, "generation_config", None), model.config]
    ids = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids[key] = next((getattr(s, key) for s in sources if getattr(s, key, None) is not None), None)
    eos = ids["eos_token_id"]
    if ids["pad_token_id"] is None:
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return ids


def decoder_config(
    model: nn.Module, shape: CacheShape, *, position_ids: bool, filename: str, provider: str
) -> dict:
    """The genai_config.json dict of `model` exported with explicit KV (see the module docstring), for
    `provider` (cpu | cuda)."""
    config = model.config
    length = context_length(config)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names=PAST[0], past_value_names=PAST[1])
    return {
        "model": {
            **special_ids(model),
            "context_length": length,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [] if provider == "cpu" else [{provider: {}}],
                },
                "filename": filename,
                "head_size": shape.head_size,
                "hidden_size": config.hidden_size,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": PRESENT[0],
                    "present_value_names": PRESENT[1],
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": shape.num_layers,
                "num_key_value_heads": shape.kv_heads,
            },
            "type": "decoder",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }
