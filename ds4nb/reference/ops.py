"""The DS4 math as small numpy functions (docs/model.md).

Every function here is pure: arrays in, arrays out, no weights or state.
Numerics follow docs/model.md, "Numerics: one rounding per value": each
float32 result is its formula evaluated in float64 from float32 inputs and
rounded once, so any implementation that sums in another order (the CUDA
kernels) gets the same float32 values.  The exceptions are exact functions of
float32 values (quantisation round trips, top-k) and the RoPE angles, which
keep the reference's float32 running product (ds4.c, commit 8d57664).

Each function names the docs/model.md step it implements.  Leading axes are
batch axes unless a docstring says otherwise; the last axis is the vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

F32 = np.float32
NEG_INF = F32(-1.0e30)
"""The reference's "minus infinity" for masked scores and empty compressor slots (ds4.c:50)."""

ROUTE_SUM_FLOOR = F32(6.103515625e-5)
"""Smallest sum of selected router probabilities before normalisation (ds4.c:5274)."""


def _f32(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _f64(x: np.ndarray) -> np.ndarray:
    """float64 view of float32 (or F16) values: exact."""
    return np.asarray(x, dtype=np.float32).astype(np.float64)


def _sigmoid64(x: np.ndarray) -> np.ndarray:
    x64 = np.asarray(x, dtype=np.float64)
    e = np.exp(-np.abs(x64))
    return np.where(x64 >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) evaluated without overflow (ds4.c:4957)."""
    return _sigmoid64(x).astype(np.float32)


def _silu64(x64: np.ndarray) -> np.ndarray:
    return x64 * _sigmoid64(x64)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) (ds4.c:5084), one rounding."""
    return _silu64(_f64(x)).astype(np.float32)


def _softplus64(x64: np.ndarray) -> np.ndarray:
    mid = np.log1p(np.exp(np.clip(x64, -20.0, 20.0)))
    return np.where(x64 > 20.0, x64, np.where(x64 < -20.0, np.exp(x64), mid))


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + exp(x)) with the reference's cut-offs at +-20 (ds4.c:5088)."""
    return _softplus64(_f64(x)).astype(np.float32)


def f16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values through IEEE half precision (round-to-nearest-even).

    docs/model.md step 8 / step 9: raw and compressed KV rows are stored as F16
    (ds4.c:6390-6411, ds4.c:1548).
    """
    return _f32(x).astype(np.float16).astype(np.float32)


# ---------------------------------------------------------------------------
# normalisation (docs/model.md steps 2, 4, 5, 6)


def rms_norm(x: np.ndarray, weight: np.ndarray | None, eps: float) -> np.ndarray:
    """RMSNorm over the last axis: x / sqrt(mean(x^2) + eps) [* weight] (ds4.c:2772-2788).

    Evaluated in float64 (``eps`` as its float32 value), rounded once.
    ``weight=None`` is the unweighted form used for the HC state (step 2) and
    the per-head q norm (step 5).
    """
    x64 = _f64(x)
    n = x64.shape[-1]
    ss = np.add.reduce(x64 * x64, axis=-1)
    scale = 1.0 / np.sqrt(ss / n + float(F32(eps)))
    y = x64 * scale[..., None]
    if weight is not None:
        y = y * _f64(weight)
    return y.astype(np.float32)


def head_rms_norm(q: np.ndarray, n_head: int, head_dim: int, eps: float) -> np.ndarray:
    """docs/model.md step 5: unweighted RMSNorm of each head of ``q (..., n_head*head_dim)`` (ds4.c:2790)."""
    shape = q.shape
    return rms_norm(q.reshape(*shape[:-1], n_head, head_dim), None, eps).reshape(shape)


# ---------------------------------------------------------------------------
# hyper-connections (docs/model.md steps 2, 3, 14, 19, 20)


@dataclass(frozen=True)
class HcSplit:
    """The three parts of an HC control vector after :func:`hc_split_sinkhorn`.

    ``pre (..., n_hc)``: weights that reduce the streams to the sublayer input;
    ``post (..., n_hc)``: gates of the sublayer output into each stream;
    ``comb (..., n_hc, n_hc)``: ``comb[i, j]`` carries old stream ``i`` into
    new stream ``j``; doubly stochastic after Sinkhorn.
    """

    pre: np.ndarray
    post: np.ndarray
    comb: np.ndarray


def hc_split_sinkhorn(mix: np.ndarray, scale: np.ndarray, base: np.ndarray,
                      n_hc: int, iters: int, eps: float) -> HcSplit:
    """docs/model.md step 3: split ``mix (..., 2*n_hc + n_hc^2)`` and Sinkhorn-normalise comb.

    ``z = mix * scale[part] + base``; pre = sigmoid(z) + eps; post =
    2 * sigmoid(z); comb (row-major ``n_hc x n_hc``) is a row softmax plus eps,
    then one column normalisation, then ``iters - 1`` rounds of (row, column)
    normalisation, each dividing by ``sum + eps`` (ds4.c:4258-4336).  All in
    float64 from the float32 inputs; pre, post and comb are rounded once.
    """
    mix, scale, base = _f64(mix), _f64(scale), _f64(base)
    eps64 = float(F32(eps))
    n = n_hc
    pre = _sigmoid64(mix[..., :n] * scale[0] + base[:n]) + eps64
    post = 2.0 * _sigmoid64(mix[..., n:2 * n] * scale[1] + base[n:2 * n])
    z = mix[..., 2 * n:] * scale[2] + base[2 * n:]
    c = z.reshape(*z.shape[:-1], n, n)
    c = np.exp(c - c.max(axis=-1, keepdims=True))
    c = c / c.sum(axis=-1, keepdims=True) + eps64
    c = c / (c.sum(axis=-2, keepdims=True) + eps64)
    for _ in range(1, iters):
        c = c / (c.sum(axis=-1, keepdims=True) + eps64)
        c = c / (c.sum(axis=-2, keepdims=True) + eps64)
    return HcSplit(pre=pre.astype(np.float32), post=post.astype(np.float32), comb=c.astype(np.float32))


def hc_head_weights(pre: np.ndarray, scale: np.ndarray | float, base: np.ndarray, eps: float) -> np.ndarray:
    """docs/model.md step 20: the output collapse's stream weights ``sigmoid(pre * scale + base) + eps``.

    In float64 from the float32 inputs, rounded once (ds4.c:8008-8033).
    """
    z = _f64(pre) * _f64(scale) + _f64(base)
    return (_sigmoid64(z) + float(F32(eps))).astype(np.float32)


def hc_weighted_sum(hc: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Reduce streams ``hc (..., n_hc, n_embd)`` with ``weights (..., n_hc)`` (ds4.c:4339).

    docs/model.md step 2 (and step 20 for the output head).
    """
    return np.einsum("...hd,...h->...d", _f64(hc), _f64(weights)).astype(np.float32)


def hc_post(block_out: np.ndarray, residual_hc: np.ndarray, post: np.ndarray,
            comb: np.ndarray) -> np.ndarray:
    """docs/model.md step 14 / step 19: expand a sublayer output back into the streams.

    ``new[j] = block_out * post[j] + sum_i comb[i, j] * residual[i]``, summed
    over ``i`` left to right (ds4.c:4438-4458).  Shapes: block_out
    ``(..., n_embd)``, residual_hc ``(..., n_hc, n_embd)``, post ``(..., n_hc)``,
    comb ``(..., n_hc, n_hc)``.
    """
    acc = _f64(block_out)[..., None, :] * _f64(post)[..., :, None]
    acc = acc + np.einsum("...ij,...id->...jd", _f64(comb), _f64(residual_hc))
    return acc.astype(np.float32)


# ---------------------------------------------------------------------------
# RoPE / YaRN (docs/model.md step 7)


@dataclass(frozen=True)
class Rope:
    """RoPE parameters of one layer (docs/model.md step 7).

    ``freq_scale`` is 1/rope_scale_factor on compressed layers (YaRN with
    ``ext_factor`` 1) and 1 on sliding-window layers.  ``mscale`` is the
    magnitude factor the reference ends up multiplying into cos/sin: YaRN's
    ``1 + 0.1 ln(1/freq_scale)`` times its cancelling ``attn_factor``.
    """

    n_rot: int
    freq_base: float
    freq_scale: float
    ext_factor: float
    corr_low: float
    corr_high: float
    mscale: float


def yarn_corr_dim(n_rot: int, orig_ctx: int, beta: float, base: float) -> float:
    """Dimension index whose wavelength fits ``beta`` times in ``orig_ctx`` (ds4.c:4752).

    ``n_rot * ln(orig_ctx / (beta * 2 pi)) / (2 ln base)``, in float32.
    """
    num = F32(n_rot) * _logf(F32(orig_ctx) / (F32(beta) * F32(2.0) * F32(math.pi)))
    return float(num / (F32(2.0) * _logf(F32(base))))


def _logf(x: float | np.floating) -> np.float32:
    return F32(math.log(float(x)))


def yarn_corr_dims(n_rot: int, orig_ctx: int, base: float, beta_fast: float,
                   beta_slow: float) -> tuple[float, float]:
    """docs/model.md step 7: [low, high] of the YaRN ramp, floor/ceil of the correction dims, clamped (ds4.c:4756)."""
    low = math.floor(yarn_corr_dim(n_rot, orig_ctx, beta_fast, base))
    high = math.ceil(yarn_corr_dim(n_rot, orig_ctx, beta_slow, base))
    return float(max(0.0, low)), float(min(float(n_rot - 1), high))


def make_rope(n_rot: int, *, compressed: bool, freq_base: float, compress_freq_base: float,
              scale_factor: float, orig_ctx: int, beta_fast: float, beta_slow: float) -> Rope:
    """docs/model.md step 7: the RoPE parameters of a layer (ds4.c:4817-4861).

    Sliding-window layers: plain RoPE with ``freq_base``.  Compressed layers:
    ``compress_freq_base`` with YaRN interpolation by ``scale_factor`` and no
    net magnitude change.
    """
    if not compressed:
        return Rope(n_rot, float(F32(freq_base)), 1.0, 0.0, 0.0, 0.0, 1.0)
    base = compress_freq_base if compress_freq_base > 0 else freq_base
    fscale = float(F32(1.0) / F32(scale_factor)) if scale_factor > 0 else 1.0
    ext = 1.0 if scale_factor > 1.0 else 0.0
    mscale = F32(1.0)
    if ext != 0.0:
        yarn_gain = F32(1.0) + F32(0.1) * _logf(F32(1.0) / F32(fscale))
        attn_factor = F32(1.0) / yarn_gain
        mscale = attn_factor * yarn_gain
    low, high = yarn_corr_dims(n_rot, orig_ctx, base, beta_fast, beta_slow) if ext else (0.0, 0.0)
    return Rope(n_rot, float(F32(base)), fscale, ext, low, high, float(mscale))


def rope_thetas(rope: Rope, pos: int) -> np.ndarray:
    """docs/model.md step 7: angle of each rotated pair at position ``pos`` (float32, ``n_rot/2`` values).

    ``theta_extrap[k] = pos * base^(-2k/n_rot)`` as a running float32 product;
    with YaRN (``ext_factor != 0``) the angle blends the interpolated
    ``freq_scale * theta_extrap`` and ``theta_extrap`` by the ramp
    (ds4.c:4766-4814).
    """
    half = rope.n_rot // 2
    theta_scale = F32(float(rope.freq_base) ** float(F32(-2.0) / F32(rope.n_rot)))
    steps = np.full(half, theta_scale, dtype=np.float32)
    steps[0] = F32(pos)
    extrap = np.multiply.accumulate(steps, dtype=np.float32)
    interp = F32(rope.freq_scale) * extrap
    if rope.ext_factor == 0.0:
        return interp
    k = np.arange(half, dtype=np.float32)
    y = (k - F32(rope.corr_low)) / F32(max(0.001, float(F32(rope.corr_high) - F32(rope.corr_low))))
    ramp = (F32(1.0) - np.minimum(F32(1.0), np.maximum(F32(0.0), y))) * F32(rope.ext_factor)
    return interp * (F32(1.0) - ramp) + extrap * ramp


def rope_cos_sin(rope: Rope, pos: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) of each pair's angle, times the magnitude factor (float32)."""
    theta = rope_thetas(rope, pos).astype(np.float64)
    m = F32(rope.mscale)
    return np.cos(theta).astype(np.float32) * m, np.sin(theta).astype(np.float32) * m


def apply_rope_tail(x: np.ndarray, rope: Rope, pos: int, *, inverse: bool = False) -> np.ndarray:
    """docs/model.md step 7 (and step 12 with ``inverse``): rotate the last ``n_rot`` dims of each row.

    ``x (..., head_dim)``; adjacent pairs ``(x[2k], x[2k+1])`` of the tail are
    rotated by ``theta_k``: ``(x0 c - x1 s, x0 s + x1 c)``; ``inverse`` flips
    the sign of ``s`` (ds4.c:4766-4814).  The first ``head_dim - n_rot`` dims
    pass through.
    """
    x = _f32(x)
    c, s = (v.astype(np.float64) for v in rope_cos_sin(rope, pos))
    if inverse:
        s = -s
    out = x.copy()
    tail = x[..., x.shape[-1] - rope.n_rot:].astype(np.float64)
    x0 = tail[..., 0::2]
    x1 = tail[..., 1::2]
    rot = out[..., x.shape[-1] - rope.n_rot:]
    rot[..., 0::2] = x0 * c - x1 * s     # float64 from float32 values, one rounding each
    rot[..., 1::2] = x0 * s + x1 * c
    return out


# ---------------------------------------------------------------------------
# quantisation-aware round trips of the DS4 graph (docs/model.md steps 8, 9, 10)


def _e4m3_table() -> np.ndarray:
    i = np.arange(127)
    exp = (i >> 3) & 0x0F
    mant = (i & 7).astype(np.float64)
    val = np.where(exp == 0, mant * 2.0 ** -9, (1.0 + mant / 8.0) * 2.0 ** (exp - 7.0))
    return val.astype(np.float32)


E4M3_VALUES = _e4m3_table()
"""The 127 non-negative finite E4M3FN values (index = bit pattern), max 448."""

E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
"""The 8 non-negative E2M1 (FP4) values."""


def e4m3_round(x: np.ndarray) -> np.ndarray:
    """Nearest E4M3FN value (ties to the even code), magnitude clamped at 448 (ds4.c:1605)."""
    x = _f32(x)
    ax = np.minimum(np.abs(x), F32(448.0))
    lo = np.clip(np.searchsorted(E4M3_VALUES, ax, side="right") - 1, 0, 126)
    hi = np.minimum(lo + 1, 126)
    d_lo = np.abs(ax - E4M3_VALUES[lo])
    d_hi = np.abs(ax - E4M3_VALUES[hi])
    take_hi = (lo < 126) & ((d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (lo % 2 == 1)))
    mag = np.where(take_hi, E4M3_VALUES[hi], E4M3_VALUES[lo])
    return np.where(x < 0, -mag, mag).astype(np.float32)


def e2m1_round(x: np.ndarray) -> np.ndarray:
    """Nearest E2M1 (FP4) value (ties to the even code), magnitude clamped at 6 (ds4.c:1662)."""
    x = _f32(x)
    ax = np.minimum(np.abs(x), F32(6.0))
    diff = np.abs(ax[..., None] - E2M1_VALUES)
    idx = diff.argmin(axis=-1)
    nxt = np.minimum(idx + 1, 7)
    tie = (idx < 7) & (np.take_along_axis(diff, nxt[..., None], -1)[..., 0]
                       == np.take_along_axis(diff, idx[..., None], -1)[..., 0]) & (idx % 2 == 1)
    mag = E2M1_VALUES[np.where(tie, nxt, idx)]
    return np.where(x < 0, -mag, mag).astype(np.float32)


def _pow2_scale(amax: np.ndarray, top: float) -> np.ndarray:
    """2^ceil(log2f(amax / top)) with a correctly rounded float32 log2 (ds4.c:1646, 1702)."""
    ratio = (_f32(amax) / F32(top)).astype(np.float64)
    e = np.ceil(np.log2(ratio).astype(np.float32))
    return np.ldexp(np.float32(1.0), e.astype(np.int32)).astype(np.float32)


def _blocks(n: int, size: int) -> list[tuple[int, int]]:
    return [(o, min(o + size, n)) for o in range(0, n, size)]


def fp8_kv_round(row: np.ndarray, n_rot: int, block: int = 64) -> np.ndarray:
    """docs/model.md step 8: E4M3 round trip of the non-rotated dims of KV rows.

    For each block of 64 of the first ``head_dim - n_rot`` dims:
    ``scale = 2^ceil(log2(max(amax, 1e-4) / 448))``, values become
    ``e4m3(x / scale) * scale``; the rotated tail is untouched
    (ds4.c:1635-1652).  ds4nb generalisation: a trailing partial block (when
    ``head_dim - n_rot`` is not a multiple of 64) is its own block.
    """
    row = _f32(row).copy()
    n_nope = row.shape[-1] - n_rot
    for a, b in _blocks(n_nope, block):
        seg = row[..., a:b]
        amax = np.maximum(np.abs(seg).max(axis=-1), F32(1.0e-4))
        scale = _pow2_scale(amax, 448.0)[..., None]
        v = np.clip(seg / scale, F32(-448.0), F32(448.0))
        row[..., a:b] = e4m3_round(v) * scale
    return row


def fp4_act_round(x: np.ndarray, block: int = 32) -> np.ndarray:
    """E2M1 round trip in blocks of 32 with a power-of-two scale (ds4.c:1691-1712)."""
    x = _f32(x).copy()
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"FP4 activation rounding needs a multiple of {block} values, got {n}")
    for a, b in _blocks(n, block):
        seg = x[..., a:b]
        amax = np.maximum(np.abs(seg).max(axis=-1), F32(7.052966104933725e-38))
        scale = _pow2_scale(amax, 6.0)[..., None]
        v = np.clip(seg / scale, F32(-6.0), F32(6.0))
        x[..., a:b] = e2m1_round(v) * scale
    return x


def hadamard(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of the last axis (power-of-two length).

    Butterflies ``(a + b, a - b)`` with doubling stride, then times
    ``1/sqrt(n)`` (ds4.c:1677-1689, there n = 128), in float64, rounded once.
    """
    x = _f64(x)
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Hadamard transform needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    stride = 1
    while stride < n:
        v = x.reshape(*lead, n // (2 * stride), 2, stride)
        a, b = v[..., 0, :], v[..., 1, :]
        x = np.stack([a + b, a - b], axis=-2).reshape(*lead, n)
        stride *= 2
    return (x * (1.0 / math.sqrt(n))).astype(np.float32)


def indexer_qat(x: np.ndarray) -> np.ndarray:
    """docs/model.md steps 9-10: Hadamard rotation then FP4 round trip of indexer rows (ds4.c:1715)."""
    return fp4_act_round(hadamard(x))


# ---------------------------------------------------------------------------
# attention (docs/model.md step 11)


def attention_with_sinks(q: np.ndarray, rows: np.ndarray, sinks: np.ndarray,
                         visible: np.ndarray | None = None) -> np.ndarray:
    """docs/model.md step 11: softmax attention of ``q (n_head, d)`` over ``rows (n, d)``.

    One shared KV head: each row is both key and value.  Scores are
    ``q . row / sqrt(d)``; the per-head sink logit joins the softmax
    denominator but brings no value; rows with ``visible == False`` are left
    out (ds4.c:6700-6760).  Scores, softmax and the weighted sum in float64;
    each output value rounded once.
    """
    q = _f64(q)
    rows = _f64(rows)
    sinks = _f64(sinks)
    if visible is not None:
        rows = rows[np.asarray(visible, bool)]
    scores = (q @ rows.T) * (1.0 / math.sqrt(q.shape[-1]))
    m = np.maximum(sinks, scores.max(axis=-1, initial=-np.inf))
    w = np.exp(scores - m[:, None])
    denom = np.exp(sinks - m) + w.sum(axis=-1)
    return ((w @ rows) / denom[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------
# compressor and indexer (docs/model.md steps 9, 10)


def compressor_pool(state_kv: np.ndarray, state_score: np.ndarray, head_dim: int,
                    ratio: int, overlap: bool) -> np.ndarray:
    """docs/model.md step 9c: softmax-pool a compressor window into one ``head_dim`` row.

    Without overlap (HCA) column ``j`` pools rows ``0..ratio-1`` of the state
    at column ``j``.  With overlap (CSA) it pools the previous window's rows
    ``0..ratio-1`` at column ``j`` and the current window's rows
    ``ratio..2*ratio-1`` at column ``head_dim + j``.  Each column is a
    softmax over its candidates' scores applied to their kv values; a column
    whose best score is the empty-slot marker pools to 0 (ds4.c:6459-6511).
    In float64, rounded once.
    """
    kv = _f64(state_kv)
    sc = _f64(state_score)
    if overlap:
        # candidates interleaved (prev r, cur r) as the reference sums them
        cand_s = np.stack([sc[:ratio, :head_dim], sc[ratio:2 * ratio, head_dim:2 * head_dim]], axis=1)
        cand_v = np.stack([kv[:ratio, :head_dim], kv[ratio:2 * ratio, head_dim:2 * head_dim]], axis=1)
    else:
        cand_s = sc[:ratio, None, :head_dim]
        cand_v = kv[:ratio, None, :head_dim]
    m = cand_s.max(axis=(0, 1))
    w = np.exp(cand_s - m)
    denom = w.sum(axis=(0, 1))
    total = (w * cand_v).sum(axis=(0, 1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, total / denom, 0.0)
    return np.where(m <= float(NEG_INF) * 0.5, 0.0, out).astype(np.float32)


def indexer_scores(index_q: np.ndarray, head_weights: np.ndarray, index_rows: np.ndarray,
                   scale: float = 1.0) -> np.ndarray:
    """docs/model.md step 10c: ``score[c] = sum_h relu(row_c . q_h) * w_h * scale`` (ds4.c:6974-6985).

    ``index_q (n_ih, d)``, ``head_weights (n_ih,)`` (float32, unscaled),
    ``index_rows (n_comp, d)``, ``scale`` a float64 factor (the model uses
    ``1/sqrt(d * n_ih)``); in float64, rounded once.
    """
    dots = np.maximum(_f64(index_rows) @ _f64(index_q).T, 0.0)  # (n_comp, n_ih)
    return ((dots @ _f64(head_weights)) * float(scale)).astype(np.float32)


def indexer_weight_scale(head_dim: int, n_head: int) -> float:
    """docs/model.md step 10b: the factor ``1/sqrt(indexer_head_dim * n_indexer_head)`` of the head weights (float64)."""
    return 1.0 / math.sqrt(head_dim * n_head)


def top_k_stable(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest scores, ties going to the lower index, best first.

    docs/model.md step 10d and step 16b: both the indexer (ds4.c:6987) and the
    expert router (ds4.c:5294) break ties this way.
    """
    order = np.argsort(-np.asarray(scores), kind="stable")
    return order[:k]


# ---------------------------------------------------------------------------
# router and experts (docs/model.md steps 16, 17, 18)


def router_probs(logits: np.ndarray) -> np.ndarray:
    """docs/model.md step 16a: expert affinities ``sqrt(softplus(logit))`` (ds4.c:5252), one rounding."""
    return np.sqrt(_softplus64(_f64(logits))).astype(np.float32)


def route_weights(probs_selected: np.ndarray, scale: float, normalise: bool) -> np.ndarray:
    """docs/model.md step 16c: selected affinities / max(sum, 6.1e-5) * expert_weights_scale.

    (ds4.c:5265-5280, 5343-5352), in float64 from the float32 affinities,
    rounded once.  With ``normalise=False`` (never the case in DS4 files) the
    affinities are only scaled.
    """
    p = _f64(probs_selected)
    if normalise:
        p = p / np.maximum(p.sum(axis=-1), float(ROUTE_SUM_FLOOR))[..., None]
    return (p * float(F32(scale))).astype(np.float32)


def select_experts_topk(probs: np.ndarray, bias: np.ndarray | None, k: int) -> np.ndarray:
    """docs/model.md step 16b: top-k of ``probs + bias`` (float64 sum; bias only chooses, never weighs)."""
    sel = _f64(probs) if bias is None else _f64(probs) + _f64(bias)
    return top_k_stable(sel, k)


def swiglu_clamped(gate: np.ndarray, up: np.ndarray, clamp: float,
                   weight: np.ndarray | float | None = None) -> np.ndarray:
    """docs/model.md steps 17-18: ``silu(min(gate, c)) * clip(up, -c, c) [* weight]`` (ds4.c:5094-5104).

    The clamp is skipped when ``c <= 1e-6``.  ``weight`` is a routed expert's
    router weight (step 17), folded in before the one rounding.
    """
    g = _f64(gate)
    u = _f64(up)
    c = float(F32(clamp))
    if c > float(F32(1.0e-6)):
        g = np.minimum(g, c)
        u = np.clip(u, -c, c)
    y = _silu64(g) * u
    if weight is not None:
        y = y * _f64(weight)
    return y.astype(np.float32)
