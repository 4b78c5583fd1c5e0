"""Does sparse upcycling pay off? (Komatsuzaki et al. 2022, "Sparse Upcycling", at CPU scale.)

1. Pretrain a small dense GPT (examples/tinygpt.py) on the Python standard library's source, byte-level.
2. From that checkpoint, continue for the same number of extra tokens, three ways, on the same batches:
     dense      the dense model, trained on
     moe-copy   every MLP upcycled to an MoE with E=8 experts, top-2, each expert a copy of the MLP
     moe-drop   the same, but drop-upcycling: each expert re-draws a share r=0.5 of its hidden neurons
3. Report held-out loss against extra training FLOPs (see examples/gpt_training.py for what is counted)
   and against extra wall time; print a table; save PNGs (loss curves, expert load per layer, load over
   training steps) and results.json.

    PYTHONPATH=. python examples/upcycle_gpt.py            # the experiment (15 min on 2 shared cores)
    PYTHONPATH=. python examples/upcycle_gpt.py --quick    # seconds: a tiny model, for CI

Every continuation starts a fresh AdamW with the same warmup and learning rate, and reads the same batches
in the same order, so the only difference between the runs is the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import moeify
from moeify.errors import MoeifyError
from moeify.plot import LoadHistory, expert_load_heatmap, load_over_steps, loss_curves

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules, however we are run

from gpt_training import (  # noqa: E402
    TrainSettings,
    active_params_per_token,
    flops_per_token,
    interleaved_step_seconds,
    interpolate,
    train,
)
from stdlib_corpus import BatchSampler, eval_batches, load_corpus  # noqa: E402
from tinygpt import GPT, GPTConfig, lm_loss  # noqa: E402

EXPERTS, TOP_K, DROP_RATIO = 8, 2, 0.5

# eval_every: held-out evaluation every so many steps (pretraining: pretrain_eval_every)
PRESETS = {
    "default": dict(model=GPTConfig(context=128, n_layer=4, n_head=4, d_model=128, d_ff=512),
                    pretrain_steps=600, extra_steps=200, batch_size=16, eval_sequences=96, max_files=None,
                    eval_every=20, pretrain_eval_every=50),
    "quick": dict(model=GPTConfig(context=32, n_layer=2, n_head=2, d_model=32, d_ff=64),
                  pretrain_steps=20, extra_steps=6, batch_size=8, eval_sequences=8, max_files=40,
                  eval_every=3, pretrain_eval_every=10),
}


def upcycle(model: torch.nn.Module, init: str, seed: int) -> torch.nn.Module:
    """Every MLP of `model` -> an MoE with EXPERTS experts, top-TOP_K, initialised from the MLP by `init`."""
    recipe = {"init": "drop", "drop_rate": DROP_RATIO} if init == "drop" else init
    model = moeify.convert(model, experts=EXPERTS, k=TOP_K, init=recipe, seed=seed)
    moe_layers = [m for m in model.modules() if isinstance(m, moeify.MoELayer)]
    if len(moe_layers) != model.config.n_layer:
        raise RuntimeError(f"expected {model.config.n_layer} MoE layers after convert, "
                           f"found {len(moe_layers)}")
    return model


def table(results: dict) -> str:
    """The summary table (plain text, fixed width)."""
    runs = results["runs"]
    dense = runs["dense"]
    f_budget, t_budget = dense["flops"][-1], dense["seconds"][-1]
    head = (f"{'run':<9} {'active params':>13} {'extra tokens':>12} {'extra FLOPs':>11} {'ms/step':>7} "
            f"{'wall s':>6} {'(clock)':>7} {'loss@0':>7} {'final':>7} {'@dense FLOPs':>12} "
            f"{'@dense time':>11}")
    lines = [head, "-" * len(head)]
    for name, r in runs.items():
        at_f = interpolate(r["flops"], r["loss"], f_budget)
        at_t = interpolate(r["seconds"], r["loss"], t_budget)
        lines.append(f"{name:<9} {r['active_params']:>13,d} {r['tokens'][-1]:>12,d} {r['flops'][-1]:>11.3g} "
                     f"{1000 * r['step_seconds']:>7.0f} {r['seconds'][-1]:>6.0f} "
                     f"{r['seconds_measured'][-1]:>7.0f} "
                     f"{r['loss'][0]:>7.4f} {r['loss'][-1]:>7.4f} {at_f:>12.4f} {at_t:>11.4f}")
    return "\n".join(lines)


def verdict(results: dict) -> list[str]:
    """Plain sentences: at the dense run's extra FLOPs (and wall time), is each upcycled run better?"""
    runs = results["runs"]
    dense = runs["dense"]
    out = []
    for name in ("moe-copy", "moe-drop"):
        r = runs[name]
        for col, what in (("flops", "extra FLOPs"), ("seconds", "extra wall time")):
            mine = interpolate(r[col], r["loss"], dense[col][-1])
            gap = dense["loss"][-1] - mine
            word = "BEATS" if gap > 0 else "does NOT beat"
            out.append(f"{name} {word} dense continuation at equal {what}: held-out loss {mine:.4f} "
                       f"vs {dense['loss'][-1]:.4f} ({gap:+.4f})")
        gap_tok = dense["loss"][-1] - r["loss"][-1]
        out.append(f"{name} at equal extra tokens: held-out loss {r['loss'][-1]:.4f} "
                   f"vs {dense['loss'][-1]:.4f} ({gap_tok:+.4f})")
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and a few steps (CI smoke test)")
    p.add_argument("--out", type=Path, default=Path("out/upcycle_gpt"), help="where PNGs and results go")
    p.add_argument("--pretrain-steps", type=int, help="override the preset's pretraining steps")
    p.add_argument("--extra-steps", type=int, help="override the preset's continuation steps")
    p.add_argument("--batch-size", type=int, help="override the preset's batch size (sequences per step)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a machine "
                                               "busy with other work, 1 is often faster")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="skip pretraining when --out holds a checkpoint pretrained with the same settings")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = dict(PRESETS["quick" if args.quick else "default"])
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    for key in ("pretrain_steps", "extra_steps", "batch_size"):
        if getattr(args, key) is not None:
            if getattr(args, key) < 1:
                raise SystemExit(f"error: --{key.replace('_', '-')} must be >= 1")
            preset[key] = getattr(args, key)
    cfg: GPTConfig = preset["model"]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(args.seed)

    corpus = load_corpus(max_files=preset["max_files"])
    print(f"corpus: stdlib sources, {corpus.train_files} train files ({corpus.train.numel():,d} bytes), "
          f"{corpus.held_out_files} held-out files ({corpus.held_out.numel():,d} bytes); "
          f"torch threads {torch.get_num_threads()}")
    eval_set = eval_batches(corpus.held_out, preset["eval_sequences"], cfg.context, preset["batch_size"])

    def settings(steps: int, eval_every: int) -> TrainSettings:
        warmup = max(1, min(20, steps // 5))
        return TrainSettings(steps=steps, eval_every=eval_every, warmup=warmup)

    # 1. dense pretraining (or, with --reuse-pretrained, the checkpoint an identical earlier run left)
    ckpt, ckpt_meta = out / "dense_pretrained.pt", out / "dense_pretrained.json"
    identity = {"model": cfg.__dict__, "steps": preset["pretrain_steps"], "batch_size": preset["batch_size"],
                "seed": args.seed, "max_files": preset["max_files"]}
    if args.reuse_pretrained and ckpt.is_file() and ckpt_meta.is_file():
        meta = json.loads(ckpt_meta.read_text())
        if meta["identity"] != identity:
            raise SystemExit(f"error: {ckpt} was pretrained with other settings; drop --reuse-pretrained "
                             "or use another --out")
        pre_curve = meta["curve"]
        print(f"reusing the pretrained checkpoint {ckpt}")
    else:
        dense = GPT(cfg)
        print(f"pretraining dense GPT ({active_params_per_token(dense):,d} active params/token) "
              f"for {preset['pretrain_steps']} steps of {preset['batch_size']}x{cfg.context} bytes")
        pre = train(dense, BatchSampler(corpus.train, preset["batch_size"], cfg.context, seed=args.seed),
                    settings(preset["pretrain_steps"], preset["pretrain_eval_every"]), eval_set, lm_loss,
                    flops_per_token(dense, cfg.n_layer, cfg.context, cfg.d_model), name="pretrain")
        pre_curve = pre.as_dict()
        tmp = ckpt.with_name(f".{ckpt.name}.tmp")
        torch.save(dense.state_dict(), tmp)
        os.replace(tmp, ckpt)
        write_json(ckpt_meta, {"identity": identity, "curve": pre_curve})

    # 2. three continuations from the same checkpoint, on the same batches
    results = {"config": {**cfg.__dict__, "experts": EXPERTS, "k": TOP_K, "drop_ratio": DROP_RATIO,
                          **{k: v for k, v in preset.items() if k != "model"}, "seed": args.seed,
                          "threads": torch.get_num_threads()},
               "pretrain": pre_curve, "runs": {}}
    histories: dict[str, LoadHistory] = {}
    final_stats = {}
    models: dict[str, torch.nn.Module] = {}
    for name, init in (("dense", None), ("moe-copy", "copy"), ("moe-drop", "drop")):
        model = GPT(cfg)
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        if init is not None:
            torch.manual_seed(args.seed + 1)  # the same router init (and drop draws) whatever ran before
            model = upcycle(model, init, seed=args.seed)
        history = LoadHistory() if init is not None else None
        fpt = flops_per_token(model, cfg.n_layer, cfg.context, cfg.d_model)
        print(f"{name}: {active_params_per_token(model):,d} active params/token, "
              f"{sum(p.numel() for p in model.parameters()):,d} total params, {fpt:,d} FLOPs/token")
        sampler = BatchSampler(corpus.train, preset["batch_size"], cfg.context, seed=args.seed + 1000)
        extra = settings(preset["extra_steps"], preset["eval_every"])
        curve = train(model, sampler, extra, eval_set, lm_loss, fpt, history=history, name=name)
        results["runs"][name] = {**curve.as_dict(), "active_params": active_params_per_token(model),
                                 "total_params": sum(p.numel() for p in model.parameters()),
                                 "flops_per_token": fpt}
        models[name] = model
        if history is not None:
            histories[name] = history
            final_stats.update({f"{name}: {k}": v for k, v in moeify.routing_stats(model).items()})
            loads = {k: [t.tolist() for t in v] for k, v in history.loads.items()}
            results["runs"][name]["load_history"] = {"steps": history.steps, "loads": loads}

    # 3. wall time: the three models timed in turns on one batch (see interleaved_step_seconds); the
    #    "seconds" axis is steps x that median step time, the raw per-run clock is kept as seconds_measured
    batch = BatchSampler(corpus.train, preset["batch_size"], cfg.context, seed=args.seed + 2000).next()
    step_seconds = interleaved_step_seconds(models, batch, lm_loss, rounds=1 if args.quick else 6)
    for name, r in results["runs"].items():
        r["seconds_measured"], r["step_seconds"] = r["seconds"], step_seconds[name]
        r["seconds"] = [step * step_seconds[name] for step in r["step"]]

    # 4. report
    pngs = [out / "loss_vs_compute.png", out / "expert_load.png"]
    axes = [("tokens", "extra training tokens (bytes)"), ("flops", "extra training FLOPs"),
            ("seconds", "extra training wall time (s)")]
    loss_curves(results["runs"], axes, ylabel="held-out loss (nats/byte)",
                path=pngs[0], title=f"Continuing a pretrained dense GPT: dense vs upcycled MoE (E={EXPERTS}, "
                                    f"k={TOP_K}); held-out = stdlib files never trained on")
    expert_load_heatmap(final_stats, pngs[1], title="Expert load per layer after continued training "
                                                    "(last held-out batch)")
    for name, history in histories.items():
        pngs.append(out / f"load_over_steps_{name}.png")
        load_over_steps(history, pngs[-1], title=f"{name}: expert load")
    results["table"] = table(results)
    results["verdict"] = verdict(results)
    results["pngs"] = [str(p) for p in pngs]
    results["total_seconds"] = time.perf_counter() - started
    write_json(out / "results.json", results)
    print()
    print(results["table"])
    print()
    print("\n".join(results["verdict"]))
    print(f"\nwrote {', '.join(p.name for p in pngs)} and results.json to {out}/ "
          f"in {results['total_seconds'] / 60:.1f} min")
    return results


if __name__ == "__main__":
    try:
        main()
    except MoeifyError as e:
        raise SystemExit(f"error: {e}") from None
