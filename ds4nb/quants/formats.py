"""GGUF block layouts and vectorised numpy dequantizers for the DS4 weight types.

Every quantized type is described by a numpy structured dtype whose fields are
the block's fields in file order (little-endian, packed, no padding), so that
``raw.view(BLOCK_DTYPE[qtype])`` turns tensor bytes into an array of blocks and
the dequantizers below read field by field like the format description in
docs/runtime.md.

Shapes are in numpy order: the last axis is GGUF ``ne[0]``, the contiguous row.
A row of ``n_cols`` values is ``n_cols / block_size`` consecutive blocks.

The float arithmetic of each dequantizer follows ggml's reference order
(``d * scale`` first, then times the quant, then minus ``dmin * min``) so the
results are bit-identical to ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import IQ2_XXS as _GGUF_IQ2_XXS

Q = GGMLQuantizationType

QK_K = 256  # values per K-quant / IQ super-block
QK8_0 = 32  # values per Q8_0 block

# ---------------------------------------------------------------------------
# Block layouts (one record = one block, fields in file order).
# ---------------------------------------------------------------------------

#: Q8_0, 34 bytes / 32 values: value = d * qs[i].
BLOCK_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", (QK8_0,))])

#: Q4_K, 144 bytes / 256 values: 8 sub-blocks of 32, 6-bit scale+min each.
BLOCK_Q4_K = np.dtype(
    [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", (12,)), ("qs", "u1", (QK_K // 2,))]
)

#: Q2_K, 84 bytes / 256 values: 16 sub-blocks of 16, 4-bit scale+min each.
BLOCK_Q2_K = np.dtype(
    [("scales", "u1", (QK_K // 16,)), ("qs", "u1", (QK_K // 4,)), ("d", "<f2"), ("dmin", "<f2")]
)

#: IQ2_XXS, 66 bytes / 256 values: 8 groups of 32, each two uint32 words
#: (word 0: four grid indices, word 1: four 7-bit sign indices + 4-bit scale).
BLOCK_IQ2_XXS = np.dtype([("d", "<f2"), ("qs", "<u4", (QK_K // 32, 2))])

#: Q8_K activation block (never stored in GGUF files), 292 bytes / 256 values.
BLOCK_Q8_K = np.dtype([("d", "<f4"), ("qs", "i1", (QK_K,)), ("bsums", "<i2", (QK_K // 16,))])

BLOCK_DTYPE: dict[GGMLQuantizationType, np.dtype] = {
    Q.Q8_0: BLOCK_Q8_0,
    Q.Q4_K: BLOCK_Q4_K,
    Q.Q2_K: BLOCK_Q2_K,
    Q.IQ2_XXS: BLOCK_IQ2_XXS,
}

#: Plain element types: the raw bytes are already the values.
ELEMENT_DTYPE: dict[GGMLQuantizationType, np.dtype] = {
    Q.F32: np.dtype("<f4"),
    Q.F16: np.dtype("<f2"),
    Q.BF16: np.dtype("<u2"),  # upper half of an fp32
    Q.I32: np.dtype("<i4"),
}

SUPPORTED_TYPES: tuple[GGMLQuantizationType, ...] = (*ELEMENT_DTYPE, *BLOCK_DTYPE)

for _qtype, _dt in BLOCK_DTYPE.items():
    assert _dt.itemsize == GGML_QUANT_SIZES[_qtype][1], _qtype
assert BLOCK_Q8_K.itemsize == GGML_QUANT_SIZES[Q.Q8_K][1]


def block_size(qtype: GGMLQuantizationType) -> int:
    """Values per block (1 for plain element types)."""
    return GGML_QUANT_SIZES[qtype][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block (bytes per element for plain types)."""
    return GGML_QUANT_SIZES[qtype][1]


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` values."""
    bs = block_size(qtype)
    if n_cols % bs:
        raise ValueError(f"{qtype.name} rows must be a multiple of {bs} values, got {n_cols}")
    return n_cols // bs * type_size(qtype)


# ---------------------------------------------------------------------------
# IQ2_XXS lookup tables (taken from gguf's package, not transcribed).
# ---------------------------------------------------------------------------


@cache
def iq2xxs_grid() -> np.ndarray:
    """(256, 8) uint8: the 256 grid points, each 8 magnitudes from {8, 25, 43}."""
    _GGUF_IQ2_XXS.init_grid()
    assert _GGUF_IQ2_XXS.grid is not None
    grid = _GGUF_IQ2_XXS.grid.reshape(256, 8).astype(np.uint8)
    grid.setflags(write=False)
    return grid


@cache
def iq2xxs_sign_bytes() -> np.ndarray:
    """(128,) uint8: 7 stored sign bits + an even-parity 8th bit (bit j set: value j negative)."""
    ksigns = np.frombuffer(_GGUF_IQ2_XXS.ksigns, dtype=np.uint8).copy()
    assert ksigns.shape == (128,)
    ksigns.setflags(write=False)
    return ksigns


@cache
def iq2xxs_signs() -> np.ndarray:
    """(128, 8) float32 of +1/-1: the sign pattern selected by a 7-bit sign index."""
    bits = (iq2xxs_sign_bytes()[:, None] >> np.arange(8, dtype=np.uint8)) & 1
    signs = np.where(bits == 1, np.float32(-1), np.float32(1))
    signs.setflags(write=False)
    return signs


@cache
def iq2xxs_signed_grid() -> np.ndarray:
    """(256, 128, 8) float32: grid point ``g`` with sign pattern ``s`` applied."""
    signed = iq2xxs_grid()[:, None, :].astype(np.float32) * iq2xxs_signs()[None, :, :]
    signed.setflags(write=False)
    return signed


# ---------------------------------------------------------------------------
# Per-type block dequantizers: structured blocks (n,) -> (n, block_size) of dtype ``dt``
# (float32: gguf's values; float64: the exact values the blocks encode)
# ---------------------------------------------------------------------------


def _dequantize_q8_0(b: np.ndarray, dt: type) -> np.ndarray:
    return b["qs"].astype(dt) * b["d"].astype(dt)[:, None]


def q4_k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack Q4_K's 12 scale bytes into 8 six-bit scales and 8 six-bit mins.

    Bytes 0..3 hold scales 0..3 in their low 6 bits, bytes 4..7 mins 0..3; for
    sub-blocks 4..7 the low 4 bits come from bytes 8..11 (scale: low nibble,
    min: high nibble) and the top 2 bits from the spare top bits of bytes 0..3
    (scales) and 4..7 (mins).
    """
    lo, hi, ext = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (ext & 0x0F) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 0x3F, (ext >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _dequantize_q4_k(b: np.ndarray, dt: type) -> np.ndarray:
    n = b.shape[0]
    sc, mn = q4_k_scales_mins(b["scales"])
    dl = (b["d"].astype(dt)[:, None] * sc.astype(dt))[:, :, None]  # (n, 8, 1)
    ml = (b["dmin"].astype(dt)[:, None] * mn.astype(dt))[:, :, None]
    # qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in the low nibbles
    # and sub-block 2c+1 in the high nibbles.
    qs = b["qs"].reshape(n, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]
    q = (qs & 0x0F).reshape(n, 8, 32).astype(dt)
    return (dl * q - ml).reshape(n, QK_K)


def _dequantize_q2_k(b: np.ndarray, dt: type) -> np.ndarray:
    n = b.shape[0]
    scales = b["scales"]
    dl = (b["d"].astype(dt)[:, None] * (scales & 0x0F).astype(dt))[:, :, None]  # (n, 16, 1)
    ml = (b["dmin"].astype(dt)[:, None] * (scales >> 4).astype(dt))[:, :, None]
    # qs: 2 halves of 32 bytes; half h, bit-pair k (shift 2k) gives the 32
    # values h*128 + k*32 + [0, 32).
    qs = b["qs"].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8)[:, None]
    q = (qs & 0x03).reshape(n, 16, 16).astype(dt)
    return (dl * q - ml).reshape(n, QK_K)


def _dequantize_iq2_xxs(b: np.ndarray, dt: type) -> np.ndarray:
    n = b.shape[0]
    words = b["qs"]  # (n, 8, 2) uint32: one word pair per group of 32 values
    grid_word, sign_word = words[..., 0, None], words[..., 1, None]  # (n, 8, 1)
    grid_idx = (grid_word >> np.array([0, 8, 16, 24], dtype=np.uint32)) & 0xFF  # (n, 8, 4)
    sign_idx = (sign_word >> np.array([0, 7, 14, 21], dtype=np.uint32)) & 0x7F  # (n, 8, 4)
    scale4 = (sign_word[..., 0] >> 28).astype(dt)  # (n, 8)
    db = b["d"].astype(dt)[:, None] * (dt(0.5) + scale4) * dt(0.25)   # exact in float32 too
    points = iq2xxs_signed_grid()[grid_idx, sign_idx]  # (n, 8, 4, 8): 4 signed points of 8
    return (db[:, :, None, None] * points).reshape(n, QK_K)


_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    Q.Q8_0: _dequantize_q8_0,
    Q.Q4_K: _dequantize_q4_k,
    Q.Q2_K: _dequantize_q2_k,
    Q.IQ2_XXS: _dequantize_iq2_xxs,
}


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...],
               dtype: type = np.float32) -> np.ndarray:
    """Dequantize the bytes of a whole tensor to ``dtype`` of numpy-order ``shape``.

    ``raw`` is a contiguous uint8 array (typically a read-only memmap slice)
    holding exactly the tensor's bytes. I32 tensors are returned as int32.
    ``dtype=np.float32`` gives gguf's values (bit-exact with its dequantizers);
    ``np.float64`` the exact values the blocks encode (Q2_K / Q4_K
    ``d*sc*q - dmin*m`` need more than float32's 24 bits; docs/model.md,
    "Numerics").
    """
    dtype = np.dtype(dtype).type
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dequantize to float32 or float64, not {np.dtype(dtype).name}")
    shape = tuple(int(s) for s in shape)
    if qtype not in SUPPORTED_TYPES:
        raise NotImplementedError(f"no dequantizer for {qtype.name}")
    n_cols = shape[-1] if shape else 1
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    expected = n_rows * row_bytes(qtype, n_cols)
    flat = np.asarray(raw).reshape(-1)
    if flat.dtype != np.uint8:
        raise TypeError(f"raw must be uint8 bytes, got {flat.dtype}")
    if flat.size != expected:
        raise ValueError(f"{qtype.name} {shape} needs {expected} bytes, got {flat.size}")

    if qtype in ELEMENT_DTYPE:
        values = flat.view(ELEMENT_DTYPE[qtype])
        if qtype == Q.BF16:
            out = _bf16_to_f32(values).astype(dtype)
        elif qtype == Q.I32:
            out = values.copy()
        else:
            out = values.astype(dtype)
        return out.reshape(shape)

    blocks = flat.view(BLOCK_DTYPE[qtype])
    return _BLOCK_DEQUANTIZERS[qtype](blocks, dtype).reshape(shape)


def row_slice(qtype: GGMLQuantizationType, n_cols: int, start: int, stop: int) -> slice:
    """Byte range of rows ``[start, stop)`` inside a tensor of ``n_cols``-wide rows."""
    if not 0 <= start <= stop:
        raise ValueError(f"bad row range [{start}, {stop})")
    rb = row_bytes(qtype, n_cols)
    return slice(start * rb, stop * rb)


def dequantize_rows(
    raw: np.ndarray, qtype: GGMLQuantizationType, n_cols: int, start: int, stop: int,
    dtype: type = np.float32,
) -> np.ndarray:
    """Dequantize rows ``[start, stop)`` of a 2-D view of the tensor, reading only their bytes."""
    flat = np.asarray(raw).reshape(-1)
    byte_range = row_slice(qtype, n_cols, start, stop)
    if byte_range.stop > flat.size:
        raise ValueError(f"rows [{start}, {stop}) exceed the {flat.size}-byte tensor")
    return dequantize(flat[byte_range], qtype, (stop - start, n_cols), dtype)
