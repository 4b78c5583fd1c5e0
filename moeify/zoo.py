"""Small dense models that ship with moeify (built from configs here, fixed seed, no download).

They are `module:callable` sources, so every command takes them by name:

    moeify inspect moeify.zoo:tiny_llama
    moeify convert moeify.zoo:tiny_bert --experts 4 -o tiny-bert-moe4

`tiny_llama` and `tiny_bert` need transformers (the `hf` extra); `tiny_mlp` is plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import nn

from moeify.errors import MoeifyError

SEED = 0

TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
TINY_BERT = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise MoeifyError("the tiny LLaMA/BERT models need transformers; pip install 'moeify[hf]'") from e
    return transformers


def tiny_llama(**overrides) -> nn.Module:
    """A 4-layer LLaMA (d_model 64, SwiGLU FFN 176), random weights from seed 0: ~0.3M parameters."""
    t = _transformers()
    torch.manual_seed(SEED)
    return t.LlamaForCausalLM(t.LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()


def tiny_bert(**overrides) -> nn.Module:
    """A 2-layer BERT encoder (d_model 64, GELU FFN 128), random weights from seed 0."""
    t = _transformers()
    torch.manual_seed(SEED)
    return t.BertModel(t.BertConfig(**{**TINY_BERT, **overrides}), add_pooling_layer=False).eval()


class Block(nn.Module):
    """Pre-norm residual FFN block: x + fc2(act(fc1(norm(x))))."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TinyMLPModel(nn.Module):
    """Token embedding, a few residual FFN blocks, an output head. Plain PyTorch."""

    def __init__(self, vocab: int = 128, d_model: int = 32, d_ff: int = 64, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.blocks = nn.ModuleList(Block(d_model, d_ff) for _ in range(layers))
        self.head = nn.Linear(d_model, vocab)

    def forward(self, ids):
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(SEED)
    return TinyMLPModel().eval()

