"""The two measurements behind the CPU dispatch kernel's design choices, each as a side-by-side ratio.

Shape legend: n rows in one expert's group, D d_model, H d_ff, E experts.

1. GEMM output layout by group size (`moeify.dispatch.ops.COLMAJOR_MAX_ROWS`): one expert's forward,
   h = x @ w1[e].T, gelu, y = a @ w2[e].T, over E experts of n rows each, with h, a and y all row-major
   (the natural layout), all column-major, or mixed: the GEMM outputs h and y column-major, the activation
   a (the second GEMM's input) row-major, which is what the kernel does. MKL is much slower on the
   row-major form for small n, and on the all-column-major one for n <= ~10. The last
   columns give the better layout's GEMM rate and its fraction of the rate on one dense block of all rows:
   the floor of any per-group GEMM dispatch relative to the dense limit.
2. Fresh vs recycled stacked-gradient memory (`moeify.dispatch.buffers`): writing one [E, H, D] gradient
   with the backward's per-expert outer products, into a new allocation each time (glibc mmaps it, so
   every 4 KiB page faults on first touch) vs into a buffer written before.

Medians over interleaved repeats; on a shared machine read the ratios, not the times.
Run: python benchmarks/dispatch_choices.py [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from timing import interleaved_medians  # benchmarks/ is on sys.path when run as a script

Tensor = torch.Tensor


def medians(steps: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each step over `repeats` interleaved rounds."""
    return {name: t * 1e3 for name, t in interleaved_medians(steps, repeats).items()}


def group_outputs(E: int, n: int, cols: int, colmajor: bool) -> list[Tensor]:
    """E per-expert [n, cols] output buffers, column-major when asked."""
    if colmajor:
        return list(torch.empty(E, cols, n).transpose(1, 2))
    return list(torch.empty(E, n, cols))


def layout_case(E: int, n: int, D: int, H: int, repeats: int) -> dict[str, float]:
    w1, w2 = torch.randn(E, H, D), torch.randn(E, D, H)  # [E, H, D], [E, D, H]
    xs = torch.randn(E, n, D)  # [E, n, D]

    def expert_forward(colmajor: bool, a_colmajor: bool) -> Callable[[], None]:
        h, y = (group_outputs(E, n, cols, colmajor) for cols in (H, D))
        a = group_outputs(E, n, H, a_colmajor)

        def step() -> None:
            for e in range(E):
                torch.mm(xs[e], w1[e].t(), out=h[e])  # [n, H]
                torch.ops.aten.gelu.out(h[e], out=a[e])
                torch.mm(a[e], w2[e].t(), out=y[e])  # [n, D]
        return step

    return medians({"row-major": expert_forward(False, False), "column-major": expert_forward(True, True),
                    "mixed": expert_forward(True, False)}, repeats)


def grad_memory_case(E: int, n: int, D: int, H: int, repeats: int) -> dict[str, float]:
    gh, xs = torch.randn(E, n, H), torch.randn(E, n, D)  # [E, n, H], [E, n, D]
    kept = torch.empty(E, H, D)  # [E, H, D]

    def write_into(fresh: bool) -> Callable[[], None]:
        def step() -> None:
            grad = torch.empty(E, H, D) if fresh else kept
            for e in range(E):
                torch.mm(gh[e].t(), xs[e], out=grad[e])  # [H, D]
        return step

    return medians({"fresh": write_into(True), "recycled": write_into(False)}, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        D, H, E, sizes, repeats, grad_E = 16, 32, 4, [4, 16], 2, 4
    else:
        D, H, E, sizes, repeats, grad_E = 512, 2048, 32, [4, 8, 16, 24, 32, 48, 64, 128], 7, 64
    print(f"1. one expert's forward GEMMs by output layout: d={D}, d_ff={H}, {E} experts of n rows, "
          f"{args.threads} threads, median of {repeats} (ms)")
    dense_n = E * max(sizes)  # the same FFN on all rows at once: what a dense layer gets out of the GEMMs
    dense = layout_case(1, dense_n, D, H, repeats)["row-major"]
    dense_rate = 4 * dense_n * D * H / dense / 1e6  # GFLOP/s: two GEMMs of 2*n*D*H FLOPs each
    print(f"{'n':>5} {'row-major':>10} {'col-major':>10} {'mixed':>8} {'col/row':>8} {'mixed/row':>10} "
          f"{'best GF/s':>10} {'of dense':>9}")
    for n in sizes:
        t = layout_case(E, n, D, H, repeats)
        rate = 4 * E * n * D * H / min(t.values()) / 1e6
        print(f"{n:>5} {t['row-major']:>10.1f} {t['column-major']:>10.1f} {t['mixed']:>8.1f} "
              f"{t['column-major'] / t['row-major']:>8.2f} {t['mixed'] / t['row-major']:>10.2f} "
              f"{rate:>10.0f} {rate / dense_rate:>9.2f}")
    print(f"dense: one expert's forward on all {dense_n} rows, {dense:.1f} ms, {dense_rate:.0f} GF/s")
    n = 16 if not args.quick else 4
    t = grad_memory_case(grad_E, n, D, H, repeats)
    mib = grad_E * H * D * 4 / 2**20
    print(f"\n2. writing one stacked weight gradient [{grad_E}, {H}, {D}] ({mib:.0f} MiB, outer products of "
          f"n={n}): fresh {t['fresh']:.1f} ms, recycled {t['recycled']:.1f} ms, "
          f"fresh/recycled {t['fresh'] / t['recycled']:.2f}")


if __name__ == "__main__":
    main()
