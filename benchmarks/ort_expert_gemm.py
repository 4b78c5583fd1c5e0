"""Why fp32 loop experts prefill slower than the dense MLP: ONNX Runtime's CPU MatMul on an expert's few rows.

At prefill a top-1 MoE of E experts splits the prompt's T tokens into E groups of about T/E rows, so the dense
MLP's one [T, D] x [D, P] GEMM becomes E GEMMs of [T/E, D] x [D, P], each with its own weight: the same FLOPs,
E times the weight bytes. This times, side by side in one run (medians over interleaved repeats), the GEMM of
the first expert layer (P = 2H: gate and up) in the forms a graph can give ONNX Runtime:

  dense          one MatMul [T, D] x [D, P] (the builder's dense MLP, gate and up as one weight)
  loop           E MatMuls [T/E, D] x [D_e, P], one constant weight each (what moeify's loop experts run)
  loop W^T x^T   E x (Transpose, MatMul(W_e^T [P, D], x^T [D, T/E]), Transpose): the weight as the left
                 operand, the few rows as the right one (the column-major output moeify's torch kernel
                 uses for small groups)
  loop Gemm      E Gemm nodes with transB=1 on W_e^T [P, D]
  loop 1 thread  the loop with intra_op_num_threads=1
  loop parallel  the loop with ORT_PARALLEL execution (inter-op 2 threads, intra-op 1): two experts at once
  batched        one MatMul [E, T/E, D] x [E, D, P] (a stacked constant weight)
  1 row each     E MatMuls of one row each: what streaming the E weights from memory costs with almost no
                 arithmetic (the floor for any form that reads every expert's weight)

Printed per form: ms, x dense, GFLOP/s and the rate the weights stream at (GB/s). At D=2048, P=11264 (LLaMA
d=2048's gate + up), T=128, E=8 on the 2-core dev machine the E small GEMMs run far below both the dense
GEMM's FLOP rate and the memory's bandwidth, and no form above beats the plain loop: the README's speed
section quotes the run.

Run: python benchmarks/ort_expert_gemm.py [--quick] [--d-model D] [--width P] [--tokens T] [--experts E]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved_medians  # noqa: E402

IR_VERSION = 8  # what ONNX Runtime 1.31 loads (the onnx package's default is newer)


def _session(nodes, inputs: dict[str, tuple[int, ...]], outputs: dict[str, tuple[int, ...]], weights: dict,
             threads: int = 2, parallel: bool = False):
    """An ORT CPU session of `nodes` with float inputs/outputs of the given shapes and constant `weights`."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes, "gemm",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if parallel:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _loop(weights: np.ndarray, rows: int, form: str = "matmul", **session_kw):
    """E nodes (one per expert weight [D, P]) on `rows` rows each; returns (session, feeds)."""
    from onnx import helper

    E, D, P = weights.shape
    nodes, consts = [], {}
    for e in range(E):
        if form == "matmul":
            consts[f"w{e}"] = weights[e]
            nodes.append(helper.make_node("MatMul", [f"x{e}", f"w{e}"], [f"y{e}"]))
        elif form == "gemm":
            consts[f"w{e}"] = np.ascontiguousarray(weights[e].T)  # [P, D]
            nodes.append(helper.make_node("Gemm", [f"x{e}", f"w{e}"], [f"y{e}"], transB=1))
        else:  # "transposed": y^T [P, rows] = W^T [P, D] @ x^T [D, rows]
            consts[f"w{e}"] = np.ascontiguousarray(weights[e].T)  # [P, D]
            nodes += [helper.make_node("Transpose", [f"x{e}"], [f"xt{e}"], perm=[1, 0]),
                      helper.make_node("MatMul", [f"w{e}", f"xt{e}"], [f"yt{e}"]),
                      helper.make_node("Transpose", [f"yt{e}"], [f"y{e}"], perm=[1, 0])]
    session = _session(nodes, {f"x{e}": (rows, D) for e in range(E)}, {f"y{e}": (rows, P) for e in range(E)},
                       consts, **session_kw)
    rng = np.random.default_rng(1)
    return session, {f"x{e}": rng.standard_normal((rows, D), dtype=np.float32) for e in range(E)}


def _one(inputs_shape: tuple[int, ...], weight: np.ndarray, out_shape: tuple[int, ...]):
    """One MatMul node x [inputs_shape] @ weight; returns (session, feeds)."""
    from onnx import helper

    session = _session([helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": inputs_shape}, {"y": out_shape},
                       {"w": weight})
    return session, {"x": np.random.default_rng(1).standard_normal(inputs_shape, dtype=np.float32)}


def forms(D: int, P: int, T: int, E: int) -> dict[str, tuple]:
    """name -> (session, feeds, rows per run for the FLOP count, weight bytes read per run)."""
    weights = np.random.default_rng(0).standard_normal((E, D, P), dtype=np.float32) * 0.02  # [E, D, P]
    rows = max(1, T // E)
    one, all_e = weights[0].nbytes, weights.nbytes
    return {
        "dense": (*_one((T, D), weights[0], (T, P)), T, one),
        "loop": (*_loop(weights, rows), rows * E, all_e),
        "loop W^T x^T": (*_loop(weights, rows, "transposed"), rows * E, all_e),
        "loop Gemm": (*_loop(weights, rows, "gemm"), rows * E, all_e),
        "loop 1 thread": (*_loop(weights, rows, threads=1), rows * E, all_e),
        "loop parallel": (*_loop(weights, rows, threads=1, parallel=True), rows * E, all_e),
        "batched": (*_one((E, rows, D), weights, (E, rows, P)), rows * E, all_e),
        "1 row each": (*_loop(weights, 1), E, all_e),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats (smoke test)")
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--width", type=int, default=11264, help="P, the GEMM's output width (gate + up)")
    parser.add_argument("--tokens", type=int, default=128, help="T, the prompt's tokens")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    if args.quick:
        args.d_model, args.width, args.tokens, args.repeats = 64, 256, 32, 2
    from rich.console import Console
    from rich.table import Table

    D, P, T, E = args.d_model, args.width, args.tokens, args.experts
    built = forms(D, P, T, E)
    steps = {name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f, _, _) in built.items()}
    medians = interleaved_medians(steps, args.repeats)
    table = Table(title=f"ONNX Runtime CPU fp32 GEMMs of one expert layer: D={D}, P={P}, T={T} tokens, "
                        f"E={E} experts (T/E={max(1, T // E)} rows each), median of {args.repeats} "
                        "interleaved repeats")
    for column in ("form", "ms", "x dense", "GFLOP/s", "weights GB/s"):
        table.add_column(column, justify="left" if column == "form" else "right")
    for name, (_, _, rows, nbytes) in built.items():
        seconds = medians[name]
        table.add_row(name, f"{seconds * 1e3:.2f}", f"{seconds / medians['dense']:.2f}",
                      f"{2 * rows * D * P / seconds / 1e9:.1f}", f"{nbytes / seconds / 1e9:.1f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
