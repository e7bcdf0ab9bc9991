"""Random, valid tensor bytes for synthetic DS4 models.

For the block types every bit of the quant/scale/sign/grid fields is taken
from uniform random bytes (all bit patterns are valid there); only the fp16
super-scales ``d`` / ``dmin`` are then overwritten with finite values. ``d``
(and independently ``dmin``) get a per-block jitter in [0.5, 1.5) around a
mean chosen in closed form so that the dequantized RMS matches ``rms``, and
``dmin`` is centred so that the expected value of the weights is zero.
The per-block variation makes a kernel that uses the wrong block's scale
produce visibly wrong results.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf.constants import GGMLQuantizationType

from ds4nb.quants.formats import BLOCK_DTYPE, iq2xxs_grid, row_bytes

Q = GGMLQuantizationType

_F16_MAX = 65504.0
_F16_MIN_USEFUL = 2.0**-18  # below this an fp16 subnormal has < ~6 significant bits
_JITTER_LO, _JITTER_HI = 0.5, 1.5
_JITTER_MEAN = (_JITTER_LO + _JITTER_HI) / 2
_JITTER_MEAN_SQ = (_JITTER_HI**3 - _JITTER_LO**3) / (3 * (_JITTER_HI - _JITTER_LO))


def _mean(v: np.ndarray) -> float:
    return float(np.mean(np.asarray(v, dtype=np.float64)))


def _mean_sq(v: np.ndarray) -> float:
    return _mean(np.asarray(v, dtype=np.float64) ** 2)


class _AffineMoments(NamedTuple):
    """value = d * sc * q - dmin * mn with sc, q, mn independent uniform integers."""

    sc: np.ndarray
    q: np.ndarray
    mn: np.ndarray

    def dmin_over_d(self) -> float:
        """dmin / d that makes E[value] zero."""
        return _mean(self.sc) * _mean(self.q) / _mean(self.mn)

    def rms_over_d(self) -> float:
        """RMS(value) / mean(d) for jittered d and independently jittered dmin = ratio * d."""
        r = self.dmin_over_d()
        e_sq = (
            _JITTER_MEAN_SQ * _mean_sq(self.sc) * _mean_sq(self.q)
            - 2 * r * _JITTER_MEAN**2 * _mean(self.sc) * _mean(self.q) * _mean(self.mn)
            + r * r * _JITTER_MEAN_SQ * _mean_sq(self.mn)
        )
        return float(np.sqrt(e_sq))


_Q4_K = _AffineMoments(sc=np.arange(64), q=np.arange(16), mn=np.arange(64))
_Q2_K = _AffineMoments(sc=np.arange(16), q=np.arange(4), mn=np.arange(16))


def _q8_0_rms_over_d() -> float:
    return float(np.sqrt(_JITTER_MEAN_SQ * _mean_sq(np.arange(-128, 128))))


def _iq2_xxs_rms_over_d() -> float:
    """value = d * (0.5 + s) / 4 * grid * sign, s a uniform 4-bit scale."""
    return float(np.sqrt(_JITTER_MEAN_SQ * _mean_sq(0.5 + np.arange(16)) / 16 * _mean_sq(iq2xxs_grid())))


def _jittered_f16(rng: np.random.Generator, mean: float, n: int, qtype: GGMLQuantizationType) -> np.ndarray:
    if not (_JITTER_HI * mean < _F16_MAX and _JITTER_LO * mean >= _F16_MIN_USEFUL):
        raise ValueError(f"{qtype.name}: block scale {mean:.3g} is out of fp16 range; change rms")
    jitter = rng.random(n, dtype=np.float32) * np.float32(_JITTER_HI - _JITTER_LO) + np.float32(_JITTER_LO)
    return (np.float32(mean) * jitter).astype(np.float16)


def _n_elements(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _random_float(qtype: GGMLQuantizationType, n: int, rng: np.random.Generator, rms: float) -> np.ndarray:
    values = rng.standard_normal(n, dtype=np.float32)
    values *= np.float32(rms)
    if qtype == Q.F32:
        return values.view(np.uint8)
    if qtype == Q.F16:
        if 8 * rms >= _F16_MAX:
            raise ValueError(f"F16: rms {rms} risks overflow to inf")
        return values.astype(np.float16).view(np.uint8)
    # BF16: round the fp32 bits to nearest-even on the upper 16 bits.
    bits = values.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    return (bits >> 16).astype(np.uint16).view(np.uint8)


def random_blocks(
    qtype: GGMLQuantizationType, shape: tuple[int, ...], rng: np.random.Generator, rms: float = 1.0
) -> np.ndarray:
    """Raw bytes (1-D uint8) of a random tensor of numpy-order ``shape``.

    The dequantized values are finite and have RMS close to ``rms`` (in
    expectation; a few hundred blocks give it within a few percent). The
    output depends only on ``qtype``, ``shape``, ``rms`` and the rng state.
    """
    shape = tuple(int(s) for s in shape)
    if rms <= 0 or not np.isfinite(rms):
        raise ValueError(f"rms must be positive and finite, got {rms}")
    n_cols = shape[-1] if shape else 1
    n_bytes = _n_elements(shape[:-1]) * row_bytes(qtype, n_cols)

    if qtype in (Q.F32, Q.F16, Q.BF16):
        return _random_float(qtype, _n_elements(shape), rng, rms)
    if qtype not in BLOCK_DTYPE:
        raise NotImplementedError(f"no random generator for {qtype.name}")

    raw = rng.integers(0, 256, size=n_bytes, dtype=np.uint8)
    blocks = raw.view(BLOCK_DTYPE[qtype])
    n = blocks.shape[0]
    if qtype == Q.Q8_0:
        blocks["d"] = _jittered_f16(rng, rms / _q8_0_rms_over_d(), n, qtype)
    elif qtype == Q.IQ2_XXS:
        blocks["d"] = _jittered_f16(rng, rms / _iq2_xxs_rms_over_d(), n, qtype)
    else:
        moments = _Q4_K if qtype == Q.Q4_K else _Q2_K
        d_mean = rms / moments.rms_over_d()
        blocks["d"] = _jittered_f16(rng, d_mean, n, qtype)
        blocks["dmin"] = _jittered_f16(rng, d_mean * moments.dmin_over_d(), n, qtype)
    return raw
