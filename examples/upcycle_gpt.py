"""When does sparse upcycling pay off? (Komatsuzaki et al. 2022, "Sparse Upcycling", at CPU scale.)

1. Pretrain a small dense GPT (examples/tinygpt.py) on the Python standard library's source, byte-level.
2. From that checkpoint, continue seven ways (examples/upcycle_arms.py), each with 3 seeds (batch order,
   router init, drop draws): dense continuation; MoE top-1 (the same active FFN FLOPs as dense) and top-2,
   each upcycled by `copy`, `drop` (r=0.5) and `granular` (G=2). Every arm trains until it has spent the
   same extra FLOPs, a share of the pretraining FLOPs (default: all of it; --medium: half), evaluated on
   the way.
3. Report test-split loss at equal extra FLOPs and at equal wall time (the arms' step times measured in
   turns), mean and min-max over seeds; write a markdown table + verdict (report.md), plots with seed
   bands (validation split) and results.json (examples/upcycle_report.py says how the verdict is made).

    PYTHONPATH=. python examples/upcycle_gpt.py                       # the full experiment: examples/results
    PYTHONPATH=. python examples/upcycle_gpt.py --medium --threads 1  # smaller: examples/results/medium
    PYTHONPATH=. python examples/upcycle_gpt.py --quick               # seconds: a tiny model, for CI

A stopped run continues with the same command plus `--resume` (finished runs are kept in --out/runs/).

Splits: train files for training; the held-out files are cut in two by CRC32 of their path (see
examples/stdlib_corpus.py): validation (the curves, what one would tune on) and test (every number in the
tables and the verdict). Nothing is tuned in this script: the learning-rate schedule is fixed in advance.
Every continuation starts a fresh AdamW with the same warmup and learning rate; seed s of every arm reads
the same batches in the same order.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import moeify
from moeify.errors import MoeifyError
from moeify.plot import summarize_load

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling helper modules, however we are run

from gpt_training import (  # noqa: E402
    TrainSettings,
    active_params_per_token,
    flops_per_token,
    interleaved_step_seconds,
    train,
)
from stdlib_corpus import BatchSampler, eval_batches, load_corpus  # noqa: E402
from tinygpt import GPT, GPTConfig, lm_loss  # noqa: E402
from upcycle_arms import ARMS, DENSE, Arm, arm_named, upcycle  # noqa: E402
from upcycle_plots import write_figures  # noqa: E402
from upcycle_report import markdown, verdict  # noqa: E402

# budgets: extra FLOPs as fractions of the pretraining FLOPs; every arm trains to the largest.
# eval_every: validation + test evaluation every so many steps (pretraining: pretrain_eval_every)
PRESETS = {
    "default": dict(model=GPTConfig(context=128, n_layer=4, n_head=4, d_model=64, d_ff=256),
                    pretrain_steps=800, batch_size=16, eval_sequences=64, max_files=None,
                    budgets=(0.25, 0.5, 1.0), eval_every=40, pretrain_eval_every=100, seeds=3),
    "medium": dict(model=GPTConfig(context=64, n_layer=4, n_head=4, d_model=64, d_ff=256),
                   pretrain_steps=300, batch_size=16, eval_sequences=64, max_files=None,
                   budgets=(0.125, 0.25, 0.5), eval_every=25, pretrain_eval_every=100, seeds=3),
    "quick": dict(model=GPTConfig(context=32, n_layer=2, n_head=2, d_model=32, d_ff=64),
                  pretrain_steps=20, batch_size=8, eval_sequences=8, max_files=40,
                  budgets=(0.25, 0.5), eval_every=3, pretrain_eval_every=10, seeds=3),
}


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def as_json(data: dict) -> dict:
    """`data` as it reads back from JSON (tuples become lists), to compare with what a file holds."""
    return json.loads(json.dumps(data))


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny model and a few steps (CI smoke test)")
    size.add_argument("--medium", action="store_true", help="a smaller model than the default (~1 h loaded)")
    p.add_argument("--out", type=Path, default=Path("out/upcycle_gpt"), help="where results and PNGs go")
    p.add_argument("--pretrain-steps", type=int, help="override the preset's pretraining steps")
    p.add_argument("--budget", type=float, help="override the largest extra budget (x pretraining FLOPs); "
                                                "the smaller ones are 1/4 and 1/2 of it")
    p.add_argument("--seeds", type=int, help="override the number of seeds per arm")
    p.add_argument("--batch-size", type=int, help="override the preset's batch size (sequences per step)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); on a machine "
                                               "busy with other work, 1 is often faster")
    p.add_argument("--resume", action="store_true",
                   help="reuse the checkpoint and the finished runs --out holds from a run with the same "
                        "settings")
    p.add_argument("--arms", help="comma-separated arms to run besides dense (default: all of "
                                  f"{', '.join(a.name for a in ARMS[1:])})")
    p.add_argument("--only-seed", type=int, help="train only this continuation seed's arms and stop (no "
                                                 "report): run seeds side by side, then report them all with "
                                                 "--resume")
    p.add_argument("--seed", type=int, default=0, help="pretraining seed (continuation seeds are 0..seeds-1)")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> dict:
    preset = dict(PRESETS["quick" if args.quick else "medium" if args.medium else "default"])
    for key in ("pretrain_steps", "batch_size", "seeds"):
        value = getattr(args, key)
        if value is not None:
            if value < 1:
                raise SystemExit(f"error: --{key.replace('_', '-')} must be >= 1")
            preset[key] = value
    if args.budget is not None:
        if not (math.isfinite(args.budget) and args.budget > 0):
            raise SystemExit("error: --budget must be a number > 0 (extra FLOPs / pretraining FLOPs, "
                             "e.g. 0.5)")
        preset["budgets"] = tuple(args.budget * f for f in (0.25, 0.5, 1.0))
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("error: --threads must be >= 1")
        torch.set_num_threads(args.threads)
    return preset


def chosen_arms(names: str | None) -> tuple[Arm, ...]:
    """Dense continuation, then the arms named (all when None), in the order of ARMS."""
    if names is None:
        return ARMS
    try:
        wanted = {arm_named(n.strip()) for n in names.split(",") if n.strip()}
    except KeyError as e:
        raise SystemExit(f"error: --arms: {e.args[0]}") from None
    return tuple(arm for arm in ARMS if arm in wanted or arm is DENSE)


def schedule(steps: int, eval_every: int, eval_at: tuple[int, ...] = ()) -> TrainSettings:
    warmup = max(1, min(20, steps // 5))
    return TrainSettings(steps=steps, eval_every=eval_every, warmup=warmup, eval_at=eval_at)


def pretrain(out: Path, preset: dict, corpus, eval_sets, args) -> tuple[Path, dict]:
    """Pretrain the dense GPT (or, with --resume, take the checkpoint an identical earlier run left)."""
    cfg: GPTConfig = preset["model"]
    ckpt, meta_path = out / "dense_pretrained.pt", out / "dense_pretrained.json"
    identity = as_json({"model": asdict(cfg), "steps": preset["pretrain_steps"], "seed": args.seed,
                        "batch_size": preset["batch_size"], "max_files": preset["max_files"]})
    if args.resume and ckpt.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta["identity"] != identity:
            raise SystemExit(f"error: {ckpt} was pretrained with other settings; drop --resume or use "
                             "another --out")
        print(f"reusing the pretrained checkpoint {ckpt}")
        return ckpt, meta["curve"]
    torch.manual_seed(args.seed)
    dense = GPT(cfg)
    print(f"pretraining dense GPT ({active_params_per_token(dense):,d} active params/token) "
          f"for {preset['pretrain_steps']} steps of {preset['batch_size']}x{cfg.context} bytes")
    curve = train(dense, BatchSampler(corpus.train, preset["batch_size"], cfg.context, seed=args.seed),
                  schedule(preset["pretrain_steps"], preset["pretrain_eval_every"]), eval_sets[0], lm_loss,
                  flops_per_token(dense, cfg.n_layer, cfg.context, cfg.d_model), name="pretrain",
                  test_set=eval_sets[1]).as_dict()
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    torch.save(dense.state_dict(), tmp)
    os.replace(tmp, ckpt)
    write_json(meta_path, {"identity": identity, "curve": curve})
    return ckpt, curve


def build(arm: Arm, cfg: GPTConfig, ckpt: Path, seed: int) -> torch.nn.Module:
    model = GPT(cfg)
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    torch.manual_seed(1 + seed)  # the same router init (and drop draws) whatever ran before
    return upcycle(model, arm, seed=seed)


def continue_run(arm: Arm, seed: int, cfg: GPTConfig, ckpt: Path, preset: dict, budget: dict, corpus,
                 eval_sets) -> dict:
    """Train one arm from the checkpoint until it has spent the largest extra budget; its curve as a dict."""
    model = build(arm, cfg, ckpt, seed)
    fpt = flops_per_token(model, cfg.n_layer, cfg.context, cfg.d_model)
    tokens_per_step = preset["batch_size"] * cfg.context
    budget_steps = tuple(math.ceil(f / (fpt * tokens_per_step)) for f in budget["flops"])
    sampler = BatchSampler(corpus.train, preset["batch_size"], cfg.context, seed=1000 + seed)
    steps = schedule(budget_steps[-1], preset["eval_every"], budget_steps)
    curve = train(model, sampler, steps, eval_sets[0], lm_loss, fpt, name=f"{arm.name}/{seed}",
                  test_set=eval_sets[1]).as_dict()
    stats = moeify.routing_stats(model) if arm.init is not None else {}
    # routing balance per layer on the last evaluated batch: 1 = uniform load, 0 = one expert takes all
    curve["balance"] = {layer: round(summarize_load(s.load).balance, 4) for layer, s in stats.items()}
    return curve


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    preset = settings_from(args)
    cfg: GPTConfig = preset["model"]
    out: Path = args.out
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()

    corpus = load_corpus(max_files=preset["max_files"])
    print(f"corpus: stdlib sources, {corpus.train_files} train files ({corpus.train.numel():,d} bytes), "
          f"{corpus.held_out_files} held-out files: validation {corpus.validation.numel():,d} bytes, "
          f"test {corpus.test.numel():,d} bytes; torch threads {torch.get_num_threads()}")
    eval_sets = [eval_batches(split, preset["eval_sequences"], cfg.context, preset["batch_size"])
                 for split in (corpus.validation, corpus.test)]

    # 1. dense pretraining
    ckpt, pre_curve = pretrain(out, preset, corpus, eval_sets, args)
    dense_fpt = flops_per_token(GPT(cfg), cfg.n_layer, cfg.context, cfg.d_model)
    pre_tokens = pre_curve["tokens"][-1]
    budget = {"fractions": list(preset["budgets"]), "pretrain_tokens": pre_tokens,
              "pretrain_flops": pre_tokens * dense_fpt,
              "flops": [f * pre_tokens * dense_fpt for f in preset["budgets"]]}
    config = {**asdict(cfg), **{k: v for k, v in preset.items() if k != "model"}, "seed": args.seed,
              "threads": torch.get_num_threads()}

    # 2. every arm x seed from the same checkpoint, seed-major (a stopped run has every arm for its seeds)
    arms = chosen_arms(args.arms)
    curves: dict[str, dict[int, dict]] = {arm.name: {} for arm in arms}
    if args.only_seed is not None and not 0 <= args.only_seed < preset["seeds"]:
        raise SystemExit(f"error: --only-seed must be in 0..{preset['seeds'] - 1} (the continuation seeds)")
    for seed in range(preset["seeds"]) if args.only_seed is None else [args.only_seed]:
        for arm in arms:
            path = out / "runs" / f"{arm.name}-seed{seed}.json"
            # not the number of seeds: a later run may add seeds
            identity = as_json({"config": {k: v for k, v in config.items() if k != "seeds"},
                                "budget": budget, "arm": arm.name, "seed": seed})
            if args.resume and path.is_file() and json.loads(path.read_text())["identity"] == identity:
                curves[arm.name][seed] = json.loads(path.read_text())["curve"]
                print(f"reusing {path}")
                continue
            curves[arm.name][seed] = continue_run(arm, seed, cfg, ckpt, preset, budget, corpus, eval_sets)
            write_json(path, {"identity": identity, "curve": curves[arm.name][seed]})

    if args.only_seed is not None:
        print(f"seed {args.only_seed}: every arm done, in {out / 'runs'}/")
        return {"config": config, "budget": budget, "curves": curves}

    # 3. wall time: the arms timed in turns on one batch (see interleaved_step_seconds); the "seconds" axis
    #    is steps x that median step time, the raw per-run clock is kept as seconds_measured
    models = {arm.name: build(arm, cfg, ckpt, seed=0) for arm in arms}
    batch = BatchSampler(corpus.train, preset["batch_size"], cfg.context, seed=2000).next()
    step_seconds = interleaved_step_seconds(models, batch, lm_loss, rounds=1 if args.quick else 6)
    results = {"config": config, "budget": budget, "pretrain": pre_curve, "arms": {}}
    for arm in arms:
        for curve in curves[arm.name].values():
            curve["seconds_measured"] = curve["seconds"]
            curve["seconds"] = [step * step_seconds[arm.name] for step in curve["step"]]
        model = models[arm.name]
        results["arms"][arm.name] = {
            "what": arm.describe(), "active_params": active_params_per_token(model),
            "total_params": sum(p.numel() for p in model.parameters()),
            "flops_per_token": flops_per_token(model, cfg.n_layer, cfg.context, cfg.d_model),
            "step_seconds": step_seconds[arm.name], "seeds": curves[arm.name]}

    # 4. report
    results["verdict"] = verdict(results)
    results["report"] = markdown(results)
    results["pngs"] = [str(p) for p in write_figures(results, out)]
    results["total_seconds"] = time.perf_counter() - started
    results["cpu_seconds"] = time.process_time() - cpu_started
    write_text(out / "report.md", results["report"])
    write_text(out / "verdict.txt", "\n".join(results["verdict"]) + "\n")
    write_json(out / "results.json", results)
    print()
    print(results["report"])
    pngs = ", ".join(Path(p).name for p in results["pngs"])
    print(f"wrote report.md, verdict.txt, results.json and {pngs} "
          f"to {out}/ in {results['total_seconds'] / 60:.1f} min ({results['cpu_seconds'] / 60:.1f} min CPU)")
    return results


if __name__ == "__main__":
    try:
        main()
    except MoeifyError as e:
        raise SystemExit(f"error: {e}") from None
