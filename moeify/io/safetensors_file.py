"""One safetensors file, read without the safetensors library: its header, checked, and its tensors read
one at a time into fresh memory (what streaming conversion and `moeify.load` need).

Format: 8 bytes little-endian header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {...}}, then the data; offsets count from the end of the header.
Every damage a reader can see before touching data (a short file, bad JSON, offsets past the end, a size
that does not fit the shape) is a one-line MoeifyError naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeify.errors import MoeifyError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024**2


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    nbytes: int


def _damaged(path: Path, what: str) -> MoeifyError:
    return MoeifyError(f"{path} is not a readable safetensors file ({what}); is it corrupt or truncated? "
                       "Download or write it again")


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """(tensors by name, metadata) of the file at `path`, every entry checked against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(path, f"{size} bytes, shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _damaged(path, f"header of {n} bytes in a file of {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise MoeifyError(f"{path} is missing; the checkpoint is incomplete: download it again") from None
    except OSError as e:
        raise MoeifyError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _damaged(path, f"header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise _damaged(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            lo, hi = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(path, f"bad header entry for {name}: {e!r}") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if hi - lo != nbytes or lo < 0:
            raise _damaged(path, f"{name} has {hi - lo} bytes for shape {list(shape)} of {entry['dtype']}")
        if start + hi > size:
            raise _damaged(path, f"{name} ends at byte {start + hi} but the file has {size}")
        tensors[name] = TensorInfo(dtype, shape, start + lo, nbytes)
    return tensors, metadata


def read_tensor(path: Path, info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes read into fresh memory (no mapping stays resident afterwards)."""
    buf = torch.empty(info.nbytes, dtype=torch.uint8)
    if info.nbytes:
        with open(path, "rb") as f:
            f.seek(info.begin)
            got = f.readinto(buf.numpy())
        if got != info.nbytes:
            raise _damaged(path, f"{got} of {info.nbytes} bytes at offset {info.begin}")
    return buf.view(info.dtype).view(info.shape)
