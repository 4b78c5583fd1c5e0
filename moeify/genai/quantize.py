"""Block-wise symmetric weight quantisation in the layout ONNX Runtime's `com.microsoft.QMoE` reads.

Shape legend: E experts, N output rows of a projection, K input columns (the reduced dimension), B block size.

For each expert, row and block of B consecutive input columns: scale = absmax / qmax with
qmax = 2^(bits-1) - 1 (7 for int4, 127 for int8); the stored value is round(w / scale) + 2^(bits-1) (8 or
128), an unsigned integer: 2^(bits-1) is QMoE's default zero point when no zero-point input is given. int4
packs two values per byte, the first (even column) in the low nibble. Checked on onnxruntime 1.31's CPU
provider against `dequantize` (see tests/genai/test_quantize.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeify.errors import MoeifyError

BITS = {"int4": 4, "int8": 8}
BLOCK_SIZES = (32, 16)  # QMoE needs a power of two >= 16 dividing both D and H; the larger is more exact


@dataclass(frozen=True)
class QuantizedWeight:
    """packed [E, N, K * bits / 8] uint8 and scales [E, N, K / B] float32, with the bits and block size."""

    packed: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int


def block_size_for(*widths: int) -> int:
    """The largest supported block size dividing every width (D and H); MoeifyError when none does."""
    for block in BLOCK_SIZES:
        if all(w % block == 0 for w in widths):
            return block
    raise MoeifyError(
        f"int4/int8 experts need widths divisible by 16 (QMoE's smallest block), got "
        f"{', '.join(map(str, widths))}; export with --precision fp32 or fp16"
    )


def quantize(weight: np.ndarray, bits: int, block_size: int) -> QuantizedWeight:
    """weight [E, N, K] float -> QuantizedWeight; K must be a multiple of block_size."""
    E, N, K = weight.shape
    if K % block_size:
        raise MoeifyError(f"cannot quantise {K} columns in blocks of {block_size}")
    offset = 1 << (bits - 1)  # 8 or 128: QMoE's default zero point
    qmax = offset - 1
    blocks = weight.astype(np.float32).reshape(E, N, K // block_size, block_size)  # [E, N, K/B, B]
    scales = np.abs(blocks).max(axis=-1) / qmax  # [E, N, K/B]
    safe = np.where(scales == 0, 1.0, scales)[..., None]  # an all-zero block stores zeros
    q = (
        np.clip(np.rint(blocks / safe), -qmax, qmax).astype(np.int16) + offset
    )  # [E, N, K/B, B] in [1, 2qmax+1]
    q = q.reshape(E, N, K).astype(np.uint8)  # [E, N, K]
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # [E, N, K/2]: even column in the low nibble
    return QuantizedWeight(np.ascontiguousarray(q), scales.astype(np.float32), bits, block_size)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """The float32 weight [E, N, K] that `qw` stands for (the reference QMoE is checked against)."""
    q = qw.packed
    if qw.bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], q.shape[-1] * 2)  # [E, N, K]
    E, N, K = q.shape
    values = q.astype(np.float32) - (1 << (qw.bits - 1))  # [E, N, K]
    blocks = values.reshape(E, N, K // qw.block_size, qw.block_size) * qw.scales[..., None]
    return blocks.reshape(E, N, K)
