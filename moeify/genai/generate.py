"""Generate from a GenAI folder with ONNX Runtime GenAI, streaming text pieces and timing the two phases.

Prefill is `append_tokens` of the whole prompt (one forward that fills the KV cache); decode is the loop of
`generate_next_token`, one forward per new token.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moeify.errors import MoeifyError


@dataclass(frozen=True)
class GenerationResult:
    tokens: list[int]  # the new tokens only
    prompt_tokens: int
    prefill_ms: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        return len(self.tokens) / self.decode_s if self.decode_s > 0 else float("inf")


def load_model(folder):
    """`onnxruntime_genai.Model` of a GenAI folder; MoeifyError when it is not one or the runtime
    is missing."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MoeifyError("generating needs onnxruntime-genai: pip install 'moeify[genai]'") from None
    if not (Path(folder) / "genai_config.json").is_file():
        raise MoeifyError(
            f"{folder} is not an ONNX Runtime GenAI folder (no genai_config.json); write one with "
            "moeify export MODEL -o DIR --genai"
        )
    return og.Model(str(folder))


def generate(
    model,
    prompt_ids,
    *,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    sample: bool = False,
    temperature: float = 1.0,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Generate up to `max_new_tokens` after `prompt_ids` (a list of ints) with an `onnxruntime_genai.Model`;
    greedy unless `sample`; eos cannot stop it before `min_new_tokens`. `on_token(id)` is called for each
    new token as it comes."""
    import numpy as np
    import onnxruntime_genai as og

    if max_new_tokens < 1:
        raise MoeifyError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids:
        raise MoeifyError("the prompt is empty after tokenisation")
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=len(prompt_ids) + max_new_tokens,
        min_length=len(prompt_ids) + min_new_tokens,
        do_sample=sample,
        temperature=temperature,
    )
    generator = og.Generator(model, params)
    start = time.perf_counter()
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32)[None])  # [1, S] prefill
    prefill_ms = (time.perf_counter() - start) * 1e3
    tokens: list[int] = []
    start = time.perf_counter()
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return GenerationResult(tokens, len(prompt_ids), prefill_ms, time.perf_counter() - start)


def generate_text(
    folder,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 1.0,
    on_text: Callable[[str], None] | None = None,
) -> GenerationResult:
    """Tokenise `prompt` with the folder's tokenizer, generate, and stream decoded text pieces to
    `on_text`."""
    import onnxruntime_genai as og

    model = load_model(folder)
    tokenizer = og.Tokenizer(model)
    stream = tokenizer.create_stream()
    ids = [int(i) for i in tokenizer.encode(prompt)]

    def emit(token: int) -> None:
        if on_text is not None:
            on_text(stream.decode(token))

    return generate(
        model, ids, max_new_tokens=max_new_tokens, sample=sample, temperature=temperature, on_token=emit
    )
