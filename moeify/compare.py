"""Run two models on the same example inputs and measure how far their outputs are apart.

`example_inputs(model)` guesses inputs from the model itself: token ids for a Hugging Face text model or a
model that starts with an embedding, pixels for a vision config, else floats of the first layer's width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeify.errors import MoeifyError

Tensor = torch.Tensor


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, Tensor]:
    """Keyword inputs for `model(**inputs)`; MoeifyError when the input kind cannot be guessed."""
    gen = torch.Generator().manual_seed(seed)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        name = getattr(model, "main_input_name", "input_ids")
        if name == "input_ids":
            vocab = getattr(config, "vocab_size", None) or 100
            ids = torch.randint(0, vocab, (batch, seq), generator=gen)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if name == "pixel_values":
            size = getattr(config, "image_size", 32)
            size = size if isinstance(size, int) else size[0]
            channels = getattr(config, "num_channels", 3)
            return {"pixel_values": torch.randn(batch, channels, size, size, generator=gen)}
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return {"__positional__": torch.randint(0, m.num_embeddings, (batch, seq), generator=gen)}
        if isinstance(m, nn.Linear):
            return {"__positional__": torch.randn(batch, seq, m.in_features, generator=gen).to(dtype)}
    raise MoeifyError(f"cannot guess example inputs for {type(model).__name__} (no embedding or linear "
                      "layer found)")


@torch.no_grad()
def run_model(model: nn.Module, inputs: dict[str, Tensor]):
    try:
        if "__positional__" in inputs:
            return model(inputs["__positional__"])
        return model(**inputs)
    except Exception as e:
        name = type(model).__name__
        raise MoeifyError(f"running {name} on example inputs failed: {type(e).__name__}: {e}") from e


def flatten_outputs(out, prefix: str = "output") -> dict[str, Tensor]:
    """Floating-point tensors of a model output (tensor, tuple, dict, ModelOutput), by name."""
    if isinstance(out, Tensor):
        return {prefix: out} if out.is_floating_point() else {}
    items = []
    if isinstance(out, dict):  # also transformers' ModelOutput (an OrderedDict)
        items = [(f"{k}" if prefix == "output" else f"{prefix}.{k}", v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        items = [(f"{prefix}[{i}]", v) for i, v in enumerate(out)]
    flat: dict[str, Tensor] = {}
    for name, value in items:
        flat.update(flatten_outputs(value, name))
    return flat


@dataclass(frozen=True)
class Difference:
    name: str  # which output
    max_abs: float  # largest |a - b|
    max_ref: float  # largest |a| (scale of the reference)

    @property
    def relative(self) -> float:
        return self.max_abs / max(self.max_ref, 1e-12)


def compare_outputs(a, b) -> list[Difference]:
    """Per common floating output: largest absolute difference. Outputs must have matching shapes."""
    fa, fb = flatten_outputs(a), flatten_outputs(b)
    common = [k for k in fa if k in fb]
    if not common:
        raise MoeifyError("the two models have no output in common to compare")
    diffs = []
    for name in common:
        x, y = fa[name].float(), fb[name].float()
        if x.shape != y.shape:
            raise MoeifyError(f"output {name} has shape {tuple(x.shape)} vs {tuple(y.shape)}; the models do "
                              "not compute the same thing")
        diffs.append(Difference(name, float((x - y).abs().max()) if x.numel() else 0.0,
                                float(x.abs().max()) if x.numel() else 0.0))
    return diffs
