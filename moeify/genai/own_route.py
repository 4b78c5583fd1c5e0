"""The GenAI folder of a decoder ONNX Runtime GenAI's builder does not know: moeify's own export with explicit
past/present KV.

Shape legend: B batch, S new positions, P past positions, N = P + S, Hk key/value heads, Dh head size.

`FlatKVDecoder` (moeify.genai.kv_cache) wraps the model so its cache is flat tensors; `export_onnx` traces it
(torch.export, dynamic batch, new, past and total positions) and lowers each MoE layer as any export does
(com.microsoft.MoE where the router allows, moeify's ops otherwise); the graph's inputs and outputs are then
renamed to GenAI's names, and genai_config.json (model type "decoder") and the tokenizer files are written
beside it. The attention stays the model's own ops (no fused kernel), so this route is the portable one and
the builder route the fast one. At int8/int4 the fp32 graph is weight-only quantised afterwards
(moeify.genai.own_quant: MatMulNBits linears, loop or QMoE experts).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from moeify.errors import MoeifyError
from moeify.genai.genai_config import decoder_config, input_names, output_names
from moeify.genai.kv_cache import CacheShape, FlatKVDecoder, probe_cache, takes_position_ids
from moeify.io.atomic import atomic_output

OWN_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
QUANTISED = ("int8", "int4")  # exported at fp32, then weight-only quantised
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
EXAMPLE_B, EXAMPLE_S, EXAMPLE_P = 2, 3, 4  # none is 0 or 1: torch.export specialises those sizes


def own_route_check(model: nn.Module) -> tuple[CacheShape | None, str | None]:
    """(the cache shape, None) when the own route takes `model`, else (None, why not)."""
    from moeify.layer import MoELayer

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "can_generate"):
        return None, f"{type(model).__name__} is not a transformers model"
    if not model.can_generate():
        return None, f"{type(model).__name__} is not a causal language model (it cannot generate)"
    for path, layer in model.named_modules():
        if isinstance(layer, MoELayer) and layer.router.caps.mixes_tokens:
            return None, (
                f"{path}'s router {layer.router.name!r} mixes tokens, so one token's output depends on the "
                "others in its forward and a cached decode would differ from the full one"
            )
    return probe_cache(model)


def example_inputs(model: nn.Module, shape: CacheShape, dtype: torch.dtype) -> tuple:
    B, S, P = EXAMPLE_B, EXAMPLE_S, EXAMPLE_P
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, S), generator=g)  # [B, S]
    mask = torch.ones(B, P + S, dtype=torch.long)  # [B, N]
    past = [
        torch.randn(B, shape.kv_heads, P, shape.head_size, generator=g).to(dtype)
        for _ in range(2 * shape.num_layers)
    ]  # 2L x [B, Hk, P, Dh]
    if takes_position_ids(model):
        return (ids, mask, torch.arange(P, P + S).expand(B, S), past)  # positions [B, S]
    return (ids, mask, past)


def dynamic_shapes(shape: CacheShape, position_ids: bool) -> tuple:
    Dim = torch.export.Dim
    batch, new, past, total = (
        Dim("batch"),
        Dim("sequence"),
        Dim("past_sequence", min=0),
        Dim("total_sequence"),
    )
    past_specs = [{0: batch, 2: past} for _ in range(2 * shape.num_layers)]
    rest = ({0: batch, 1: new}, past_specs) if position_ids else (past_specs,)
    return ({0: batch, 1: new}, {0: batch, 1: total}, rest)  # as FlatKVDecoder.forward takes them


def rename_io(path: Path, out: Path, shape: CacheShape, position_ids: bool) -> None:
    """Give the exported graph at `path` GenAI's input/output names; save it at `out` with external data."""
    import onnx_ir as ir

    graph_model = ir.load(str(path))
    for names, values in (
        (input_names(shape, position_ids), graph_model.graph.inputs),
        (output_names(shape), graph_model.graph.outputs),
    ):
        if len(names) != len(values):  # a bug, not a user error
            raise RuntimeError(
                f"exported graph has {len(values)} inputs/outputs where {len(names)} were expected"
            )
        for value, name in zip(values, names, strict=True):
            value.name = name
    ir.save(graph_model, str(out), external_data=DATA_FILE)


def write_quantised(fp32_graph: Path, out: Path, precision: str, experts_op: str, provider: str) -> None:
    """The own route's fp32 graph at `fp32_graph` quantised to `precision`, saved at `out` (+ DATA_FILE)."""
    import onnx

    from moeify.genai.own_quant import quantize_own_graph

    accuracy_level = 4 if provider == "cpu" else 0  # int8 activations on CPU, as the builder
    save_graph(quantize_own_graph(onnx.load(str(fp32_graph)), precision, experts_op, accuracy_level), out)


def save_graph(graph, out: Path) -> None:
    """Save an `onnx.ModelProto` at `out` as a GenAI folder holds it: tensors over 1 KiB in DATA_FILE."""
    import onnx

    onnx.save(graph, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE,
              size_threshold=1024)


def export_own(
    model: nn.Module,
    shape: CacheShape,
    out_dir: Path,
    *,
    precision: str,
    provider: str,
    tokenizer_dir: Path,
    force: bool,
    experts_op: str = "auto",
) -> Path:
    """Write `model` (eval mode, checked by `own_route_check`) as a GenAI folder at `out_dir`; experts_op
    as `export_genai`'s (int8/int4 only: fp32/fp16 keep the exported com.microsoft.MoE)."""
    from moeify.genai.skeleton import copy_tokenizer
    from moeify.lowering.export import export_onnx

    if precision not in OWN_PRECISIONS and precision not in QUANTISED:
        raise MoeifyError(
            f"--genai: moeify's own KV-cache export writes fp32, fp16, int8 or int4, not {precision}"
        )
    dtype = OWN_PRECISIONS.get(precision, torch.float32)
    position_ids = takes_position_ids(model)
    wrapper = FlatKVDecoder(model, shape.num_layers)
    with atomic_output(Path(out_dir), directory=True, force=force) as tmp:
        if not copy_tokenizer(Path(tokenizer_dir), tmp):  # before the slow export
            raise MoeifyError(
                f"no tokenizer files in {tokenizer_dir}; pass the source model's folder as the tokenizer "
                "(--tokenizer DIR)"
            )
        with tempfile.TemporaryDirectory(prefix="moeify-genai-") as scratch:
            traced = Path(scratch) / MODEL_FILE
            with warnings.catch_warnings():  # torch.export names each shared dynamic axis once: fine here
                warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
                # token-id hooks keep input_ids on the wrapped model (export_onnx hides this for a bare one)
                warnings.filterwarnings("ignore", message=r"The tensor attribute self\.model\._moeify")
                export_onnx(
                    wrapper,
                    example_inputs(model, shape, dtype),
                    traced,
                    dtype=dtype,
                    dynamic_shapes=dynamic_shapes(shape, position_ids),
                )
            if precision in QUANTISED:
                renamed = Path(scratch) / "renamed" / MODEL_FILE
                renamed.parent.mkdir()
                rename_io(traced, renamed, shape, position_ids)
                write_quantised(renamed, tmp / MODEL_FILE, precision, experts_op, provider)
            else:
                rename_io(traced, tmp / MODEL_FILE, shape, position_ids)
        config = decoder_config(
            model, shape, position_ids=position_ids, filename=MODEL_FILE, provider=provider
        )
        (tmp / "genai_config.json").write_text(json.dumps(config, indent=4))
    return Path(out_dir)
