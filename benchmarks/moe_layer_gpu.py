"""MoE layer speed on a GPU in bfloat16, with achieved TFLOP/s (`benchmarks/moe_layer.py --device cuda`).

Shape legend: T tokens, D d_model, H d_ff per expert (H1 = 2H when gated), E experts, k experts per token.

Contenders (the same classes as the CPU table in moe_layer.py, moved to the device in bfloat16):
  moeify  MoELayer with the top-k router; on CUDA its dispatch op runs the grouped-GEMM kernels
          (Triton permutation, `torch._grouped_mm`).
  loop    the Hugging Face Mixtral-style Python loop over a ModuleList of experts (views of moeify's weights).
  dense   k dense FFNs of width H on all T tokens: the same FLOPs with perfect dispatch.
  gemm    not a contender: the rate of one plain bfloat16 GEMM of the layer's largest shape ([T, D] @ [D, H1])
          measured in the same run, the yardstick for "achieved" (the mark: moeify >= 60% of it at E=64,
          k=8, and >= 3x the loop).
FLOPs counted: the expert GEMMs only, 2 * T * k * D * (H1 + H) forward and 3x that forward + backward (the
router's 2 * T * D * E and the elementwise work are left out, for all contenders alike). Times are medians
over interleaved repeats, each step followed by a device synchronisation.

The full run (T=16384, d=2048, d_ff 8192 and 1408, E 8/64/128, k 2/8) needs a GPU with ~40 GiB free;
`--quick` runs tiny shapes (also on the CPU, where tests use it as a smoke test of this code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from moe_layer import DenseLimit, LoopMoE, _forward_step, _train_step
from rich.table import Table
from timing import interleaved_medians

import moeify

FULL = dict(T=16384, d_model=2048, d_ffs=(8192, 1408), experts=(8, 64, 128), ks=(2, 8))
QUICK = dict(T=64, d_model=32, d_ffs=(64,), experts=(4, 8), ks=(2,))
COLUMNS = ("d_ff", "E", "k", "pass", "dense ms", "moeify ms", "loop ms", "dense TF/s", "moeify TF/s",
           "loop TF/s", "moeify/gemm", "loop/moeify")


def _synced(step: Callable[[], None], device: torch.device) -> Callable[[], None]:
    if device.type != "cuda":
        return step

    def run() -> None:
        step()
        torch.cuda.synchronize(device)
    return run


def gemm_rate(T: int, d_model: int, width: int, device: torch.device, dtype: torch.dtype,
              repeats: int) -> float:
    """FLOP/s of one [T, D] @ [D, width] GEMM in `dtype` on `device`."""
    a = torch.randn(T, d_model, device=device, dtype=dtype)  # [T, D]
    b = torch.randn(d_model, width, device=device, dtype=dtype)  # [D, width]
    t = interleaved_medians({"gemm": _synced(lambda: a @ b, device)}, repeats)["gemm"]
    return 2 * T * d_model * width / t


def expert_flops(cfg: moeify.MoEConfig, T: int) -> dict[str, float]:
    forward = 2 * T * cfg.k * cfg.d_model * (cfg.expert_in_width + cfg.d_ff)
    return {"forward": forward, "fwd+bwd": 3 * forward}


def run_case(cfg: moeify.MoEConfig, T: int, device: torch.device, dtype: torch.dtype,
             repeats: int) -> dict[str, dict[str, float]]:
    """Median seconds per pass ("forward", "fwd+bwd") per contender ("dense", "moeify", "loop")."""
    torch.manual_seed(0)
    with device:  # built and initialised on the device (at E=128, d_ff=8192 the float32 init is 24 GiB)
        layer = moeify.MoELayer(cfg).to(dtype)
        contenders = {"dense": DenseLimit(cfg).to(dtype), "moeify": layer, "loop": LoopMoE(layer)}
    x = torch.randn(T, cfg.d_model, device=device, dtype=dtype, requires_grad=True)  # [T, D]
    with torch.no_grad():  # same function: check before timing (relative error over the whole output)
        ref, got = contenders["loop"](x).float(), layer(x).float()
        err = float((ref - got).norm() / ref.norm().clamp(min=1e-9))
        if err > 2e-2:
            raise RuntimeError(f"moeify and loop disagree: relative error {err:.3g}")
    grad = torch.randn(T, cfg.d_model, device=device, dtype=dtype)  # [T, D]
    forward = {n: _synced(_forward_step(m, x), device) for n, m in contenders.items()}
    train = {n: _synced(_train_step(m, x, grad), device) for n, m in contenders.items()}
    result = {"forward": interleaved_medians(forward, repeats),
              "fwd+bwd": interleaved_medians(train, repeats)}
    del contenders, layer, x, grad, forward, train
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run_table(device: str, quick: bool, repeats: int, activation: str, gated: bool,
              dtype: torch.dtype = torch.bfloat16) -> Table:
    dev = torch.device(device)
    shapes = QUICK if quick else FULL
    T, d_model = shapes["T"], shapes["d_model"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    table = Table(title=f"MoE layer on {name}: T={T}, d={d_model}, {activation}{' gated' if gated else ''}, "
                        f"{str(dtype).removeprefix('torch.')}, median of {repeats} interleaved repeats")
    for col in COLUMNS:
        table.add_column(col, justify="right")
    gemms = []
    for d_ff in shapes["d_ffs"]:
        H1 = 2 * d_ff if gated else d_ff
        rate = gemm_rate(T, d_model, H1, dev, dtype, repeats)
        gemms.append(f"gemm [{T}, {d_model}] @ [{d_model}, {H1}]: {rate / 1e12:.1f} TF/s")
        for E in shapes["experts"]:
            for k in shapes["ks"]:
                cfg = moeify.MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=E, k=k, router="topk",
                                       activation=activation, gated=gated)
                flops = expert_flops(cfg, T)
                for pass_name, t in run_case(cfg, T, dev, dtype, repeats).items():
                    tflops = {c: flops[pass_name] / t[c] / 1e12 for c in ("dense", "moeify", "loop")}
                    table.add_row(str(d_ff), str(E), str(k), pass_name,
                                  *(f"{t[c] * 1e3:.2f}" for c in ("dense", "moeify", "loop")),
                                  *(f"{tflops[c]:.1f}" for c in ("dense", "moeify", "loop")),
                                  f"{100 * tflops['moeify'] * 1e12 / rate:.0f}%",
                                  f"{t['loop'] / t['moeify']:.2f}")
    table.caption = "; ".join(gemms) + " (moeify/gemm: moeify's TFLOP/s over that GEMM's)"
    return table
