"""Tiny offline Hugging Face decoders with a tokenizer, for the GenAI tests and benchmark.

The tokenizer is a byte-level BPE with no merges: its 256 tokens are the 256 bytes, so it fits a vocabulary
of 256 and ONNX Runtime GenAI's tokenizer (onnxruntime-extensions) reads it. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch


def save_byte_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json of a 256-token byte-level BPE (bos = id 1, eos = id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for the bytes
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=chars[1], eos_token=chars[2]
    ).save_pretrained(str(folder))


def tiny_llama_folder(folder: Path, **overrides) -> torch.nn.Module:
    """Save moeify.zoo's tiny LLaMA (grouped-query attention: 4 heads, 2 KV heads; vocab 256) with the byte
    tokenizer into `folder`; returns the model."""
    from moeify.zoo import tiny_llama

    model = tiny_llama(bos_token_id=1, eos_token_id=2, **overrides)
    model.save_pretrained(str(folder))
    save_byte_tokenizer(folder)
    return model


def prompt_ids(length: int = 10, seed: int = 0) -> torch.Tensor:
    """[1, length] token ids that avoid bos/eos."""
    return torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(seed))


def transformers_greedy(model, prompt: torch.Tensor, total: int) -> list[int]:
    """transformers' greedy `generate` on `model` up to `total` tokens (prompt included); like GenAI, it stops
    early at eos (id 2)."""
    with torch.no_grad():
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_length=total, do_sample=False
        )
    return out[0].tolist()


def genai_greedy(folder, prompt: torch.Tensor, total: int) -> list[int]:
    """ONNX Runtime GenAI's greedy generation from a folder, up to `total` tokens (prompt included)."""
    from moeify.genai.generate import generate, load_model

    ids = prompt[0].tolist()
    result = generate(load_model(folder), ids, max_new_tokens=total - len(ids))
    return ids + result.tokens
