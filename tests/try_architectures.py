"""Try moeify on more architectures as a new user would: a tiny model from a transformers config (no
download), find_ffns, explain_ffns, convert (copy, top-2 of 4), compare outputs, generate.

    python tests/try_architectures.py [name ...]

Not collected by pytest (a survey, not a test).
"""

import sys
import time
import traceback
import warnings

import torch
import transformers as T

import moeify

warnings.filterwarnings("ignore")
T.logging.set_verbosity_error()
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


S2S = dict(
    vocab_size=V,
    d_model=D,
    encoder_layers=L,
    decoder_layers=L,
    encoder_attention_heads=2,
    decoder_attention_heads=2,
    encoder_ffn_dim=H,
    decoder_ffn_dim=H,
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
    "mixtral (already MoE)": (T.MixtralForCausalLM, T.MixtralConfig, {**DEC, "num_local_experts": 4}, "gen"),
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
            vocab_size=V,
            d_model=D,
            encoder_layers=L,
            decoder_layers=L,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=H,
            decoder_ffn_dim=H,
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


def inputs(kind):
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


def out(o):
    for attr in ("logits", "last_hidden_state"):
        if getattr(o, attr, None) is not None:
            return getattr(o, attr)
    return o[0]


def main(names):
    for name in names:
        cls, cfg_cls, kw, kind = ARCHS[name]
        t = time.time()
        try:
            torch.manual_seed(0)
            model = cls(cfg_cls(**kw)).eval()
        except Exception as exc:
            print(f"{name:22} BUILD FAILED {type(exc).__name__}: {str(exc)[:150]}")
            continue
        try:
            found, rejected = moeify.find_ffns(model), moeify.explain_ffns(model)
            x = inputs(kind)
            with torch.no_grad():
                ref = out(model(**x))
            line = f"{name:22} found {len(found)}"
            if found:
                f = found[0]
                line += (
                    f" e.g. {f.name} ({f.d_model}->{f.d_ff}, {f.activation}{', gated' if f.gated else ''}, "
                    f"{f.rule}/{f.rewrite}{', causal' if f.causal else ''})"
                )
            if rejected:
                line += f"; {len(rejected)} rejected e.g. {rejected[0]}"
            if found:
                moe = moeify.convert(model, experts=4, k=2)
                with torch.no_grad():
                    err = float((out(moe(**x)) - ref).norm() / ref.norm())
                line += (
                    f"; convert: {moeify.conversion_report(moe).summary}, rel err {err:.1e}, "
                    f"class kept {type(moe) is type(model)}"
                )
                if kind == "gen":
                    with torch.no_grad():
                        a = model.generate(IDS[:1, :3], max_new_tokens=4, do_sample=False)
                        b = moe.generate(IDS[:1, :3], max_new_tokens=4, do_sample=False)
                    line += f", generate same {torch.equal(a, b)}"
            print(line + f" [{time.time() - t:.1f}s]", flush=True)
        except Exception as exc:
            print(f"{name:22} ERROR {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=-3)


if __name__ == "__main__":
    main(sys.argv[1:] or list(ARCHS))
