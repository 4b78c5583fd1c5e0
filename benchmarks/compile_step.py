"""torch.compile (default inductor backend, CPU) on a converted model's training step vs eager.

A small residual-FFN language model (moeify.zoo.TinyMLPModel, every FFN converted to top-2 MoE) trains with
`zero_grad(set_to_none=True)`, forward, cross-entropy + the routers' aux losses, backward, SGD. Printed:
  compile   wall and CPU time (this process, all threads; the C++ compiler runs in child processes and is
            not counted) of the first compiled step (tracing, AOT autograd, inductor's C++ build, one run)
            against the first eager step; set TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 for a cold compile;
  step      median seconds of a training step over interleaved repeats (eager, compiled, eager, ...), so
            load from other processes hits both alike; compiled/eager below 1 means compile is faster;
  max |loss diff|  over the timed steps (both copies start from the same weights and see the same batches).

Run: python benchmarks/compile_step.py [--quick] [--repeats R] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from timing import interleaved_medians  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import moeify  # noqa: E402
from moeify.zoo import TinyMLPModel  # noqa: E402


def _train_step(model: torch.nn.Module, forward, ids: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """One training step; returns the loss."""
    opt.zero_grad(set_to_none=True)
    logits = forward(ids)  # [B, S, V]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss = loss + moeify.aux_loss(model)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        vocab, d_model, d_ff, layers, batch, seq, repeats = 64, 16, 32, 1, 2, 8, args.repeats or 2
    else:
        vocab, d_model, d_ff, layers, batch, seq, repeats = 512, 256, 1024, 2, 8, 128, args.repeats or 7
    torch.manual_seed(0)
    dense = TinyMLPModel(vocab=vocab, d_model=d_model, d_ff=d_ff, layers=layers)
    eager = moeify.convert(dense, experts=8, k=2).train()
    compiled = copy.deepcopy(eager)
    opts = {"eager": torch.optim.SGD(eager.parameters(), lr=1e-3),
            "compiled": torch.optim.SGD(compiled.parameters(), lr=1e-3)}
    torch._dynamo.reset()
    forwards = {"eager": eager, "compiled": torch.compile(compiled)}  # default backend: inductor
    models = {"eager": eager, "compiled": compiled}
    batches = [torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(i))
               for i in range(2 * repeats + 4)]
    first, first_cpu, losses = {}, {}, {name: [] for name in models}
    for name in ("eager", "compiled"):
        start, start_cpu = time.perf_counter(), time.process_time()
        losses[name].append(_train_step(models[name], forwards[name], batches[0], opts[name]))
        first[name], first_cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
    counter = {name: 1 for name in models}

    def step(name: str):
        def run() -> None:
            ids = batches[counter[name]]
            counter[name] += 1
            losses[name].append(_train_step(models[name], forwards[name], ids, opts[name]))
        return run

    medians = interleaved_medians({name: step(name) for name in models}, repeats)
    diff = max(abs(a - b) for a, b in zip(losses["eager"], losses["compiled"], strict=True))
    print(f"converted model: {layers} MoE layers, d={d_model}, d_ff={d_ff}, E=8, k=2, {batch}x{seq} tokens, "
          f"{args.threads} threads, median of {repeats} interleaved repeats")
    print(f"compile: first compiled step {first['compiled']:.1f} s wall, {first_cpu['compiled']:.1f} s CPU "
          f"(first eager step {first['eager']:.2f} s wall, {first_cpu['eager']:.2f} s CPU)")
    print(f"step: eager {medians['eager'] * 1e3:.1f} ms, compiled {medians['compiled'] * 1e3:.1f} ms, "
          f"compiled/eager {medians['compiled'] / medians['eager']:.2f}")
    print(f"max |loss diff| over {len(losses['eager'])} steps: {diff:.2g}")


if __name__ == "__main__":
    main()
