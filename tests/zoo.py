"""The model zoo the pass tests run on: tiny models built from transformers *configs* (no download) and
torch/user models, each with example inputs and what `find_ffns` must report.

Tiny: hidden 32, 2 layers, vocab 100. Each entry: build() -> model (eval mode, seeded), inputs(model) ->
kwargs or args, and `ffns`: {name: (d_model, d_ff, activation, gated, causal)}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

V, D, H, L = 100, 32, 64, 2


class RawBlock(nn.Module):
    """A user block computing its FFN with F.linear on raw parameters, inside a pre-norm residual."""

    def __init__(self, d: int = D, h: int = H):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.w_in = nn.Parameter(torch.randn(h, d) / d**0.5)
        self.b_in = nn.Parameter(torch.randn(h) * 0.1)
        self.w_out = nn.Parameter(torch.randn(d, h) / h**0.5)
        self.b_out = nn.Parameter(torch.randn(d) * 0.1)
        self.p = 0.1

    def forward(self, x):
        h = F.gelu(F.linear(self.norm(x), self.w_in, self.b_in))
        h = F.dropout(h, p=self.p, training=self.training)
        return x + F.linear(h, self.w_out, self.b_out)


class RawNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, D)
        self.blocks = nn.ModuleList([RawBlock() for _ in range(L)])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(1))


def _hf(name: str):
    import transformers as T

    if name == "bert":
        return T.BertForSequenceClassification(
            T.BertConfig(
                vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2, intermediate_size=H
            )
        )
    if name == "gpt2":
        return T.GPT2LMHeadModel(
            T.GPT2Config(
                vocab_size=V,
                n_embd=D,
                n_layer=L,
                n_head=2,
                n_positions=64,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    if name == "llama":
        return T.LlamaForCausalLM(
            T.LlamaConfig(
                vocab_size=V,
                hidden_size=D,
                intermediate_size=H,
                num_hidden_layers=L,
                num_attention_heads=2,
                num_key_value_heads=2,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        )
    if name in ("t5", "t5_gated"):
        extra = {"feed_forward_proj": "gated-gelu"} if name == "t5_gated" else {}
        return T.T5ForConditionalGeneration(
            T.T5Config(
                vocab_size=V,
                d_model=D,
                d_ff=H,
                num_layers=L,
                num_heads=2,
                d_kv=16,
                decoder_start_token_id=0,
                **extra,
            )
        )
    if name == "vit":
        return T.ViTForImageClassification(
            T.ViTConfig(
                hidden_size=D,
                num_hidden_layers=L,
                num_attention_heads=2,
                intermediate_size=H,
                image_size=16,
                patch_size=8,
                num_labels=3,
            )
        )
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(
            T.DistilBertConfig(vocab_size=V, dim=D, n_layers=L, n_heads=2, hidden_dim=H)
        )
    if name == "albert":
        return T.AlbertForMaskedLM(
            T.AlbertConfig(
                vocab_size=V,
                embedding_size=16,
                hidden_size=D,
                num_hidden_layers=L,
                num_attention_heads=2,
                intermediate_size=H,
            )
        )
    raise KeyError(name)


@dataclass
class Entry:
    name: str
    build_fn: object
    inputs: object  # model -> dict (kwargs) or tuple (args)
    ffns: dict = field(default_factory=dict)  # name -> (d_model, d_ff, activation, gated, causal)
    hf: bool = False

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.build_fn().eval()

    def run(self, model: nn.Module) -> torch.Tensor:
        x = self.inputs()
        out = model(**x) if isinstance(x, dict) else model(*x)
        if isinstance(out, torch.Tensor):
            return out
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _layers(fmt: str, spec: tuple, n: int = L) -> dict:
    return {fmt.format(i): spec for i in range(n)}


def _t5(act: str, gated: bool) -> dict:
    return {
        **_layers("encoder.block.{}.layer.1.DenseReluDense", (D, H, act, gated, False)),
        **_layers("decoder.block.{}.layer.2.DenseReluDense", (D, H, act, gated, True)),
    }


def _seq_x():
    return (torch.randn(2, 7, D, generator=torch.Generator().manual_seed(2)),)


ZOO = {
    e.name: e
    for e in [
        Entry(
            "bert",
            lambda: _hf("bert"),
            lambda: {"input_ids": _ids()},
            _layers("bert.encoder.layer.{}", (D, H, "gelu", False, False)),
            hf=True,
        ),
        Entry(
            "gpt2",
            lambda: _hf("gpt2"),
            lambda: {"input_ids": _ids()},
            _layers("transformer.h.{}.mlp", (D, 4 * D, "gelu_tanh", False, True)),
            hf=True,
        ),
        Entry(
            "llama",
            lambda: _hf("llama"),
            lambda: {"input_ids": _ids()},
            _layers("model.layers.{}.mlp", (D, H, "silu", True, True)),
            hf=True,
        ),
        Entry(
            "t5",
            lambda: _hf("t5"),
            lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5)},
            _t5("relu", False),
            hf=True,
        ),
        Entry(
            "t5_gated",
            lambda: _hf("t5_gated"),
            lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5)},
            _t5("gelu_tanh", True),
            hf=True,
        ),
        Entry(
            "vit",
            lambda: _hf("vit"),
            lambda: {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))},
            _layers("vit.layers.{}.mlp", (D, H, "gelu", False, False)),
            hf=True,
        ),
        Entry(
            "distilbert",
            lambda: _hf("distilbert"),
            lambda: {"input_ids": _ids()},
            _layers("distilbert.transformer.layer.{}.ffn", (D, H, "gelu", False, False)),
            hf=True,
        ),
        Entry(
            "albert",
            lambda: _hf("albert"),
            lambda: {"input_ids": _ids()},
            {"albert.encoder.albert_layer_groups.0.albert_layers.0": (D, H, "gelu_tanh", False, False)},
            hf=True,
        ),
        Entry(
            "torch_encoder",
            lambda: nn.TransformerEncoder(
                nn.TransformerEncoderLayer(D, 2, H, dropout=0.1, batch_first=True),
                L,
                enable_nested_tensor=False,
            ),
            _seq_x,
            _layers("layers.{}", (D, H, "relu", False, False)),
        ),
        Entry(
            "torch_transformer",
            lambda: nn.Transformer(D, 2, L, L, H, activation="gelu", batch_first=True),
            lambda: (_seq_x()[0], _seq_x()[0][:, :5]),
            {
                **_layers("encoder.layers.{}", (D, H, "gelu", False, False)),
                **_layers("decoder.layers.{}", (D, H, "gelu", False, True)),
            },
        ),
        Entry(
            "sequential",
            lambda: nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, D)),
            _seq_x,
            {"": (D, H, "relu", False, False)},
        ),
        Entry(
            "raw_linear",
            RawNet,
            lambda: (torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(4)),),
            _layers("blocks.{}", (D, H, "gelu", False, False)),
        ),
    ]
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))
