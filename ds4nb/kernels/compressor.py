"""The KV compressor on the device (docs/model.md step 9), for attention and indexer rows.

State (per compressor, float32, as ``ds4nb.reference.state.CompressorState``):
``kv, score (S, W)``; with overlap (CSA layers) ``S = 2 ratio``, ``W = 2 d``
(previous window in rows ``0..ratio-1``, current in ``ratio..2 ratio-1``),
otherwise ``S = ratio``, ``W = d``.  Empty slots hold ``kv = 0``,
``score = -1e30``.

``compressor.update`` (step 9a-b), every token: ``kv = Wkv x`` and
``score = Wgate x + ape[pos mod ratio]`` written straight into the token's
slot rows of the state by one ``f16.matvec`` launch (both matrices, the
``ape`` row as the second one's bias; ``f16.matvec`` evaluates each row and
its bias in float64 and rounds once, as the contract wants).

``compressor.emit`` (step 9c-d), when ``(pos + 1) mod ratio == 0``: one block
(pair per thread, ``max(32, d/2)`` threads) pools every column (softmax of the
candidates' scores applied to their values), then RMSNorm with the
compressor norm, RoPE at the window's first position ``pos + 1 - ratio``, the
FP8 round trip (attention rows) or Hadamard + FP4 (indexer rows), F16
rounding, and writes the row to ``out[row]``.

Numerics (docs/model.md, "one rounding per value"): the pooled value
``sum_c e^(s_c - m) v_c / sum_c e^(s_c - m)`` is evaluated in float64 (exp,
both sums, the division) and rounded once; the RMSNorm of those float32
values (sum of squares, ``1 / sqrt(ss / n + eps)`` with ``eps`` =
float64(float32 eps), ``x * inv * w``) likewise; the RoPE rotation of the
normed float32 value is float64 rounded once; the Hadamard transform
(butterflies and ``1/sqrt(d)``) is float64 rounded once; FP8 / FP4 / F16 are
exact functions of their float32 inputs.  So rows are bit-identical to the
oracle except where two float64 evaluations straddle a float32 rounding
boundary (~1e-7 of values).  After a barrier the same block slides the
window into the canonical form: with overlap the current half becomes the
previous one; the current slots are emptied.

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
from ds4nb.kernels.intrinsics import device, float32, float64
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.kernels.rope import RopeArgs, rope_args, rope_cos_sin, rope_rotate

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


@implementation("compressor.update", "f16_pair_matvec", layout="f16|f32/row-major")
def compressor_update(x: Any, wkv: Any, wgate: Any, ape: Any, *, out: CompressorStateDev, pos: int, ratio: int,
                      overlap: bool, stream: Any = 0) -> CompressorStateDev:
    """Step 9a-b for one token: state rows of slot ``pos mod ratio`` (+ ratio with overlap)."""
    r = pos % ratio
    slot = ratio + r if overlap else r
    _fm.f16_matvec(wkv, x, None, out=out.kv[slot], w2=wgate, bias2=ape[r], out2=out.score[slot], stream=stream)
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


@cuda.jit
def _emit_kernel(kv, sc, ratio, overlap, d, norm_w, eps, out, row, finish, inv_sqrt, pos,
                 n_rot, ts, fscale, ext, low, denom, msc):
    p = cuda.threadIdx.x
    nt = cuda.blockDim.x
    half = d // 2
    valid = p < half
    width = 2 * d if overlap else d
    y0 = _F0
    y1 = _F0
    if valid:
        y0 = _pool(kv, sc, width, d, 2 * p, ratio, overlap)
        y1 = _pool(kv, sc, width, d, 2 * p + 1, ratio, overlap)
    red = cuda.shared.array(32, float64)
    ss = block_sum(float64(y0) * float64(y0) + float64(y1) * float64(y1), red, nt // 32, _D0, 32)
    inv = rms_inv(ss, d, eps)
    if valid:
        y0 = rms_value(y0, norm_w[2 * p], inv)
        y1 = rms_value(y1, norm_w[2 * p + 1], inv)
    k = p - (d - n_rot) // 2
    if valid and k >= 0:
        c, s = rope_cos_sin(k, pos, ts, fscale, ext, low, denom, msc)
        y0, y1 = rope_rotate(y0, y1, c, s, False)
    if finish == FINISH_FP8:   # uniform: a launch argument
        y0, y1 = fp8_pair(y0, y1, valid and k < 0)
    else:
        hs = cuda.shared.array(MAX_ROW, float64)
        y0, y1 = hadamard_fp4_pair(y0, y1, p, half, hs, inv_sqrt)
    if valid:
        out[row * d + 2 * p] = f16_round(y0)
        out[row * d + 2 * p + 1] = f16_round(y1)
    cuda.syncthreads()   # every pool read is done: slide the window
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


@implementation("compressor.emit", "block_pool", layout="state f32")
def compressor_emit(state_kv: Any, state_score: Any, norm_w: Any, *, out: Any, row: int, pos: int, ratio: int,
                    overlap: bool, rope: Any, eps: float, finish: str, stream: Any = 0) -> Any:
    """Step 9c-d at position ``pos`` ((pos + 1) % ratio == 0): pooled, finished row -> out[row].

    ``out`` (n, d) is the compressed-row cache (F16 or F32); ``finish`` is
    ``"fp8"`` (attention rows) or ``"qat"`` (indexer rows).  Then slides the
    state (step 9d).
    """
    d = norm_w.size
    if (pos + 1) % ratio:
        raise ValueError(f"compressor.emit: position {pos} does not end a window of {ratio}")
    if finish not in ("fp8", "qat"):
        raise ValueError(f"compressor.emit: finish must be 'fp8' or 'qat', got {finish!r}")
    if finish == "qat":
        check_qat_width(d)
        if d > MAX_ROW:
            raise ValueError(f"compressor.emit: qat rows wider than {MAX_ROW}")
    ra = rope if isinstance(rope, RopeArgs) else rope_args(rope)
    _emit_kernel[1, row_threads(d), stream](
        L.flat(state_kv), L.flat(state_score), int(ratio), int(bool(overlap)), d, L.flat(norm_w), eps64(eps),
        L.flat(out), int(row), FINISH_FP8 if finish == "fp8" else FINISH_QAT, hadamard_scale(d),
        int(pos + 1 - ratio), *ra)
    return out


def compressor_step(x: Any, wkv: Any, wgate: Any, ape: Any, norm_w: Any, state: CompressorStateDev, out: Any,
                    n_rows: int, *, pos: int, ratio: int, overlap: bool, rope: Any, eps: float, finish: str,
                    stream: Any = 0) -> bool:
    """Step 9 for one token: update, and emit row ``n_rows`` of ``out`` when the window ends.

    Returns True when a row was emitted (the caller's row count grows by one).
    """
    compressor_update(x, wkv, wgate, ape, out=state, pos=pos, ratio=ratio, overlap=overlap, stream=stream)
    if (pos + 1) % ratio:
        return False
    compressor_emit(state.kv, state.score, norm_w, out=out, row=n_rows, pos=pos, ratio=ratio, overlap=overlap,
                    rope=rope, eps=eps, finish=finish, stream=stream)
    return True


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


def _case_emit(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.kernels.rope import make_test_rope

    if scale == "tiny":
        choices = [(4, 64, 16, True, "fp8"), (16, 64, 16, False, "fp8"), (4, 32, 16, True, "qat")]
    else:
        choices = [(4, 512, 64, True, "fp8"), (128, 512, 64, False, "fp8"), (4, 128, 64, True, "qat")]
    ratio, d, n_rot, overlap, finish = choices[int(rng.integers(0, len(choices)))]
    kv, sc = random_state(rng, ratio, d, overlap)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    pos = ratio * int(rng.integers(1, 1000)) - 1
    rope = make_test_rope(n_rot, True)
    row, _, _ = emit_reference(kv, sc, nw, pos, ratio, overlap, rope, 1e-6, finish, n_rot)
    out = L.device_array((1, d), np.float32)
    return Case((cuda.to_device(kv), cuda.to_device(sc), cuda.to_device(nw)), out, (row[None, :],), (CONTRACT,),
                kwargs=dict(row=0, pos=pos, ratio=ratio, overlap=overlap, rope=rope, eps=1e-6, finish=finish),
                info={"ratio": ratio, "d": d, "finish": finish, "pos": pos})


def update_reference(x: np.ndarray, wkv: np.ndarray, wgate: np.ndarray, ape_row: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Step 9a under the contract: ``float32(Wkv x)``, ``float32(Wgate x + ape[r])``, each one float64 evaluation."""
    x64 = np.asarray(x, np.float32).astype(np.float64)
    kv = np.asarray(wkv).astype(np.float64) @ x64
    sc = np.asarray(wgate).astype(np.float64) @ x64 + np.asarray(ape_row).astype(np.float64)
    return kv.astype(np.float32), sc.astype(np.float32)


def _case_update(rng: np.random.Generator, scale: str) -> Case:
    # ratio 1 without overlap: the token's slot is the whole state, so every output value is written
    n_embd, width = (256, 16) if scale == "tiny" else (4096, 1024)
    x = rng.standard_normal(n_embd).astype(np.float32)
    wkv = (rng.standard_normal((width, n_embd)) / np.sqrt(n_embd)).astype(np.float16)
    wg = (rng.standard_normal((width, n_embd)) / np.sqrt(n_embd)).astype(np.float16)
    ape = rng.standard_normal((1, width)).astype(np.float16)
    kv, sc = update_reference(x, wkv, wg, ape[0])
    out = CompressorStateDev(L.device_array((1, width), np.float32), L.device_array((1, width), np.float32))
    return Case((cuda.to_device(x), cuda.to_device(wkv), cuda.to_device(wg), cuda.to_device(ape)), out,
                (kv[None, :], sc[None, :]), (CONTRACT, CONTRACT), kwargs=dict(pos=int(rng.integers(0, 99)), ratio=1,
                                                                              overlap=False),
                weight_bytes=wkv.nbytes + wg.nbytes, info={"shape": (width, n_embd)})


OPS = [
    OpSpec("compressor.update", "compressor window store: kv and gate F16 matvecs (+ ape) into the slot rows",
           "(x f32 (n_embd,), wkv f16 (W, n_embd), wgate f16 (W, n_embd), ape f16 (ratio, W), *, "
           "out: CompressorStateDev, pos, ratio, overlap, stream)",
           "Reference.compressor_step (a)-(b)", 1e-5, _case_update),   # CONTRACT
    OpSpec("compressor.emit", "pool a finished window, rms, RoPE, FP8 or Hadamard+FP4, F16 -> a compressed row; "
           "slide the window",
           "(state_kv f32 (S, W), state_score f32 (S, W), norm_w f32 (d,), *, out (n, d), row, pos, ratio, overlap, "
           "rope, eps, finish='fp8'|'qat', stream)",
           "ops.compressor_pool + rms_norm + apply_rope_tail + fp8_kv_round | indexer_qat + f16_round",
           # CONTRACT; the tolerance is for non-contract callers: a last-ulp difference before FP8/FP4 can flip
           # one rounding
           2e-3, _case_emit),
]
