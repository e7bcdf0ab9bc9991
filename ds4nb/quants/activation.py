"""Activation quantization applied by the reference CPU path before quantized dots.

* Q8_0 weights (attention projections, shared experts, output head, MTP
  projections) take the activation as int8 blocks of 32 with a float32 scale
  (``quantize_q8_0``). Unlike ggml's own Q8_0 quantizer the scale stays fp32
  and rounding is round-half-to-even.
* Q2_K / IQ2_XXS routed experts (and Q4_K in the GPU backends) take Q8_K
  blocks of 256 with a signed float32 scale and 16-value partial sums
  (``quantize_q8_K``).

All arithmetic is float32 in the reference's order; ``np.rint`` is the
round-half-to-even of C's ``lrintf`` under the default rounding mode. Blocks
whose largest magnitude is below ~1e-36 (where the reciprocal scale overflows
to inf) are outside the defined domain, as they are in the reference.
"""

from __future__ import annotations

import numpy as np

from ds4nb.quants.formats import QK8_0, QK_K

_Q8_K_BSUM_GROUP = 16


def _as_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, tuple[int, ...], int]:
    """float32 (..., n) -> (..., ceil(n/block), block) zero-padded, plus lead shape and n."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        raise ValueError("activation must have at least one axis")
    *lead, n = x.shape
    n_blocks = -(-n // block)
    pad = n_blocks * block - n
    if pad:
        x = np.concatenate([x, np.zeros((*lead, pad), dtype=np.float32)], axis=-1)
    return x.reshape(*lead, n_blocks, block), tuple(lead), n


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float activations (..., n) to int8 qs (..., n) and fp32 scales (..., ceil(n/32)).

    Per block of 32: ``d = amax / 127``; ``q = rint(x * (1/d))`` clamped to
    [-128, 127] (``1/d`` taken as 0 for an all-zero block). A trailing partial
    block is quantized over its valid values only (zero padding does not change
    ``amax``).
    """
    blocks, lead, n = _as_blocks(x, QK8_0)
    amax = np.abs(blocks).max(axis=-1)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv_d[..., None])
    qs = np.clip(q, -128, 127).astype(np.int8).reshape(*lead, -1)[..., :n]
    return qs, d.astype(np.float32)


def dequantize_q8_0_activation(qs: np.ndarray, d: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Inverse of ``quantize_q8_0``: (..., n) = qs * d of its 32-block (float64: exact)."""
    qs = np.asarray(qs)
    n = qs.shape[-1]
    scale = np.repeat(np.asarray(d, dtype=np.float32).astype(dtype), QK8_0, axis=-1)[..., :n]
    return qs.astype(dtype) * scale


def quantize_q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize float activations (..., n), n % 256 == 0, to Q8_K.

    Returns int8 qs (..., n), float32 d (..., n/256), int16 bsums (..., n/16).
    Per block of 256: ``m`` is the first value of largest magnitude (sign
    kept), ``iscale = -127 / m``, ``q = rint(iscale * x)`` clamped to
    [-128, 127], ``d = 1 / iscale`` (so ``d`` is negative when ``m`` is
    positive and ``x ~= d * q``), ``bsums`` are the sums of each 16 q's. An
    all-zero block has d = 0, q = 0.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"Q8_K needs a multiple of {QK_K} values, got {x.shape[-1]}")
    blocks, lead, n = _as_blocks(x, QK_K)
    first_max = np.abs(blocks).argmax(axis=-1)[..., None]
    signed_max = np.take_along_axis(blocks, first_max, axis=-1)  # (..., nb, 1)
    nonzero = signed_max != 0
    with np.errstate(divide="ignore"):
        iscale = np.where(nonzero, np.float32(-127) / signed_max, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(iscale * blocks), -128, 127).astype(np.int8)
    with np.errstate(divide="ignore"):
        d = np.where(nonzero, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    bsums = q.reshape(*lead, -1, _Q8_K_BSUM_GROUP).sum(axis=-1, dtype=np.int32).astype(np.int16)
    return q.reshape(*lead, n), d[..., 0], bsums


def dequantize_q8_K_activation(qs: np.ndarray, d: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Inverse of ``quantize_q8_K``: (..., n) = qs * d of its 256-block (float64: exact)."""
    scale = np.repeat(np.asarray(d, dtype=np.float32).astype(dtype), QK_K, axis=-1)
    return np.asarray(qs).astype(dtype) * scale
