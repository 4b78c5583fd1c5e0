"""ONNX Runtime sessions for exported models: providers, options, inputs, a run helper.

Providers: CUDA first when this machine has a CUDA device *and* the installed onnxruntime has the CUDA
provider, then CPU. The device check matters: onnxruntime-gpu on a machine without a GPU logs an error and
a warning at every session it is asked to put on CUDA before falling back to CPU, so we only ask when a
device is there (when one is there but the CUDA libraries are missing, ORT's own message is the useful
one and is left alone, and we add a one-line warning that the session runs on CPU).
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from moeify.errors import MoeifyError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_LOG_LEVELS = {"verbose": 0, "info": 1, "warning": 2, "error": 3, "fatal": 4}


@functools.cache
def cuda_device_count() -> int:
    """Number of CUDA devices the driver sees (0 without a driver); asks libcuda, not torch (CPU wheels)."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return int(count.value)
    return 0


def default_providers() -> list[str]:
    """[CUDA, CPU] execution providers where CUDA can work, else [CPU]."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and cuda_device_count() > 0:
        return [CUDA, CPU]
    return [CPU]


def make_session(path: str | Path, providers: Sequence[str] | None = None, threads: int | None = None,
                 optimization: str = "all", log_level: str = "error", spinning: bool | None = None):
    """An `onnxruntime.InferenceSession` for the model at `path`.

    Args:
        providers: execution providers in order of preference; default `default_providers()`.
        threads: intra-op threads (default: onnxruntime's choice, one per physical core).
        optimization: graph optimisation level: "disable", "basic", "extended" or "all".
        log_level: onnxruntime's session log level ("error" hides its informational warnings, e.g. about
            constant folding of float16 nodes).
        spinning: whether idle intra-op threads busy-wait for the next op (onnxruntime's default: yes).
            False when several sessions or processes share the cores: spinning threads of one session
            steal CPU from the others (benchmarks that interleave sessions need it off).
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise MoeifyError(f"ONNX model {path} not found")
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise MoeifyError(f"unknown optimization level {optimization!r}; valid: {', '.join(levels)}")
    if log_level not in _LOG_LEVELS:
        raise MoeifyError(f"unknown log level {log_level!r}; valid: {', '.join(_LOG_LEVELS)}")
    if threads is not None and threads < 1:
        raise MoeifyError(f"threads must be >= 1, got {threads}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = _LOG_LEVELS[log_level]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    wanted = list(providers) if providers is not None else default_providers()
    unknown = [p for p in wanted if p not in ort.get_available_providers()]
    if unknown:
        raise MoeifyError(f"execution provider(s) {', '.join(unknown)} not available; "
                          f"available: {', '.join(ort.get_available_providers())}")
    try:
        session = ort.InferenceSession(os.fspath(path), options, providers=wanted)
    except Exception as e:  # a corrupt file or an op the runtime lacks: say which, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoeifyError(f"onnxruntime could not load {path}: {first[:300]}") from e
    if CUDA in wanted and CUDA not in session.get_providers():
        warnings.warn("the CUDA execution provider could not be loaded; the session runs on CPU",
                      stacklevel=2)
    return session


def _dim(d, name: str, batch: int, seq: int) -> int:
    if isinstance(d, int) and d > 0:
        return d
    name = str(d or name).lower()
    if "batch" in name:
        return batch
    if "token" in name:
        return batch * seq
    return seq


# ONNX Runtime input types -> numpy dtypes
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def random_input(name: str, shape, dtype, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """One made-up input of `shape` and numpy `dtype`: floats standard normal; integers ones for a mask
    (by name), else values in [0, vocab); booleans ones. Every example-input maker (export's
    --input-spec, run's --input NAME=SHAPE, `example_feed`) uses this rule."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        if "mask" in name:
            return np.ones(shape, dtype=dtype)
        return rng.integers(0, vocab, size=shape).astype(dtype)
    if dtype.kind == "b":
        return np.ones(shape, dtype=dtype)
    raise MoeifyError(f"cannot make an example for input {name!r} of type {dtype}; pass it")


def onnx_input_dtype(inp) -> np.dtype:
    """The numpy dtype of an onnxruntime session input (MoeifyError for a type moeify cannot make up)."""
    if inp.type not in _ORT_TYPES:
        raise MoeifyError(f"cannot make an example for input {inp.name!r} of type {inp.type}; pass it")
    return np.dtype(_ORT_TYPES[inp.type])


def example_feed(session, batch: int = 1, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every session input: symbolic axes named batch -> `batch`, tokens -> batch*seq,
    others -> `seq`. Integer inputs: masks get ones, ids small non-negative values (valid for any vocab of
    at least 2 tokens... and the model's vocab_size when the export recorded it)."""
    rng = np.random.default_rng(seed)
    meta = session.get_modelmeta().custom_metadata_map
    vocab = int(meta.get("moeify.vocab_size", 2))
    return {inp.name: random_input(inp.name, [_dim(d, "", batch, seq) for d in inp.shape],
                                   onnx_input_dtype(inp), vocab, rng)
            for inp in session.get_inputs()}


def run(session, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray] | None = None
        ) -> dict[str, np.ndarray]:
    """Run `session`; `inputs` by name, in input order, or None for `example_feed(session)`.

    Returns {output name: array}. Arrays are converted to each input's dtype where they differ (a float64
    NumPy array fed to a float32 model, say).
    """
    specs = session.get_inputs()
    if inputs is None:
        feed = example_feed(session)
    elif isinstance(inputs, Mapping):
        missing = [s.name for s in specs if s.name not in inputs]
        extra = [k for k in inputs if k not in {s.name for s in specs}]
        if missing or extra:
            raise MoeifyError(f"model inputs are {', '.join(s.name for s in specs)}; "
                              f"missing {missing or 'none'}, unexpected {extra or 'none'}")
        feed = dict(inputs)
    else:
        inputs = list(inputs)
        if len(inputs) != len(specs):
            raise MoeifyError(f"model takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}), "
                              f"got {len(inputs)}")
        feed = {s.name: v for s, v in zip(specs, inputs, strict=True)}
    feed = {s.name: _as_input(feed[s.name], s) for s in specs}
    outputs = session.run(None, feed)
    return {o.name: v for o, v in zip(session.get_outputs(), outputs, strict=True)}


_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _as_input(value, spec) -> np.ndarray:
    array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    want = _NP_TYPES.get(spec.type)
    if want is not None and array.dtype != want:
        array = array.astype(want)
    if len(array.shape) != len(spec.shape):
        raise MoeifyError(f"input {spec.name!r} must have {len(spec.shape)} dims {spec.shape}, "
                          f"got shape {tuple(array.shape)}")
    return array
