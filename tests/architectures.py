"""Held-out architectures for tests/passes/test_architectures.py: tiny models built from transformers
*configs* (no download), with example inputs and what moeify must find in each.

Tiny: hidden 32, 2 layers, vocab 100. `ARCHS[name]` = (model class, config class, config kwargs, input
kind); `EXPECTED[name]` says what `find_ffns` reports there (`Found`), `REJECTED[name]` why it finds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers as T

D, H, L, V = 32, 64, 2, 100
IDS = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))
DEC = dict(
    vocab_size=V,
    hidden_size=D,
    intermediate_size=H,
    num_hidden_layers=L,
    num_attention_heads=2,
    num_key_value_heads=2,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    max_position_embeddings=64,
)
TOK = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)


def enc(**kw):
    return dict(
        vocab_size=V, hidden_size=D, intermediate_size=H, num_hidden_layers=L, num_attention_heads=2, **kw
    )


# the shape every encoder-decoder of the zoo shares
S2S_SHAPE = dict(
    vocab_size=V,
    d_model=D,
    encoder_layers=L,
    decoder_layers=L,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=H,
    decoder_ffn_dim=H,
)
S2S = dict(
    **S2S_SHAPE,
    max_position_embeddings=64,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
T5 = dict(vocab_size=V, d_model=D, d_ff=H, num_layers=L, num_heads=2, d_kv=16, decoder_start_token_id=0)

ARCHS = {
    "mistral": (T.MistralForCausalLM, T.MistralConfig, DEC, "gen"),
    "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config, DEC, "gen"),
    "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config, {**DEC, "head_dim": 16}, "gen"),
    "gemma": (T.GemmaForCausalLM, T.GemmaConfig, {**DEC, "head_dim": 16}, "gen"),
    "gemma2": (T.Gemma2ForCausalLM, T.Gemma2Config, {**DEC, "head_dim": 16}, "gen"),
    "phi": (T.PhiForCausalLM, T.PhiConfig, DEC, "gen"),
    "phi3": (T.Phi3ForCausalLM, T.Phi3Config, DEC, "gen"),
    "olmo": (T.OlmoForCausalLM, T.OlmoConfig, DEC, "gen"),
    "granite": (T.GraniteForCausalLM, T.GraniteConfig, DEC, "gen"),
    "stablelm": (T.StableLmForCausalLM, T.StableLmConfig, DEC, "gen"),
    "falcon": (
        T.FalconForCausalLM,
        T.FalconConfig,
        dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=2, **TOK),
        "gen",
    ),
    "gpt_neox": (
        T.GPTNeoXForCausalLM,
        T.GPTNeoXConfig,
        dict(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            max_position_embeddings=64,
            **TOK,
        ),
        "gen",
    ),
    "gptj": (
        T.GPTJForCausalLM,
        T.GPTJConfig,
        dict(vocab_size=V, n_embd=D, n_layer=L, n_head=2, rotary_dim=8, n_positions=64, **TOK),
        "gen",
    ),
    "gpt_neo": (
        T.GPTNeoForCausalLM,
        T.GPTNeoConfig,
        dict(
            vocab_size=V,
            hidden_size=D,
            num_layers=L,
            num_heads=2,
            max_position_embeddings=64,
            attention_types=[[["global", "local"], 1]],
            **TOK,
        ),
        "gen",
    ),
    "bloom": (
        T.BloomForCausalLM,
        T.BloomConfig,
        dict(vocab_size=V, hidden_size=D, n_layer=L, n_head=2, **TOK),
        "gen",
    ),
    "opt": (
        T.OPTForCausalLM,
        T.OPTConfig,
        dict(
            vocab_size=V,
            hidden_size=D,
            ffn_dim=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            word_embed_proj_dim=D,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=1,
        ),
        "gen",
    ),
    "nemotron": (T.NemotronForCausalLM, T.NemotronConfig, {**DEC, "head_dim": 16}, "gen"),
    "arcee": (T.ArceeForCausalLM, T.ArceeConfig, DEC, "gen"),
    "mixtral": (T.MixtralForCausalLM, T.MixtralConfig, {**DEC, "num_local_experts": 4}, "gen"),
    "roberta": (
        T.RobertaForSequenceClassification,
        T.RobertaConfig,
        enc(max_position_embeddings=64, pad_token_id=1),
        "enc",
    ),
    "electra": (T.ElectraForPreTraining, T.ElectraConfig, enc(embedding_size=16), "enc"),
    "deberta_v2": (T.DebertaV2ForSequenceClassification, T.DebertaV2Config, enc(), "enc"),
    "mobilebert": (
        T.MobileBertForSequenceClassification,
        T.MobileBertConfig,
        enc(embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16),
        "enc",
    ),
    "xlm_roberta": (
        T.XLMRobertaModel,
        T.XLMRobertaConfig,
        enc(max_position_embeddings=64, pad_token_id=1),
        "enc",
    ),
    "modernbert": (
        T.ModernBertModel,
        T.ModernBertConfig,
        dict(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            cls_token_id=0,
            sep_token_id=0,
            **TOK,
        ),
        "enc",
    ),
    "bart": (T.BartForConditionalGeneration, T.BartConfig, S2S, "s2s"),
    "mbart": (T.MBartForConditionalGeneration, T.MBartConfig, S2S, "s2s"),
    "pegasus": (T.PegasusForConditionalGeneration, T.PegasusConfig, S2S, "s2s"),
    "marian": (T.MarianMTModel, T.MarianConfig, S2S, "s2s"),
    "mt5": (T.MT5ForConditionalGeneration, T.MT5Config, T5, "s2s"),
    "umt5": (T.UMT5ForConditionalGeneration, T.UMT5Config, T5, "s2s"),
    "whisper": (
        T.WhisperForConditionalGeneration,
        T.WhisperConfig,
        dict(
            **S2S_SHAPE,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            decoder_start_token_id=0,
            **TOK,
        ),
        "whisper",
    ),
    "clip_text": (
        T.CLIPTextModel,
        T.CLIPTextConfig,
        dict(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            max_position_embeddings=64,
        ),
        "enc",
    ),
    "clip_vision": (
        T.CLIPVisionModel,
        T.CLIPVisionConfig,
        dict(
            hidden_size=D,
            intermediate_size=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),
        "img",
    ),
    "swin": (
        T.SwinModel,
        T.SwinConfig,
        dict(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2),
        "img",
    ),
    "convnext": (
        T.ConvNextModel,
        T.ConvNextConfig,
        dict(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1]),
        "img",
    ),
    "wav2vec2": (
        T.Wav2Vec2Model,
        T.Wav2Vec2Config,
        dict(
            hidden_size=D,
            intermediate_size=H,
            num_hidden_layers=L,
            num_attention_heads=2,
            conv_dim=(16, 16),
            conv_stride=(5, 2),
            conv_kernel=(10, 3),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
        ),
        "audio",
    ),
}


@dataclass(frozen=True)
class Found:
    """What find_ffns must report: FFN names in module order (when they hold `{}`, each name stands for
    every layer index in turn), their activation and gating, how many are causal (None: all of
    them for decoder-only models, none for the rest), and near misses: a rejected candidate's name ->
    words its reason must contain."""

    names: tuple[str, ...]
    activation: str
    gated: bool
    causal: int | None = None
    near_misses: tuple[tuple[str, str], ...] = ()

    def expected_names(self) -> list[str]:
        if "{}" not in self.names[0]:
            return list(self.names)
        return [n.format(i) for n in self.names for i in range(L)]


_MOBILEBERT_FFNS = (".ffn.0", ".ffn.1", ".ffn.2")
_S2S = ("model.encoder.layers.{}", "model.decoder.layers.{}")
_T5 = ("encoder.block.{}.layer.1.DenseReluDense", "decoder.block.{}.layer.2.DenseReluDense")

EXPECTED: dict[str, Found] = {
    **{n: Found(("model.layers.{}.mlp",), "silu", True)
       for n in ("mistral", "qwen2", "qwen3", "phi3", "olmo", "granite", "stablelm")},
    # squared ReLU (transformers' ReLUSquaredActivation), a named activation since issue 13
    **{n: Found(("model.layers.{}.mlp",), "relu2", False) for n in ("nemotron", "arcee")},
    "gemma": Found(("model.layers.{}.mlp",), "gelu_tanh", True),
    "gemma2": Found(("model.layers.{}.mlp",), "gelu_tanh", True),
    "phi": Found(("model.layers.{}.mlp",), "gelu_tanh", False),
    "falcon": Found(("transformer.h.{}.mlp",), "gelu", False),
    "gpt_neox": Found(("gpt_neox.layers.{}.mlp",), "gelu", False),
    "gptj": Found(("transformer.h.{}.mlp",), "gelu_tanh", False),
    "gpt_neo": Found(("transformer.h.{}.mlp",), "gelu_tanh", False),
    "bloom": Found(("transformer.h.{}.mlp",), "gelu_tanh", False),
    "opt": Found(("model.decoder.layers.{}",), "relu", False),
    "roberta": Found(("roberta.encoder.layer.{}",), "gelu", False,
                     near_misses=(("classifier", "not back to the input width"),)),
    "electra": Found(("electra.encoder.layer.{}",), "gelu", False,
                     near_misses=(("discriminator_predictions", "not back to the input width"),)),
    "deberta_v2": Found(("deberta.encoder.layer.{}",), "gelu", False),
    # MobileBERT: 3 stacked FFNs per layer plus the layer's own (intermediate -> output)
    "mobilebert": Found(
        tuple(f"mobilebert.encoder.layer.{i}{sub}" for i in range(L) for sub in ("", *_MOBILEBERT_FFNS)),
        "relu", False,
    ),
    "xlm_roberta": Found(("encoder.layer.{}",), "gelu", False),
    "modernbert": Found(("layers.{}.mlp",), "gelu", True),
    **{n: Found(_S2S, "gelu", False, causal=L) for n in ("bart", "mbart", "pegasus", "marian", "whisper")},
    "mt5": Found(_T5, "gelu_tanh", True, causal=L),
    "umt5": Found(_T5, "gelu_tanh", True, causal=L),
    "clip_text": Found(("encoder.layers.{}.mlp",), "quick_gelu", False),
    "clip_vision": Found(("encoder.layers.{}.mlp",), "quick_gelu", False),
    "swin": Found(("encoder.layers.{}.blocks.0.mlp",), "gelu", False),
    "convnext": Found(("encoder.stages.{}.layers.0",), "gelu", False),
    "wav2vec2": Found(("encoder.layers.{}.feed_forward",), "gelu", False),
}

# Architectures where moeify converts nothing today, with words every rejection's reason must contain
# (None: nothing there looks like a dense FFN, so there is nothing to explain).
REJECTED: dict[str, str | None] = {
    # already an MoE: its experts are stacked parameter tensors, not linear layers
    "mixtral": None,
}


def inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "gen": lambda: dict(input_ids=IDS),
        "enc": lambda: dict(input_ids=IDS),
        "s2s": lambda: dict(input_ids=IDS, decoder_input_ids=IDS[:, :4]),
        "img": lambda: dict(pixel_values=torch.randn(2, 3, 16, 16, generator=g)),
        "audio": lambda: dict(input_values=torch.randn(2, 400, generator=g)),
        "whisper": lambda: dict(
            input_features=torch.randn(2, 8, 32, generator=g), decoder_input_ids=IDS[:, :4]
        ),
    }[kind]()


def output(o) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if getattr(o, attr, None) is not None:
            return getattr(o, attr)
    return o[0]


def build(name: str) -> torch.nn.Module:
    cls, cfg_cls, kw, _ = ARCHS[name]
    torch.manual_seed(0)
    return cls(cfg_cls(**kw)).eval()
