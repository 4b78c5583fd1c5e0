"""Write a converted decoder as a Hugging Face MoE checkpoint that transformers loads natively.

  LLaMA / Mistral -> Mixtral   (`MixtralForCausalLM`)
  Qwen2           -> Qwen2-MoE (`Qwen2MoeForCausalLM`)
  Qwen3           -> Qwen3-MoE (`Qwen3MoeForCausalLM`)

How transformers 5.x stores these experts (read from its modeling files): fused 3-D tensors per layer,
`mlp.experts.gate_up_proj [E, 2H, D]` (gate rows first, then up) and `mlp.experts.down_proj [E, D, H]`,
plus the router `mlp.gate.weight [E, D]` (softmax -> top-k -> renormalise for Mixtral; Qwen renormalises
when `norm_topk_prob`). That is exactly moeify's layout (w1 [E, 2H, D] with [gate; up], w2 [E, D, H],
router.weight [E, D]), so the export is a rename: no tensor is copied or transposed. (transformers 4.x and
the original Mixtral release use per-expert `experts.{e}.w1/w3/w2`; transformers 5 converts those when
loading, and loads the fused names as they are.)

What must fit (checked, with a message saying what differs): a causal-LM source of the family, MoE layers
with top-k softmax routing over a linear gate, no capacity limit, no shared experts, gated experts without
bias using the model's activation, the same expert count / k / width in every layer. Mixtral has an MoE
block in every layer; Qwen-MoE keeps dense MLPs in `mlp_only_layers`, so `--every`/`--include` are allowed
there.
Qwen2-MoE always has a sigmoid-gated shared expert: it is written with zero weights so it adds nothing.

The routing is asked of the router's capabilities, not its name: a router that claims com.microsoft.MoE
routes exactly as that op does (top-k of softmax or sigmoid scores over its logits, dropless; see
`moeify.routers.RouterCapabilities`), which is what these checkpoints' gates compute too, given a learned
gate [E, D] and softmax scores.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.io.atomic import atomic_output
from moeify.io.companions import copy_files
from moeify.io.weights import dedupe, write_safetensors
from moeify.routers.base import ORT_MOE


@dataclass(frozen=True)
class Target:
    sources: tuple[str, ...]  # source model_type values
    model_type: str
    causal_lm: str
    base: str
    every_layer: bool  # True: no dense layers allowed (Mixtral)
    expert_width_key: str  # config key of the per-expert hidden width
    num_experts_key: str
    shared_expert: bool  # Qwen2-MoE's always-present shared expert


TARGETS = {
    "mixtral": Target(("llama", "mistral"), "mixtral", "MixtralForCausalLM", "MixtralModel", True,
                      "intermediate_size", "num_local_experts", False),
    "qwen2_moe": Target(("qwen2",), "qwen2_moe", "Qwen2MoeForCausalLM", "Qwen2MoeModel", False,
                        "moe_intermediate_size", "num_experts", True),
    "qwen3_moe": Target(("qwen3",), "qwen3_moe", "Qwen3MoeForCausalLM", "Qwen3MoeModel", False,
                        "moe_intermediate_size", "num_experts", False),
}
DROP_KEYS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")
LAYER_RE = re.compile(r"^(.*?layers\.(\d+))(?:\.|$)")


def _target(fmt: str) -> Target:
    if fmt not in TARGETS:
        raise MoeifyError(f"unknown Hugging Face format {fmt!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[fmt]


def check_exportable_source(model: nn.Module, fmt: str) -> None:
    """Refuse early (before converting) a source whose architecture the target cannot represent."""
    target = _target(fmt)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in target.sources:
        raise MoeifyError(f"--format {fmt} needs a {' or '.join(target.sources)} model, got "
                          f"{model_type or type(model).__name__}; use --format moeify")
    if getattr(config, "attention_bias", False) and fmt == "mixtral":
        raise MoeifyError("--format mixtral: this model has attention biases, which Mixtral lacks; use "
                          "--format moeify")
    if getattr(config, "mlp_bias", False):
        raise MoeifyError(f"--format {fmt}: this model's MLPs have biases, which the MoE experts lack; use "
                          "--format moeify")
    name = type(model).__name__
    if not (name.endswith("ForCausalLM") or name.endswith("Model")):
        raise MoeifyError(f"--format {fmt} writes a causal LM or base model; {name} is neither: use "
                          "--format moeify")


def _moe_layers(model: nn.Module) -> dict[int, tuple[str, nn.Module]]:
    import moeify

    layers: dict[int, tuple[str, nn.Module]] = {}
    for path, module in model.named_modules():
        if isinstance(module, moeify.MoELayer):
            m = LAYER_RE.match(path)
            if m is None:
                raise MoeifyError(f"MoE layer {path} is not inside a decoder layer (layers.N); cannot map it "
                                  "to a Hugging Face MoE block")
            idx = int(m.group(2))
            if idx in layers:
                raise MoeifyError(f"decoder layer {idx} has two MoE layers ({layers[idx][0]}, {path}); a "
                                  "Hugging Face MoE block holds one")
            layers[idx] = (m.group(1) + ".mlp", module)
    return layers


def _check_layers(model: nn.Module, layers: dict, fmt: str) -> tuple[int, int, int, bool]:
    """The (experts, k, expert width, normalize) shared by all layers; MoeifyError when it does not fit."""
    target = _target(fmt)
    config = model.config
    if not layers:
        raise MoeifyError(f"--format {fmt}: the model has no MoE layer; convert it first")
    n_layers = config.num_hidden_layers
    if target.every_layer and sorted(layers) != list(range(n_layers)):
        missing = sorted(set(range(n_layers)) - set(layers))
        raise MoeifyError(f"--format {fmt} needs an MoE block in every layer, but layer(s) {missing} stay "
                          "dense; convert all FFNs (--every 1, no --include/--exclude) or use --format "
                          "moeify")
    shapes = set()
    for _, (path, layer) in sorted(layers.items()):
        c = layer.config
        problems = []
        caps = layer.router.caps
        if ORT_MOE not in caps.lowerings or not caps.learned or c.score_fn != "softmax":
            problems.append(f"router {c.router}/{c.score_fn} (needs softmax top-k token choice over a "
                            "learned gate, as topk/softmax)")
        if c.capacity_factor is not None:
            problems.append("a capacity factor (needs dropless routing)")
        if c.num_shared_experts:
            problems.append("shared experts")
        if not c.gated or c.bias:
            problems.append("plain or biased experts (needs gated, no bias)")
        if c.activation != _activation_name(config.hidden_act):
            problems.append(f"activation {c.activation} (the model uses {config.hidden_act})")
        if c.router_dtype != "float32":
            problems.append(f"router dtype {c.router_dtype}")
        if not c.normalize and fmt == "mixtral":
            problems.append("unnormalised top-k weights (Mixtral renormalises)")
        if problems:
            raise MoeifyError(f"--format {fmt}: the MoE layer {path} has {'; '.join(problems)}; convert with "
                              "--router topk and no --capacity-factor, or use --format moeify")
        shapes.add((c.num_experts, c.k, c.d_ff, c.normalize))
    if len(shapes) > 1:
        raise MoeifyError(f"--format {fmt}: the MoE layers differ in experts/k/width ({sorted(shapes)}); a "
                          "Hugging Face config has one value for all layers: use --format moeify")
    return shapes.pop()


HF_ACTIVATIONS = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _activation_name(hidden_act: str) -> str:
    return HF_ACTIVATIONS.get(hidden_act, hidden_act)


def hf_config(model: nn.Module, fmt: str):
    """The target config: the source's config with the MoE fields set."""
    import transformers

    target = _target(fmt)
    layers = _moe_layers(model)
    experts, k, width, normalize = _check_layers(model, layers, fmt)
    values = {key: v for key, v in model.config.to_dict().items() if key not in DROP_KEYS}
    values.update({target.num_experts_key: experts, "num_experts_per_tok": k,
                   target.expert_width_key: width, "router_jitter_noise": 0.0,
                   "output_router_logits": False})
    if fmt != "mixtral":
        values.update(norm_topk_prob=normalize, decoder_sparse_step=1,
                      mlp_only_layers=sorted(set(range(model.config.num_hidden_layers)) - set(layers)))
        if fmt == "qwen2_moe":
            values["shared_expert_intermediate_size"] = 1  # zero weights: contributes exactly 0
            values["qkv_bias"] = True  # Qwen2 attention has q/k/v biases
    is_lm = type(model).__name__.endswith("ForCausalLM")
    values["architectures"] = [target.causal_lm if is_lm else target.base]
    return transformers.AutoConfig.for_model(target.model_type, **values), layers


def hf_state_dict(model: nn.Module, fmt: str, layers: dict) -> dict[str, torch.Tensor]:
    """The converted model's tensors under the target's names (views, no copies, but for the routers: the
    target has one per layer, so a router shared by several layers (share_router) is written for each)."""
    target = _target(fmt)
    prefixes = tuple(hf_mlp + "." for hf_mlp, _ in layers.values())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(prefixes)}
    for hf_mlp, layer in layers.values():
        state[f"{hf_mlp}.gate.weight"] = layer.router.weight.detach().clone()  # [E, D]: small
        w1, w2 = layer.expert_weights()  # [E, 2H, D], [E, D, H] (MPO experts: contracted)
        state[f"{hf_mlp}.experts.gate_up_proj"] = w1.detach()
        state[f"{hf_mlp}.experts.down_proj"] = w2.detach()
        if target.shared_expert:
            d_model, dtype = layer.config.d_model, w1.dtype
            for name in ("gate_proj", "up_proj"):
                state[f"{hf_mlp}.shared_expert.{name}.weight"] = torch.zeros(1, d_model, dtype=dtype)
            state[f"{hf_mlp}.shared_expert.down_proj.weight"] = torch.zeros(d_model, 1, dtype=dtype)
            state[f"{hf_mlp}.shared_expert_gate.weight"] = torch.zeros(1, d_model, dtype=dtype)
    return state


def export_hf(model: nn.Module, path: str | Path, fmt: str, *, force: bool = False, inputs: tuple = (),
              progress: Callable[[int, int], None] | None = None, extra_files: Iterable[Path] = ()) -> Path:
    """Write `model` (converted from a LLaMA/Mistral/Qwen2/Qwen3 source) as a `fmt` checkpoint at `path`,
    with `extra_files` (e.g. the source's tokenizer) copied in unless the checkpoint has a file so named."""
    check_exportable_source(model, fmt)
    config, layers = hf_config(model, fmt)
    state, _ = dedupe(hf_state_dict(model, fmt, layers))
    path = Path(path)
    with atomic_output(path, directory=True, force=force, inputs=inputs) as tmp:
        config.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(str(tmp))
        write_safetensors(state, tmp, progress=progress)
        copy_files(extra_files, tmp, skip=os.listdir(tmp))
    return path
