"""moeify in five steps on a small GPT-2: find the FFNs, convert them to MoE, train, save, load.

    PYTHONPATH=. python examples/quickstart.py
    PYTHONPATH=. python examples/quickstart.py --quick      # fewer steps (CI smoke test)

The model is a transformers GPT2LMHeadModel built from a small config (random weights, nothing
downloaded); in practice you would start from trained weights (see minilm_upcycle.py and upcycle_gpt.py).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import moeify  # noqa: E402
from moeify.errors import MoeifyError  # noqa: E402

TEXT = b"moeify turns the dense feed-forward blocks of a model into a mixture of experts. " * 8


def small_gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4,  # byte-level
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer training steps (CI smoke test)")
    p.add_argument("--out", type=Path, help="where to save the converted model (default: a temp dir)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = small_gpt2().eval()
    data = torch.frombuffer(bytearray(TEXT), dtype=torch.uint8).long()  # [N] bytes
    x = data[:64].unsqueeze(0)  # [1, 64]
    before = model(x).logits  # [1, 64, 256]

    # 1. find: which blocks are FFNs (d_model -> d_ff -> d_model with an activation between)
    matches = moeify.find_ffns(model)
    for m in matches:
        print(f"found FFN {m.name}: d_model={m.d_model}, d_ff={m.d_ff}, activation={m.activation}")

    # 2. convert: each FFN becomes an MoE layer with 4 experts, top-2, every expert a copy of the FFN.
    #    With copies (and top-k weights renormalised to sum to 1) the model computes what it did before.
    model = moeify.convert(model, experts=4, k=2, init="copy")
    print(moeify.conversion_report(model))
    after = model(x).logits
    convert_diff = (after - before).abs().max().item()
    print(f"max |logits after convert - before| = {convert_diff:.2e}  (copy init preserves the function)")

    # 3. train: the usual loop. In training mode a converted HF model's `out.loss` already includes the
    #    routers' auxiliary losses (load balance, z-loss), reported alone as `out.aux_loss`, as Mixtral does
    #    (ConvertConfig.add_aux_loss; a model returning plain tensors: add moeify.aux_loss(model) yourself).
    steps = 5 if args.quick else 40
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for step in range(steps):
        start = torch.randint(0, data.numel() - 33, (8,))  # [B]
        batch = data[start[:, None] + torch.arange(33)]  # [B, 33]
        out = model(batch[:, :-1], labels=batch[:, :-1])  # HF shifts the labels itself
        opt.zero_grad()
        out.loss.backward()  # LM loss + aux loss
        opt.step()
        lm = (out.loss - out.aux_loss).item()
        losses.append(lm)
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"step {step:3d}  lm loss {lm:.3f}  aux {out.aux_loss.item():.4f}")
    model.eval()
    for name, s in moeify.routing_stats(model).items():
        print(f"{name}: expert load {[round(v, 2) for v in s.load.tolist()]}")

    # 4. save, 5. load: the same model comes back
    with tempfile.TemporaryDirectory() as tmp:
        path = (args.out or Path(tmp)) / "quickstart_moe"
        moeify.save(model, path)
        loaded = moeify.load(path).eval()
        with torch.no_grad():
            load_diff = (loaded(x).logits - model(x).logits).abs().max().item()
        files = sorted(f.name for f in path.iterdir()) if path.is_dir() else [path.name]
    print(f"saved to {path} ({', '.join(files)}); max |loaded - trained| = {load_diff:.2e}")
    return {"ffns": len(matches), "convert_diff": convert_diff, "losses": losses, "load_diff": load_diff,
            "saved_files": files, "finite": all(math.isfinite(v) for v in losses)}


if __name__ == "__main__":
    try:
        main()
    except MoeifyError as e:
        raise SystemExit(f"error: {e}") from None
