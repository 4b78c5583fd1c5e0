"""The dense-equivalent Hugging Face folder of a converted decoder, for ONNX Runtime GenAI's builder.

The builder knows dense decoders only. We hand it the converted model's *skeleton*: the same config and
tensors, with each MoE layer replaced by a dense MLP of one expert's width holding expert 0's weights. The
builder then emits its fast dense graph (fused attention with the KV cache, int4/int8 linears), and
`moeify.genai.surgery` swaps each of those placeholder MLPs for the router + MoE/QMoE op. The placeholder
weights are dropped there, so which expert fills them does not matter; expert 0 keeps the shapes real.

Only architectures whose MLP is the LLaMA-style gated `down(silu(gate(x)) * up(x))` and whose builder graph
names the MLP `/model/layers.N/mlp/...` are taken (see BUILDER_ARCHITECTURES).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.io.companions import TOKENIZER_FILES, copy_files

# HF causal-LM classes the builder converts and whose MLP the surgery recognises.
BUILDER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MLP_PATH = re.compile(r"^(?:.*\.)?layers\.(\d+)\.mlp$")


@dataclass(frozen=True)
class MoESite:
    """One MoE layer of the decoder: its decoder layer index, module path and the layer itself."""

    index: int
    path: str
    layer: nn.Module


def moe_sites(model: nn.Module) -> list[MoESite]:
    """The MoE layers of a converted decoder, each the `mlp` of a decoder layer; MoeifyError otherwise."""
    from moeify.layer import MoELayer

    sites = []
    for path, module in model.named_modules():
        if not isinstance(module, MoELayer):
            continue
        match = MLP_PATH.match(path)
        if match is None:
            raise MoeifyError(
                f"MoE layer {path} is not a decoder layer's mlp (layers.N.mlp); the GenAI export "
                "replaces whole MLPs only"
            )
        sites.append(MoESite(int(match.group(1)), path, module))
    if not sites:
        raise MoeifyError(
            "the model has no MoE layer; convert it first (moeify convert) or use the "
            "onnxruntime_genai builder on the dense model directly"
        )
    return sites


def builder_refusal(model: nn.Module) -> str | None:
    """None when the builder route takes `model`, else why not (one line)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None or not hasattr(config, "to_dict"):
        return f"{name} has no transformers config"
    if name not in BUILDER_ARCHITECTURES:
        return f"the builder route covers {', '.join(BUILDER_ARCHITECTURES)}, not {name}"
    if getattr(config, "mlp_bias", False):
        return "this model's MLPs have biases, which the builder's LLaMA MLP lacks"
    return surgery_refusal(model)


def surgery_refusal(model: nn.Module) -> str | None:
    """None when surgery can place every MoE layer of `model` (sites, one expert width, a router the op
    expresses), else why not (their MoeifyError's line)."""
    from moeify.genai.router_logits import router_logits

    try:
        sites = moe_sites(model)
        expert_width(model, sites)
        for site in sites:
            router_logits(site.layer, model.config.vocab_size, site.path)
    except MoeifyError as e:
        return str(e).removeprefix("--genai: ")
    return None


def check_architecture(model: nn.Module) -> str:
    """The HF class name of a decoder the builder route takes; a one-line MoeifyError saying why not."""
    why = builder_refusal(model)
    if why is not None:
        raise MoeifyError(f"--genai: {why}")
    return type(model).__name__


def dense_state(model: nn.Module, sites: list[MoESite]) -> dict[str, torch.Tensor]:
    """The model's tensors with each MoE layer's replaced by a dense MLP holding expert 0 (contiguous
    copies, as safetensors needs, of whatever dtype the model has)."""
    prefixes = tuple(site.path + "." for site in sites)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for site in sites:
        H = site.layer.config.d_ff
        w1 = site.layer.w1.detach()[0]  # [2H, D]: rows [gate; up]
        state[f"{site.path}.gate_proj.weight"] = w1[:H].contiguous()  # [H, D]
        state[f"{site.path}.up_proj.weight"] = w1[H:].contiguous()  # [H, D]
        state[f"{site.path}.down_proj.weight"] = site.layer.w2.detach()[0].contiguous()  # [D, H]
    return state


def expert_width(model: nn.Module, sites: list[MoESite]) -> int:
    """The one MLP width the dense config can state: the experts' (all equal), which must also be the
    width of any MLP left dense."""
    widths = {site.layer.config.d_ff for site in sites}
    if len(widths) > 1:
        raise MoeifyError(
            f"--genai: the MoE layers have different expert widths {sorted(widths)}; a GenAI "
            "decoder states one MLP width"
        )
    width = widths.pop()
    dense_layers = model.config.num_hidden_layers - len(sites)
    if dense_layers and width != model.config.intermediate_size:
        raise MoeifyError(
            f"--genai: experts of width {width} next to {dense_layers} dense MLP(s) of width "
            f"{model.config.intermediate_size}; convert every layer or use init copy"
        )
    return width


def write_skeleton(model: nn.Module, sites: list[MoESite], out: Path, tokenizer_dir: Path) -> None:
    """Write the dense-equivalent HF folder (config, weights, tokenizer files) into `out`."""
    from safetensors.torch import save_file

    config = model.config.to_dict()
    config.update(intermediate_size=expert_width(model, sites), architectures=[type(model).__name__])
    dense_config = type(model.config)(**{k: v for k, v in config.items() if k != "transformers_version"})
    out.mkdir(parents=True, exist_ok=True)
    dense_config.save_pretrained(str(out))
    state = dense_state(model, sites)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: transformers re-ties it from the embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    copied = copy_tokenizer(tokenizer_dir, out)
    if not copied:
        raise MoeifyError(
            f"no tokenizer files in {tokenizer_dir} (looked for {', '.join(TOKENIZER_FILES[:3])}, "
            "...); pass the source model's folder as the tokenizer (--tokenizer DIR)"
        )


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer files present in `src` to `dst`; returns their names."""
    return copy_files([Path(src) / n for n in TOKENIZER_FILES if (Path(src) / n).is_file()], dst)
