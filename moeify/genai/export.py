"""`export_genai`: a converted decoder as an ONNX Runtime GenAI folder (model.onnx + external data,
genai_config.json, tokenizer files) that `onnxruntime_genai.Model(dir)` loads and generates with.

Two routes (moeify.genai.routes): the builder route, and for decoders the builder does not know, moeify's
own export with explicit past/present KV (moeify.genai.own_route).

The builder route: write the dense-equivalent skeleton (moeify.genai.skeleton), let ONNX Runtime GenAI's
builder make its fast dense graph with the KV cache (moeify.genai.builder), then replace each MLP by the
router and MoE/QMoE (moeify.genai.surgery). Everything happens in a temporary folder next to `out_dir`,
renamed into place at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import onnx
from torch import nn

from moeify.errors import MoeifyError
from moeify.genai.builder import check_target, require_genai, run_builder
from moeify.genai.own_route import DATA_FILE, MODEL_FILE, export_own, save_graph
from moeify.genai.router_logits import router_logits
from moeify.genai.routes import choose_route
from moeify.genai.skeleton import moe_sites, write_skeleton
from moeify.genai.surgery import ExpertLayer, replace_mlps, resolve_experts_op
from moeify.io.atomic import atomic_output, check_destination


def expert_layers(model: nn.Module, sites) -> list[ExpertLayer]:
    """The surgery's view of each MoE layer (router plan checked against the router, fp32 weights)."""
    vocab = model.config.vocab_size
    layers = []
    for s in sites:
        w1, w2 = s.layer.expert_weights()  # [E, 2H, D], [E, D, H] (contracted for MPO experts)
        layers.append(ExpertLayer(
            index=s.index,
            router=router_logits(s.layer, vocab, s.path),
            k=s.layer.config.k,
            w1=w1.detach().float().numpy(),
            w2=w2.detach().float().numpy(),
        ))
    return layers


def export_genai(
    model: nn.Module,
    out_dir,
    *,
    precision: str = "fp32",
    provider: str = "cpu",
    tokenizer_dir=None,
    experts_op: str = "auto",
    force: bool = False,
    route: str = "auto",
) -> Path:
    """Write `model` (a converted transformers causal LM) as a GenAI folder at `out_dir`.

    Args:
        precision: fp32 | fp16 (CUDA only) | int8 | int4; builder route: the dense parts follow the builder
            at that precision, the experts are MoE (fp32/fp16) or block-quantised (int8/int4, see
            experts_op). The own route at int8/int4 quantises its fp32 graph (moeify.genai.own_quant):
            MatMulNBits linears (lm_head included, embedding float), loop or QMoE experts.
        provider: cpu | cuda, the execution provider the folder is built for.
        tokenizer_dir: the folder holding the source model's tokenizer files (required).
        experts_op: "fused" (com.microsoft.MoE / QMoE), "loop" (a dense MLP per expert over its tokens:
            MatMul / MatMulNBits, moeify.genai.expert_loop) or "auto" (loop at int4/int8 and at fp32 from
            width 1024, fused otherwise: `surgery.resolve_experts_op`).
        force: replace an existing `out_dir` that moeify wrote.
        route: auto (the builder where it knows the architecture, else the own route) | builder | own
            (see moeify.genai.routes).

    Raises MoeifyError (one line) for a model, router or option this route cannot take.
    """
    check_target(precision, provider)
    resolve_experts_op(experts_op, precision)  # a typo fails before the slow part
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        raise MoeifyError(
            f"--genai needs the source model's tokenizer folder, got {tokenizer_dir!r}; pass "
            "tokenizer_dir= (CLI: --tokenizer DIR)"
        )
    out = Path(out_dir)
    check_destination(out, force)  # before the slow part
    with _eval_mode(model):
        chosen, shape = choose_route(model, route)
        if chosen == "own":
            return export_own(model, shape, out, precision=precision, provider=provider,
                              tokenizer_dir=Path(tokenizer_dir), force=force, experts_op=experts_op)
        require_genai()
        sites = moe_sites(model)
        expert_layers(model, sites)  # refusals happen here, before the slow builder
        with tempfile.TemporaryDirectory(prefix="moeify-genai-") as scratch:
            scratch = Path(scratch)
            write_skeleton(model, sites, scratch / "hf", Path(tokenizer_dir))
            run_builder(scratch / "hf", scratch / "built", precision, provider, scratch / "cache")
            return moe_folder_from_dense(
                model, scratch / "built", out, precision=precision, experts_op=experts_op, force=force
            )


def moe_folder_from_dense(
    model: nn.Module, dense_dir, out_dir, *, precision: str, experts_op: str = "auto", force: bool = False
) -> Path:
    """The MoE GenAI folder of `model` from `dense_dir`, the builder's folder for its dense skeleton (or for
    any model with the same non-MLP weights and shapes) at `precision`."""
    out = Path(out_dir)
    with _eval_mode(model):
        layers = expert_layers(model, moe_sites(model))
        with atomic_output(out, directory=True, force=force) as tmp:
            tmp.mkdir(parents=True, exist_ok=True)
            graph = replace_mlps(onnx.load(str(Path(dense_dir) / MODEL_FILE)), layers, precision, experts_op)
            save_graph(graph, tmp / MODEL_FILE)
            for item in Path(dense_dir).iterdir():
                if item.name not in (MODEL_FILE, DATA_FILE) and item.is_file():
                    shutil.copyfile(item, tmp / item.name)
    return out


@contextmanager
def _eval_mode(model: nn.Module):
    """The routers are read in eval mode (no jitter); the caller's mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
