"""Train a converted Hugging Face model with `transformers.Trainer`: convert, train, save, reload, generate.

    PYTHONPATH=. python examples/hf_trainer.py
    PYTHONPATH=. python examples/hf_trainer.py --quick      # a few steps (CI smoke test)

The model is moeify's tiny LLaMA (`moeify.zoo.tiny_llama`, byte-level, built from a config: nothing
downloaded). After `moeify.convert`, the model's `outputs.loss` in training mode already holds the routers'
auxiliary losses (load balance, z-loss; reported alone as `outputs.aux_loss`, as Mixtral does), so `Trainer`
trains them with no change. `RoutingCallback` adds each MoE layer's balance, dropped fraction and aux loss to
the Trainer's logs and draws the expert load into every checkpoint (with matplotlib installed).
Needs transformers and accelerate (what `Trainer` needs).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import moeify  # noqa: E402
from moeify.errors import MoeifyError  # noqa: E402
from moeify.zoo import tiny_llama  # noqa: E402

TEXT = (b"moeify turns the dense feed-forward blocks of a model into a mixture of experts; "
        b"the experts start as copies of the dense block and learn to differ. ") * 16
CONTEXT = 32
PROMPT = b"moeify turns the "


class ByteWindows(torch.utils.data.Dataset):
    """Every CONTEXT-byte window of `data` as a Trainer example: input_ids and labels (the model shifts)."""

    def __init__(self, data: torch.Tensor, stride: int = 8):
        self.data, self.starts = data, range(0, data.numel() - CONTEXT, stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        ids = self.data[self.starts[i]:self.starts[i] + CONTEXT]  # [S]
        return {"input_ids": ids, "labels": ids}


def greedy(model: torch.nn.Module, prompt: bytes, new_tokens: int) -> bytes:
    ids = torch.tensor([list(prompt)])  # [1, P]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)  # [1, P + new]
    return bytes(out[0, ids.shape[1]:].tolist())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few training steps (CI smoke test)")
    p.add_argument("--out", type=Path, help="where checkpoints and the saved model go (default: a temp dir)")
    args = p.parse_args(argv)
    try:
        from transformers import Trainer, TrainingArguments

        from moeify.integrations.transformers import RoutingCallback
    except ImportError as e:
        raise MoeifyError(f"this example needs transformers and accelerate ({e}); pip install "
                          "'moeify[hf]' accelerate") from None

    torch.manual_seed(0)
    model = moeify.convert(tiny_llama(num_hidden_layers=2), experts=4, k=2, init="copy")
    print(moeify.conversion_report(model).summary)
    data = torch.frombuffer(bytearray(TEXT), dtype=torch.uint8).long()  # [N] bytes
    steps = 6 if args.quick else 80
    heatmap = importlib.util.find_spec("matplotlib") is not None
    if not heatmap:
        print("matplotlib is not installed: no expert-load heatmaps (pip install 'moeify[plot]')")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        training = TrainingArguments(
            output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=8,
            learning_rate=3e-3, warmup_steps=max(1, steps // 10), logging_steps=max(1, steps // 3),
            save_steps=steps, save_only_model=True, report_to="none", use_cpu=True, disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=training, train_dataset=ByteWindows(data))
        RoutingCallback.add_to(trainer, heatmap=heatmap)  # ahead of the reporters, so they log it too
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        for h in logged:
            balance = min(v for k, v in h.items() if k.endswith("/balance"))
            print(f"step {h['step']:3d}  loss {h['loss']:.3f} (LM + aux)  aux {h['moe/aux_loss']:.4f}  "
                  f"worst balance {balance:.2f}")
        heatmaps = sorted(str(f.relative_to(out)) for f in out.glob("trainer/checkpoint-*/expert_load.png"))
        for f in heatmaps:
            print(f"expert load heatmap: {out / f}")

        model.eval()
        saved = moeify.save(model, out / "moe", force=True)
        loaded = moeify.load(saved).eval()
        x = data[:CONTEXT].unsqueeze(0)  # [1, S]
        with torch.no_grad():
            load_diff = (loaded(x).logits - model(x).logits).abs().max().item()
        text, text_loaded = greedy(model, PROMPT, 24), greedy(loaded, PROMPT, 24)
    print(f"saved and reloaded with moeify.save / moeify.load: max |logits diff| = {load_diff:.2e}")
    print(f"generated: {PROMPT.decode()}|{text.decode('utf-8', 'replace')!r}")
    return {"losses": [h["loss"] for h in logged], "logged": logged, "heatmaps": heatmaps,
            "load_diff": load_diff, "same_generation": text == text_loaded, "generated": text,
            "finite": all(math.isfinite(h["loss"]) for h in logged)}


if __name__ == "__main__":
    try:
        main()
    except MoeifyError as e:
        raise SystemExit(f"error: {e}") from None
