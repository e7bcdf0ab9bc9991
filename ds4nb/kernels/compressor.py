"""The KV compressor on the device (docs/model.md step 9), for attention and indexer rows.

State (per compressor, float32, as ``ds4nb.reference.state.CompressorState``):
``kv, score (S, W)``; with overlap (CSA layers) ``S = 2 ratio``, ``W = 2 d``
(previous window in rows ``0..ratio-1``, current in ``ratio..2 ratio-1``),
otherwise ``S = ratio``, ``W = d``.  Empty slots hold ``kv = 0``,
``score = -1e30``.

``compressor.project`` (step 9a), for ``T`` tokens at once: ``kv = Wkv x``
(float32) and ``Wgate x`` (float64, not yet rounded: the ``ape`` row it still
needs depends on the position) by one ``f16.matvec`` launch over both
matrices.

``compressor.step`` (steps 9b-d), one token, one block (pair per thread,
``max(32, d/2)`` threads), reading the token's step record
(``ds4nb.kernels.step``): stores the token's projections into the window
slot of ``pos mod ratio`` (the score as ``float32(Wgate x + ape[pos mod
ratio])``, one rounding); then, when the record's ``EMIT`` is set, pools
every column (softmax of the candidates' scores applied to their values),
RMSNorm with the compressor norm, RoPE at the window's first position
``pos + 1 - ratio``, the FP8 round trip (attention rows) or Hadamard + FP4
(indexer rows), F16 rounding, writes compressed row ``ROWS - 1``, and slides
the window: with overlap the current half becomes the previous one; the
current slots are emptied.  A token that closes no window costs one short
store.

Numerics (docs/model.md, "one rounding per value"): the gate score is
``Wgate x + ape`` evaluated in float64 and rounded once; the pooled value
``sum_c e^(s_c - m) v_c / sum_c e^(s_c - m)`` is evaluated in float64 (exp,
both sums, the division) and rounded once; the RMSNorm of those float32
values (sum of squares, ``1 / sqrt(ss / n + eps)`` with ``eps`` =
float64(float32 eps), ``x * inv * w``) likewise; the RoPE rotation of the
normed float32 value is float64 rounded once; the Hadamard transform
(butterflies and ``1/sqrt(d)``) is float64 rounded once; FP8 / FP4 / F16 are
exact functions of their float32 inputs.  So rows are bit-identical to the
oracle except where two float64 evaluations straddle a float32 rounding
boundary (~1e-7 of values).

Cost: an HCA emit reads ``ratio x d`` scores and values (128 x 512) once
every 128 tokens; a CSA emit 8 x 1024 every 4 tokens.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.attention import NEG_INF, eps64, f16_round, fp8_pair, rms_inv, rms_value, row_threads
from ds4nb.kernels import f16_matvec as _fm  # module import: add_module registers marked names it sees
from ds4nb.kernels.f16_matvec import block_sum
from ds4nb.kernels.indexer import MAX_ROW, check_qat_width, hadamard_fp4_pair, hadamard_scale
from ds4nb.kernels.intrinsics import device, float32, float64, wait_prior_grid
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.kernels.rope import RopeArgs, rope_args, rope_cos_sin, rope_rotate
from ds4nb.kernels.step import EMIT, NF, POS, ROWS, group_offset, one_record, records

_F0 = np.float32(0.0)
_D0 = np.float64(0.0)
_HALF_NEG_INF = np.float32(-0.5e30)
FINISH_FP8 = 0
FINISH_QAT = 1


class CompressorStateDev(NamedTuple):
    """A compressor window on the device: kv, score f32 (S, W)."""

    kv: Any
    score: Any


def alloc_state(ratio: int, d: int, overlap: bool, stream: Any = 0) -> CompressorStateDev:
    """An empty window (kv 0, score -1e30)."""
    rows, width = (2 * ratio, 2 * d) if overlap else (ratio, d)
    return CompressorStateDev(cuda.to_device(np.zeros((rows, width), np.float32), stream=stream),
                              cuda.to_device(np.full((rows, width), NEG_INF, np.float32), stream=stream))


class CompressorProjection(NamedTuple):
    """Step 9a of T tokens: kv f32 (T, W) and the gate score before its ``ape`` row, f64 (T, W)."""

    kv: Any
    score: Any


def alloc_projection(n_tok: int, width: int, stream: Any = 0) -> CompressorProjection:
    return CompressorProjection(L.device_array(n_tok * width, np.float32, stream),
                                L.device_array(n_tok * width, np.float64, stream))


@implementation("compressor.project", "f16_pair_matvec", layout="f16|f32/row-major")
def compressor_project(x: Any, wkv: Any, wgate: Any, *, out: CompressorProjection, stream: Any = 0
                       ) -> CompressorProjection:
    """Step 9a for T tokens: ``out.kv = x @ Wkv.T`` (f32), ``out.score = x @ Wgate.T`` (f64, unrounded)."""
    _fm.f16_matvec(wkv, x, None, out=out.kv, w2=wgate, out2=out.score, stream=stream)
    return out


@device
def _pool(kv, sc, width, d, j, ratio, overlap):
    """Softmax pool of column j (as ops.compressor_pool): float64, rounded once to float32."""
    mx = NEG_INF
    for r in range(ratio):
        mx = max(mx, sc[r * width + j])
        if overlap:
            mx = max(mx, sc[(ratio + r) * width + d + j])
    if mx <= _HALF_NEG_INF:
        return _F0
    m = float64(mx)
    den = _D0
    tot = _D0
    for r in range(ratio):
        wp = float64(math.exp(float64(sc[r * width + j]) - m))
        den += wp
        tot += wp * float64(kv[r * width + j])
        if overlap:
            wc = float64(math.exp(float64(sc[(ratio + r) * width + d + j]) - m))
            den += wc
            tot += wc * float64(kv[(ratio + r) * width + d + j])
    return float32(tot / den)      # den >= 1: the best candidate contributes e^0


@device
def _finish_row(y0, y1, p, nt, d, norm_w, eps, rope_pos, finish, inv_sqrt, out, row, n_rot, ts, fscale, ext, low,
                denom, msc):
    """Step 9c after the pool, thread ``p`` holding pooled columns ``2p, 2p+1`` (every thread calls): RMSNorm,
    RoPE at ``rope_pos``, FP8 round trip or Hadamard + FP4, F16, into compressed row ``row`` of ``out``."""
    half = d // 2
    valid = p < half
    red = cuda.shared.array(32, float64)
    ss = block_sum(float64(y0) * float64(y0) + float64(y1) * float64(y1), red, nt // 32, _D0, 32)
    inv = rms_inv(ss, d, eps)
    if valid:
        y0 = rms_value(y0, norm_w[2 * p], inv)
        y1 = rms_value(y1, norm_w[2 * p + 1], inv)
    k = p - (d - n_rot) // 2
    if valid and k >= 0:
        c, s = rope_cos_sin(k, rope_pos, ts, fscale, ext, low, denom, msc)
        y0, y1 = rope_rotate(y0, y1, c, s, False)
    if finish == FINISH_FP8:   # uniform: a launch argument
        y0, y1 = fp8_pair(y0, y1, valid and k < 0)
    else:
        hs = cuda.shared.array(MAX_ROW, float64)
        y0, y1 = hadamard_fp4_pair(y0, y1, p, half, hs, inv_sqrt)
    if valid:
        out[row * d + 2 * p] = f16_round(y0)
        out[row * d + 2 * p + 1] = f16_round(y1)


@cuda.jit
def _step_kernel(new_kv, new_sc, t, ape, kv, sc, ratio, overlap, d, norm_w, eps, out, finish, inv_sqrt,
                 steps, rec, grp, n_rot, ts, fscale, ext, low, denom, msc):
    wait_prior_grid()
    p = cuda.threadIdx.x
    nt = cuda.blockDim.x
    width = 2 * d if overlap else d
    pos = steps[rec + POS]
    r = pos % ratio
    slot = ratio + r if overlap else r
    # 9b: the token's projections into its window slot, the gate plus its ape row rounded once
    for i in range(p, width, nt):
        kv[slot * width + i] = new_kv[t * width + i]
        sc[slot * width + i] = float32(new_sc[t * width + i] + float64(float32(ape[r * width + i])))
    if steps[rec + grp + EMIT] == 0:   # uniform over the block: the window goes on
        return
    cuda.syncthreads()
    # 9c: pool the finished window into compressed row ROWS - 1
    half = d // 2
    valid = p < half
    y0 = _F0
    y1 = _F0
    if valid:
        y0 = _pool(kv, sc, width, d, 2 * p, ratio, overlap)
        y1 = _pool(kv, sc, width, d, 2 * p + 1, ratio, overlap)
    _finish_row(y0, y1, p, nt, d, norm_w, eps, pos + 1 - ratio, finish, inv_sqrt, out, steps[rec + grp + ROWS] - 1,
                n_rot, ts, fscale, ext, low, denom, msc)
    cuda.syncthreads()   # every pool read is done: 9d, slide the window
    n = ratio * width
    if overlap:
        for i in range(p, n, nt):
            kv[i] = kv[n + i]
            sc[i] = sc[n + i]
            kv[n + i] = _F0
            sc[n + i] = NEG_INF
    else:
        for i in range(p, n, nt):
            kv[i] = _F0
            sc[i] = NEG_INF


def _finish_args(op: str, finish: str, d: int, rope: Any) -> RopeArgs:
    """Checks a row finish (``fp8`` or ``qat``) for rows of ``d`` values; the RoPE launch arguments."""
    if finish not in ("fp8", "qat"):
        raise ValueError(f"{op}: finish must be 'fp8' or 'qat', got {finish!r}")
    if finish == "qat":
        check_qat_width(d)
        if d > MAX_ROW:
            raise ValueError(f"{op}: qat rows wider than {MAX_ROW}")
    return rope if isinstance(rope, RopeArgs) else rope_args(rope)


@implementation("compressor.step", "block_pool", layout="state f32")
def compressor_step(proj: CompressorProjection, t: int, ape: Any, norm_w: Any, *, out: Any,
                    state: CompressorStateDev, ratio: int, overlap: bool, rope: Any, eps: float, finish: str,
                    steps: Any, rec: int = 0, grp: int, stream: Any = 0) -> Any:
    """Steps 9b-d for token ``t`` of ``proj`` (its record at ``steps[rec:]``, compression group ``grp``).

    Stores the token into ``state`` and, when the record's ``EMIT`` is set,
    writes the finished row to ``out[ROWS - 1]`` (``out`` (n, d): the
    compressed-row cache, F16 or F32) and slides the window.  ``finish`` is
    ``"fp8"`` (attention rows) or ``"qat"`` (indexer rows).
    """
    d = norm_w.size
    ra = _finish_args("compressor.step", finish, d, rope)
    L.launch(_step_kernel, 1, row_threads(d), stream,
             proj.kv, proj.score, int(t), L.flat(ape), L.flat(state.kv), L.flat(state.score), int(ratio),
             int(bool(overlap)), d, L.flat(norm_w), eps64(eps), L.flat(out),
             FINISH_FP8 if finish == "fp8" else FINISH_QAT, hadamard_scale(d), steps, int(rec), int(grp), *ra)
    return out


# ---------------------------------------------------------------------------
# compressor.chunk: steps 9b-d for all the tokens of a prefill step at once
# ---------------------------------------------------------------------------


@device
def _window_value(pkv, psc, ape, skv, ssc, p0, q, c, width, ratio, overlap):
    """(kv, score) that the window holds for position ``q`` at column ``c`` when token-by-token stores reach it:
    from the step's projections when ``q >= p0`` (the score plus its ``ape`` row rounded once, as the store
    does), else from the state at the step's start (the current window ``[g0, p0)`` in its slots, ``g0`` the
    first position of ``p0``'s window; with overlap, the window before it in slots ``0 .. ratio - 1``)."""
    r = q % ratio
    if q >= p0:
        t = q - p0
        return pkv[t * width + c], float32(psc[t * width + c] + float64(float32(ape[r * width + c])))
    slot = r
    if overlap and q >= p0 - p0 % ratio:
        slot = ratio + r
    return skv[slot * width + c], ssc[slot * width + c]


@device
def _pool_window(pkv, psc, ape, skv, ssc, p0, e, width, d, j, ratio, overlap):
    """``_pool`` of column ``j`` of the window that position ``e`` closes (same float64 sums, same order)."""
    mx = NEG_INF
    for r in range(ratio):
        _, sc_c = _window_value(pkv, psc, ape, skv, ssc, p0, e - ratio + 1 + r, d + j if overlap else j, width,
                                ratio, overlap)
        if overlap:
            _, sc_p = _window_value(pkv, psc, ape, skv, ssc, p0, e - 2 * ratio + 1 + r, j, width, ratio, overlap)
            mx = max(mx, sc_p)
        mx = max(mx, sc_c)
    if mx <= _HALF_NEG_INF:
        return _F0
    m = float64(mx)
    den = _D0
    tot = _D0
    for r in range(ratio):
        if overlap:
            kv_p, sc_p = _window_value(pkv, psc, ape, skv, ssc, p0, e - 2 * ratio + 1 + r, j, width, ratio, overlap)
            wp = float64(math.exp(float64(sc_p) - m))
            den += wp
            tot += wp * float64(kv_p)
        kv_c, sc_c = _window_value(pkv, psc, ape, skv, ssc, p0, e - ratio + 1 + r, d + j if overlap else j, width,
                                   ratio, overlap)
        wc = float64(math.exp(float64(sc_c) - m))
        den += wc
        tot += wc * float64(kv_c)
    return float32(tot / den)


@cuda.jit
def _emit_chunk_kernel(pkv, psc, ape, skv, ssc, ratio, overlap, d, norm_w, eps, out, finish, inv_sqrt, steps, rec,
                       grp, n_tok, n_rot, ts, fscale, ext, low, denom, msc):
    """Block ``b``: the ``b``-th window the step's tokens close (if any), pooled from the step's projections and
    the state at its start, finished into its compressed row."""
    wait_prior_grid()
    p = cuda.threadIdx.x
    nt = cuda.blockDim.x
    width = 2 * d if overlap else d
    p0 = steps[rec + POS]
    t = (ratio - 1 - p0 % ratio) + cuda.blockIdx.x * ratio     # the step's b-th token with (pos + 1) % ratio == 0
    if t >= n_tok:
        return
    e = p0 + t
    half = d // 2
    y0 = _F0
    y1 = _F0
    if p < half:
        y0 = _pool_window(pkv, psc, ape, skv, ssc, p0, e, width, d, 2 * p, ratio, overlap)
        y1 = _pool_window(pkv, psc, ape, skv, ssc, p0, e, width, d, 2 * p + 1, ratio, overlap)
    _finish_row(y0, y1, p, nt, d, norm_w, eps, e + 1 - ratio, finish, inv_sqrt, out,
                steps[rec + t * NF + grp + ROWS] - 1, n_rot, ts, fscale, ext, low, denom, msc)


@cuda.jit
def _state_chunk_kernel(pkv, psc, ape, skv, ssc, ratio, overlap, d, steps, rec, n_tok):
    """The window state after the step's tokens, as token-by-token stores and slides leave it: slot ``r`` of
    the current window holds position ``g1 + r`` if it has come (``g1``: the first position of the next token's
    window), else nothing; with overlap, the previous window is ``g1 - ratio ..`` if a window closed in the
    step, else unchanged.  A thread owns (r, c) in both halves and reads only those slots: in place is safe."""
    wait_prior_grid()
    width = 2 * d if overlap else d
    i = cuda.grid(1)
    if i >= ratio * width:
        return
    r = i // width
    c = i % width
    p0 = steps[rec + POS]
    pn = p0 + n_tok
    g1 = pn - pn % ratio
    kv_c = _F0
    sc_c = NEG_INF
    if g1 + r < pn:
        kv_c, sc_c = _window_value(pkv, psc, ape, skv, ssc, p0, g1 + r, c, width, ratio, overlap)
    if overlap:
        if g1 > p0 - p0 % ratio:               # a window closed: the last closed one becomes the previous
            kv_p, sc_p = _window_value(pkv, psc, ape, skv, ssc, p0, g1 - ratio + r, c, width, ratio, overlap)
            skv[r * width + c] = kv_p
            ssc[r * width + c] = sc_p
        skv[(ratio + r) * width + c] = kv_c
        ssc[(ratio + r) * width + c] = sc_c
    else:
        skv[r * width + c] = kv_c
        ssc[r * width + c] = sc_c


@implementation("compressor.chunk", "emit_parallel", layout="state f32")
def compressor_chunk(proj: CompressorProjection, n_tok: int, ape: Any, norm_w: Any, *, out: Any,
                     state: CompressorStateDev, ratio: int, overlap: bool, rope: Any, eps: float, finish: str,
                     steps: Any, rec: int = 0, grp: int, stream: Any = 0) -> Any:
    """Steps 9b-d for the ``n_tok`` tokens of a step (records at ``steps[rec + t * NF:]``) in two launches.

    Every window the tokens close is pooled at once, one block each, from
    the step's projections and the state at its start (the same float64
    sums as ``compressor.step``), finished and written to its compressed
    row; then the state becomes what token-by-token steps leave.  The same
    values as ``n_tok`` calls of ``compressor.step``, in 2 launches.
    """
    d = norm_w.size
    ra = _finish_args("compressor.chunk", finish, d, rope)
    width = 2 * d if overlap else d
    common = (proj.kv, proj.score, L.flat(ape), L.flat(state.kv), L.flat(state.score), int(ratio),
              int(bool(overlap)), d)
    L.launch(_emit_chunk_kernel, L.cdiv(n_tok, ratio), row_threads(d), stream, *common, L.flat(norm_w), eps64(eps),
             L.flat(out), FINISH_FP8 if finish == "fp8" else FINISH_QAT, hadamard_scale(d), steps, int(rec),
             int(grp), int(n_tok), *ra)
    L.launch(_state_chunk_kernel, L.cdiv(ratio * width, 256), 256, stream, *common, steps, int(rec), int(n_tok))
    return out


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def emit_reference(kv: np.ndarray, score: np.ndarray, norm_w: np.ndarray, pos: int, ratio: int, overlap: bool,
                   rope: Any, eps: float, finish: str, n_rot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The oracle's step 9c-d (Reference.compressor_step after the store): (row, kv', score')."""
    from ds4nb.reference import ops

    d = norm_w.size
    kv, score = kv.copy(), score.copy()
    pooled = ops.compressor_pool(kv, score, d, ratio, overlap)
    row = ops.rms_norm(pooled, norm_w, eps)
    row = ops.apply_rope_tail(row, rope, pos + 1 - ratio)
    row = ops.fp8_kv_round(row, n_rot) if finish == "fp8" else ops.indexer_qat(row)
    if overlap:
        kv[:ratio] = kv[ratio:]
        score[:ratio] = score[ratio:]
    kv[ratio if overlap else 0:] = 0.0
    score[ratio if overlap else 0:] = ops.NEG_INF
    return ops.f16_round(row), kv, score


def random_state(rng: np.random.Generator, ratio: int, d: int, overlap: bool, filled: int | None = None):
    """A window with random kv/scores; the first ``filled`` current slots written, the rest empty."""
    rows, width = (2 * ratio, 2 * d) if overlap else (ratio, d)
    kv = rng.standard_normal((rows, width)).astype(np.float32)
    sc = (2 * rng.standard_normal((rows, width))).astype(np.float32)
    if filled is not None:
        first = ratio if overlap else 0
        kv[first + filled:] = 0.0
        sc[first + filled:] = NEG_INF
    return kv, sc


def store_reference(kv: np.ndarray, score: np.ndarray, new_kv: np.ndarray, new_score64: np.ndarray,
                    ape: np.ndarray, pos: int, ratio: int, overlap: bool) -> tuple[np.ndarray, np.ndarray]:
    """The oracle's step 9b: the token's row into slot ``pos % ratio`` (+ ratio with overlap), score + ape rounded once."""
    kv, score = kv.copy(), score.copy()
    r = pos % ratio
    slot = ratio + r if overlap else r
    kv[slot] = new_kv
    score[slot] = (np.asarray(new_score64, np.float64) + np.asarray(ape[r]).astype(np.float64)).astype(np.float32)
    return kv, score


def project_reference(x: np.ndarray, wkv: np.ndarray, wgate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 9a under the contract: ``float32(Wkv x)`` and the float64 ``Wgate x`` (rows of x: tokens)."""
    x64 = np.asarray(x, np.float32).astype(np.float64)
    kv = x64 @ np.asarray(wkv).astype(np.float64).T
    sc = x64 @ np.asarray(wgate).astype(np.float64).T
    return kv.astype(np.float32), sc


def _case_step(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.kernels.rope import make_test_rope

    if scale == "tiny":
        choices = [(4, 64, 16, True, "fp8"), (16, 64, 16, False, "fp8"), (4, 32, 16, True, "qat")]
    else:
        choices = [(4, 512, 64, True, "fp8"), (128, 512, 64, False, "fp8"), (4, 128, 64, True, "qat")]
    ratio, d, n_rot, overlap, finish = choices[int(rng.integers(0, len(choices)))]
    width = 2 * d if overlap else d
    kv, sc = random_state(rng, ratio, d, overlap, filled=ratio - 1)
    n_tok, t = 2, 1                                     # the second token of a projected pair closes the window
    new_kv = rng.standard_normal((n_tok, width)).astype(np.float32)
    new_sc = 2 * rng.standard_normal((n_tok, width))
    ape = rng.standard_normal((ratio, width)).astype(np.float16)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    pos = ratio * int(rng.integers(1, 1000)) - 1
    rope = make_test_rope(n_rot, True)
    kv2, sc2 = store_reference(kv, sc, new_kv[t], new_sc[t], ape, pos, ratio, overlap)
    row, _, _ = emit_reference(kv2, sc2, nw, pos, ratio, overlap, rope, 1e-6, finish, n_rot)
    rec = one_record(pos, emit=1, rows=1)                # emits compressed row 0
    proj = CompressorProjection(cuda.to_device(new_kv.reshape(-1)), cuda.to_device(new_sc.reshape(-1)))
    state = CompressorStateDev(cuda.to_device(kv), cuda.to_device(sc))
    out = L.device_array((1, d), np.float32)
    return Case((proj, t, cuda.to_device(ape), cuda.to_device(nw)), out, (row[None, :],), (CONTRACT,),
                kwargs=dict(state=state, ratio=ratio, overlap=overlap, rope=rope, eps=1e-6, finish=finish,
                            steps=cuda.to_device(rec), grp=group_offset(1)),
                info={"ratio": ratio, "d": d, "finish": finish, "pos": pos})


def chunk_reference(kv: np.ndarray, sc: np.ndarray, new_kv: np.ndarray, new_sc: np.ndarray, ape: np.ndarray,
                    nw: np.ndarray, p0: int, ratio: int, overlap: bool, rope: Any, eps: float, finish: str,
                    n_rot: int) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:
    """The oracle's steps 9b-d token by token from ``p0``: ({row index: row}, final kv, final score)."""
    rows = {}
    for t in range(len(new_kv)):
        pos = p0 + t
        kv, sc = store_reference(kv, sc, new_kv[t], new_sc[t], ape, pos, ratio, overlap)
        if (pos + 1) % ratio == 0:
            row, kv, sc = emit_reference(kv, sc, nw, pos, ratio, overlap, rope, eps, finish, n_rot)
            rows[(pos + 1) // ratio - 1] = row
    return rows, kv, sc


def make_chunk_case(rng: np.random.Generator, ratio: int, d: int, n_rot: int, overlap: bool, finish: str,
                    n_tok: int) -> tuple[Case, np.ndarray, np.ndarray]:
    """A step of ``n_tok`` tokens from a random position (mid-window) and a random consistent window state:
    the case (rows) and the final state token-by-token steps leave (kv, score)."""
    from ds4nb.kernels.rope import make_test_rope

    width = 2 * d if overlap else d
    p0 = int(rng.integers(0, 6 * ratio))
    kv, sc = random_state(rng, ratio, d, overlap, filled=p0 % ratio)
    if overlap and p0 < ratio:                          # no window has closed yet: no previous one
        kv[:ratio], sc[:ratio] = 0.0, NEG_INF
    new_kv = rng.standard_normal((n_tok, width)).astype(np.float32)
    new_sc = 2 * rng.standard_normal((n_tok, width))
    ape = rng.standard_normal((ratio, width)).astype(np.float16)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    rope = make_test_rope(n_rot, True)
    rows, kv_end, sc_end = chunk_reference(kv, sc, new_kv, new_sc, ape, nw, p0, ratio, overlap, rope, 1e-6, finish,
                                           n_rot)
    n_rows = (p0 + n_tok) // ratio + 1
    ref = np.full((n_rows, d), np.nan, np.float32)     # rows the step does not emit are not written
    for i, row in rows.items():
        ref[i] = row
    proj = CompressorProjection(cuda.to_device(new_kv.reshape(-1)), cuda.to_device(new_sc.reshape(-1)))
    state = CompressorStateDev(cuda.to_device(kv), cuda.to_device(sc))
    steps = cuda.to_device(records(p0, n_tok, groups=[(ratio, 0)]))
    case = Case((proj, n_tok, cuda.to_device(ape), cuda.to_device(nw)), L.device_array((n_rows, d), np.float32),
                (ref,), (CONTRACT,), kwargs=dict(state=state, ratio=ratio, overlap=overlap, rope=rope, eps=1e-6,
                                                 finish=finish, steps=steps, grp=group_offset(1)),
                info={"ratio": ratio, "d": d, "finish": finish, "p0": p0, "tokens": n_tok})
    return case, kv_end, sc_end


def _case_chunk(rng: np.random.Generator, scale: str) -> Case:
    if scale == "tiny":
        choices = [(4, 64, 16, True, "fp8", 11), (16, 64, 16, False, "fp8", 21), (4, 32, 16, True, "qat", 9)]
    else:
        choices = [(4, 512, 64, True, "fp8", 256), (128, 512, 64, False, "fp8", 300), (4, 128, 64, True, "qat", 256)]
    return make_chunk_case(rng, *choices[int(rng.integers(0, len(choices)))])[0]


def _case_project(rng: np.random.Generator, scale: str) -> Case:
    n_tok, n_embd, width = (2, 256, 16) if scale == "tiny" else (1, 4096, 1024)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    wkv = (rng.standard_normal((width, n_embd)) / np.sqrt(n_embd)).astype(np.float16)
    wg = (rng.standard_normal((width, n_embd)) / np.sqrt(n_embd)).astype(np.float16)
    kv, sc = project_reference(x, wkv, wg)
    out = alloc_projection(n_tok, width)
    return Case((cuda.to_device(x), cuda.to_device(wkv), cuda.to_device(wg)), out,
                (kv.reshape(-1), sc.reshape(-1)), (CONTRACT, False),
                weight_bytes=wkv.nbytes + wg.nbytes, info={"shape": (n_tok, width, n_embd)})


OPS = [
    OpSpec("compressor.project", "compressor projections of T tokens: kv (f32) and gate (f64, before ape)",
           "(x f32 (T, n_embd), wkv f16 (W, n_embd), wgate f16 (W, n_embd), *, out: CompressorProjection, stream)",
           "Reference.compressor_step (a): Wkv x rounded once, Wgate x in float64",
           # kv under the contract; the float64 gate within float64 summation-order error
           1e-12, _case_project),
    OpSpec("compressor.chunk", "steps 9b-d for the tokens of a prefill step: every window they close pooled at "
           "once, then the window state as token-by-token steps leave it",
           "(proj: CompressorProjection, n_tok, ape f16 (ratio, W), norm_w f32 (d,), *, out (n, d), state, ratio, "
           "overlap, rope, eps, finish='fp8'|'qat', steps, rec=0, grp, stream)",
           "Reference.compressor_step (b)-(d) token by token", 2e-3, _case_chunk),
    OpSpec("compressor.step", "one token into the compressor window (+ ape); when it closes the window: pool, rms, "
           "RoPE, FP8 or Hadamard+FP4, F16 -> compressed row ROWS-1, slide the window",
           "(proj: CompressorProjection, t, ape f16 (ratio, W), norm_w f32 (d,), *, out (n, d), state, ratio, "
           "overlap, rope, eps, finish='fp8'|'qat', steps, rec=0, grp, stream)",
           "Reference.compressor_step (b)-(d): ops.compressor_pool + rms_norm + apply_rope_tail + fp8_kv_round | "
           "indexer_qat + f16_round",
           # CONTRACT; the tolerance is for non-contract callers: a last-ulp difference before FP8/FP4 can flip
           # one rounding
           2e-3, _case_step),
]
