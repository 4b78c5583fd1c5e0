"""MoE layer speed on CPU: moeify's MoELayer vs an HF-Mixtral-style expert loop vs the dense limit.

Shape legend: T tokens, D d_model, H d_ff, E experts, k experts per token.

Three contenders on the same input, measured side by side in one run:
  moeify  MoELayer with the top-k router (router, losses, statistics and the grouped dispatch op).
  loop    transformers' MixtralSparseMoeBlock pattern: a linear gate, softmax + top-k, then a Python loop
          over a ModuleList of per-expert FFNs that gathers each expert's tokens and index_adds the
          weighted result back. Its weights are views of the MoELayer's, so both compute the same function
          (checked once before timing).
  dense   the limit: k dense FFNs of the same width on all T tokens, summed (the FLOPs top-k must do,
          with no routing, gathering or scattering).
  experts not a contender: the same expert FFNs (the loop's nn.Linear modules) run on rows gathered once
          before timing, in the group sizes the router gives, with no routing, gather or scatter: the
          per-expert GEMM work alone. experts/dense is what splitting the tokens into E small GEMMs costs
          by itself (MKL is much less efficient on 64 rows than on 4096); moeify/experts is what
          moeify's routing and dispatch add on top (below 1 where its column-major GEMMs for small groups
          beat the modules' row-major ones).
  floor   not a contender: the time just to stream the expert weights through memory once per pass that
          must read or write them (forward: read w1 and w2; fwd+bwd: read them twice, write their
          gradients once), at this machine's read and write bandwidth measured at the start of the run.
          No implementation that keeps the weights in DRAM goes below it; at many experts with few tokens
          each (E=128) every contender is close to it, which bounds how much faster than the loop moeify
          can be.
Times are medians over interleaved repeats (contender A, B, C, A, B, C, ...), so load from other processes
on a shared machine hits all three alike and the ratios stay meaningful even when absolute times drift.
"forward" runs under no_grad; "fwd+bwd" is forward with grad plus backward of a fixed output gradient, under
one of two training protocols (`--protocol`, default both):
  fwd+bwd      parameter grads set to None before each step (`zero_grad(set_to_none=True)` every step):
               every backward writes fresh gradient tensors.
  fwd+bwd acc  gradient accumulation: no zero_grad between steps, every backward adds into the existing
               gradients (read + write of each weight's gradient; its floor counts that).

Run: python benchmarks/moe_layer.py [--quick] [--repeats R] [--activation gelu] [--gated] [--no-recycle]
     [--protocol set_to_none|accumulate|both] [--case TxE ...] [--k 1|2 ...] [--mpo]
`--mpo` adds a table for MPO experts (expert_param="mpo"): benchmarks/mpo_experts.py.
(glibc settings change the fresh-memory costs: see the README's speed section.)
`--device cuda` runs the GPU table instead (bfloat16, achieved TFLOP/s, the issue's shapes): see
benchmarks/moe_layer_gpu.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from timing import interleaved_medians  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

import moeify  # noqa: E402
import moeify.dispatch  # noqa: E402
from moeify.activations import apply_expert_activation  # noqa: E402

Tensor = torch.Tensor


class FFN(nn.Module):
    """One expert / dense FFN in the usual nn.Linear form: x [n, D] -> [n, D]."""

    def __init__(self, d_model: int, d_ff: int, activation: str, gated: bool, bias: bool):
        super().__init__()
        self.activation, self.gated = activation, gated
        self.up = nn.Linear(d_model, 2 * d_ff if gated else d_ff, bias=bias)  # weight [H1, D]
        self.down = nn.Linear(d_ff, d_model, bias=bias)  # weight [D, H]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(apply_expert_activation(self.up(x), self.activation, self.gated))


class LoopMoE(nn.Module):
    """HF-Mixtral-style sparse MoE block whose parameters are views of an `MoELayer`'s (same function)."""

    def __init__(self, layer: moeify.MoELayer):
        super().__init__()
        cfg = layer.config
        self.k, self.num_experts = cfg.k, cfg.num_experts
        self.gate = nn.Linear(cfg.d_model, cfg.num_experts, bias=False)
        self.gate.weight = nn.Parameter(layer.router.weight.data)  # [E, D], shared storage
        self.experts = nn.ModuleList()
        for e in range(cfg.num_experts):
            ffn = FFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated, cfg.bias)
            ffn.up.weight = nn.Parameter(layer.w1.data[e])  # [H1, D] view
            ffn.down.weight = nn.Parameter(layer.w2.data[e])  # [D, H] view
            if cfg.bias:
                ffn.up.bias = nn.Parameter(layer.b1.data[e])
                ffn.down.bias = nn.Parameter(layer.b2.data[e])
            self.experts.append(ffn)

    def route(self, x: Tensor) -> tuple[Tensor, list[tuple[int, Tensor, Tensor]]]:
        """Combine weights top_w [T, k] and, per expert with tokens, (e, slot [n_e], tokens [n_e])."""
        # float32 logits from the (possibly bfloat16) activations, as moeify's router computes them: the
        # two contenders then pick the same experts and their outputs can be checked against each other
        logits = nn.functional.linear(x.float(), self.gate.weight.float())  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # [T, E]
        top_w, top_idx = torch.topk(probs, self.k, dim=-1)  # [T, k]
        top_w = (top_w / top_w.sum(dim=-1, keepdim=True)).to(x.dtype)
        expert_mask = nn.functional.one_hot(top_idx, self.num_experts).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()
        return top_w, [(e, *torch.where(expert_mask[e])) for e in hit]

    def forward(self, x: Tensor) -> Tensor:
        top_w, groups = self.route(x)
        out = torch.zeros_like(x)  # [T, D]
        for e, slot, tokens in groups:
            y = self.experts[e](x[tokens]) * top_w[tokens, slot, None]  # [n_e, D]
            out.index_add_(0, tokens, y.to(x.dtype))
        return out


class ExpertsOnly:
    """The loop's expert FFNs on their rows, gathered once up front: the GEMM work with nothing around it."""

    def __init__(self, loop: LoopMoE, x: Tensor):
        with torch.no_grad():
            _, groups = loop.route(x)
        self.experts = [loop.experts[e] for e, _, _ in groups]
        self.rows = [x.detach()[tokens].requires_grad_() for _, _, tokens in groups]  # [n_e, D] each
        self.grads = [torch.randn_like(r) for r in self.rows]  # [n_e, D]: fixed output gradients

    def forward_step(self) -> None:
        with torch.no_grad():
            for expert, rows in zip(self.experts, self.rows, strict=True):
                expert(rows)

    def train_step(self) -> None:
        for expert, rows in zip(self.experts, self.rows, strict=True):
            rows.grad = None
            expert.zero_grad(set_to_none=True)
        self.accumulate_step()

    def accumulate_step(self) -> None:
        """A training step under gradient accumulation: backward adds into the grads of the step before."""
        outs = [expert(rows) for expert, rows in zip(self.experts, self.rows, strict=True)]
        torch.autograd.backward(outs, self.grads)


class DenseLimit(nn.Module):
    """k dense FFNs of width H on all T tokens, summed: the work of top-k with perfect dispatch."""

    def __init__(self, cfg: moeify.MoEConfig):
        super().__init__()
        self.ffns = nn.ModuleList(FFN(cfg.d_model, cfg.d_ff, cfg.activation, cfg.gated, cfg.bias)
                                  for _ in range(cfg.k))

    def forward(self, x: Tensor) -> Tensor:
        out = self.ffns[0](x)
        for ffn in self.ffns[1:]:
            out = out + ffn(x)
        return out


def _forward_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(x)
    return step


def _train_step(model: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        model.zero_grad(set_to_none=True)
        model(x).backward(grad)
    return step


def _accumulate_step(model: nn.Module, x: Tensor, grad: Tensor) -> Callable[[], None]:
    def step() -> None:  # no zero_grad: backward adds into the parameter (and input) grads of the last step
        model(x).backward(grad)
    return step


# pass name -> (step builder, ExpertsOnly method) of each training protocol
PROTOCOLS = {"set_to_none": ("fwd+bwd", _train_step, "train_step"),
             "accumulate": ("fwd+bwd acc", _accumulate_step, "accumulate_step")}


def stream_bandwidth(nbytes: int, repeats: int) -> tuple[float, float]:
    """This machine's (read, write) memory bandwidth in bytes/s: median time to sum, and to fill, a buffer of
    `nbytes` (much larger than the caches, like the stacked expert weights)."""
    buf = torch.ones(nbytes // 4)  # float32
    t = interleaved_medians({"read": lambda: buf.sum(), "write": lambda: buf.fill_(0.0)}, repeats)
    return nbytes / t["read"], nbytes / t["write"]


def weights_floor(cfg: moeify.MoEConfig, read_bw: float, write_bw: float) -> dict[str, float]:
    """Seconds to move the expert weights once per pass that needs them (see the module docstring)."""
    nbytes = cfg.num_experts * (cfg.expert_in_width + cfg.d_ff) * cfg.d_model * 4  # w1 + w2, float32
    return {"forward": nbytes / read_bw, "fwd+bwd": 2 * nbytes / read_bw + nbytes / write_bw,
            "fwd+bwd acc": 3 * nbytes / read_bw + nbytes / write_bw}  # accumulating also reads the grads


def run_case(T: int, E: int, k: int, d_model: int, d_ff: int, activation: str, gated: bool,
             repeats: int, protocols: tuple[str, ...] = ("set_to_none",)) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    cfg = moeify.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=E, k=k, router="topk",
                           activation=activation, gated=gated)
    contenders = {"dense": DenseLimit(cfg), "moeify": moeify.MoELayer(cfg)}
    contenders["loop"] = LoopMoE(contenders["moeify"])
    x = torch.randn(T, d_model, requires_grad=True)  # [T, D]
    with torch.no_grad():  # the loop is the same function as the MoELayer: check before timing anything
        ref, got = contenders["loop"](x), contenders["moeify"](x)
        if not torch.allclose(ref, got, rtol=1e-4, atol=1e-4):
            raise RuntimeError(f"moeify and loop disagree by {(ref - got).abs().max().item():.3g}")
    grad = torch.randn(T, d_model)  # [T, D]
    experts = ExpertsOnly(contenders["loop"], x)
    forward_steps = {n: _forward_step(m, x) for n, m in contenders.items()}
    forward_steps["experts"] = experts.forward_step
    result = {"forward": interleaved_medians(forward_steps, repeats)}
    for protocol in protocols:
        name, build, method = PROTOCOLS[protocol]
        steps = {n: build(m, x, grad) for n, m in contenders.items()}
        steps["experts"] = getattr(experts, method)
        result[name] = interleaved_medians(steps, repeats)
    del contenders
    return result


def _parse_case(parser: argparse.ArgumentParser, text: str) -> tuple[int, int]:
    """"4096x64" -> (4096, 64)."""
    try:
        T, E = (int(part) for part in text.lower().split("x"))
    except ValueError:
        parser.error(f"--case {text!r}: expected T x E as two integers, e.g. 4096x64")
    return T, E


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats per case (default 7)")
    parser.add_argument("--activation", default="gelu")
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-recycle", action="store_true",
                        help="fresh memory for every stacked weight gradient (moeify.dispatch.buffers off)")
    parser.add_argument("--protocol", choices=(*PROTOCOLS, "both"), default="both",
                        help="training protocol(s) of the fwd+bwd rows: set_to_none (zero_grad every step), "
                             "accumulate (gradient accumulation, no zero_grad), both (default)")
    parser.add_argument("--mpo", action="store_true",
                        help="also time MPO experts (expert_param='mpo'): materialised vs contracted on the fly")
    parser.add_argument("--case", action="append", metavar="TxE", default=None,
                        help="run only this shape (T tokens x E experts), e.g. 4096x64; repeatable "
                             "(default: the issue's 4096x8, 4096x64, 1024x128)")
    parser.add_argument("--k", type=int, action="append", choices=(1, 2), default=None,
                        help="run only this k; repeatable (default: 1 and 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: the GPU table in bfloat16 with TFLOP/s (benchmarks/moe_layer_gpu.py)")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
        from moe_layer_gpu import run_table  # benchmarks/ is on sys.path when run as a script

        Console(width=200).print(run_table("cuda", args.quick, args.repeats or (3 if args.quick else 7),
                                           args.activation, args.gated))
        return
    torch.set_num_threads(args.threads)
    protocols = tuple(PROTOCOLS) if args.protocol == "both" else (args.protocol,)
    moeify.dispatch.set_grad_buffer_recycling(not args.no_recycle)
    if args.quick:
        cases, d_model, d_ff, repeats = [(64, 4), (32, 8)], 32, 64, args.repeats or 2
    else:
        cases, d_model, d_ff, repeats = [(4096, 8), (4096, 64), (1024, 128)], 512, 2048, args.repeats or 7
    if args.case:
        cases = [_parse_case(parser, c) for c in args.case]

    table = Table(title=f"MoE layer on CPU: d={d_model}, d_ff={d_ff}, {args.activation}"
                        f"{' gated' if args.gated else ''}, {args.threads} threads, median of {repeats} "
                        f"interleaved repeats (ms){', no gradient recycling' if args.no_recycle else ''}")
    columns = ("T", "E", "k", "pass", "dense", "moeify", "loop", "experts", "floor", "moeify/dense",
               "loop/dense", "loop/moeify", "experts/dense", "moeify/experts", "moeify/floor")
    for col in columns:
        table.add_column(col, justify="right")
    read_bw, write_bw = stream_bandwidth(256 << 20 if not args.quick else 1 << 20, repeats)
    for T, E in cases:
        for k in args.k or (1, 2):
            cfg = moeify.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=E, k=k, gated=args.gated)
            floor = weights_floor(cfg, read_bw, write_bw)
            result = run_case(T, E, k, d_model, d_ff, args.activation, args.gated, repeats, protocols)
            for name, t in result.items():
                t = dict(t, floor=floor[name])
                times = (f"{t[c] * 1e3:.1f}" for c in ("dense", "moeify", "loop", "experts", "floor"))
                ratios = (f"{t[a] / t[b]:.2f}" for a, b in (c.split("/") for c in columns if "/" in c))
                table.add_row(str(T), str(E), str(k), name, *times, *ratios)
    Console(width=200).print(table)
    print(f"floor: memory bandwidth measured at the start, read {read_bw / 1e9:.1f} GB/s, "
          f"write {write_bw / 1e9:.1f} GB/s")
    if args.mpo:
        from mpo_experts import mpo_table  # benchmarks/ is on sys.path when run as a script

        Console(width=200).print(mpo_table(args.quick, repeats))


if __name__ == "__main__":
    main()
