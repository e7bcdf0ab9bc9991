"""Q8_0 matrix-vector products on pre-quantized activations (the ``warp8`` strategy).

Weights are block-minor (``ds4nb.quants.repack``): per row, ``qs`` word ``j``
(8 int8) of block ``b`` at ``j * nb + b``, the fp16 scale of block ``b`` at
``b``.  Activations come from ``act.quantize_q8_0`` in the same layout.

``q8_0.matvec`` / ``warp8``: one warp per output row, 8 warps (8 rows) per
256-thread block.  Lane ``l`` owns blocks ``l, l+32, ...``; for each it loads
the 4 weight words and 4 activation words (independent 8-byte loads, so a
warp has 4 x 256 contiguous bytes of weights in flight per step), does 8
``dp4a``, and adds ``d_w * d_x * dot`` in float64.  The row sum is a 5-step
float64 shuffle reduction, rounded to float32 once at the store.  Given a
second matrix ``w2`` of the same row length, one launch computes both
products of the activation (rows of ``w``, then rows of ``w2``): a decode
step's small projections are latency-bound, so two of them in one launch
cost about one (``attn_q_a`` + ``attn_kv``, the shared expert's gate + up).
A lane reads its first ``EARLY_BLOCKS`` blocks' weight words before
``wait_prior_grid``: launched early in a decode step, the kernel streams them
while the activation's quantization still runs.  Measured on H200, 20-layer
flash decode, A B A in one call: +0.8 to +2.2% t/s on ``full``, +1.0 to +1.4%
on the 70 GB share (bench/results/decode_ab_h200.md).

Numerics (docs/model.md, "Numerics: one rounding per value"): the integer
block dots are exact, the per-block terms ``float64(d_w) * float64(d_x) *
float64(isum)`` and their sum are float64 (no float32 rounding before the
output), so the result is the float32 rounding of ``sum_b d_w d_x sum_k q_w
q_x`` in any order: bit-identical to the float64 twin except, rarely (~1e-7
per value), one ulp.  float64 work is per 32-value block, never per int8.

Every array index is cast to uint64 at the access: numba emits negative-index
wraparound code (shift, and, add on 64 bits) for signed indices, which costs
more than the load itself in these loops.

``q8_0.matmul`` / ``warp8_t8``: the same row-per-warp walk for a batch of
tokens, each lane reusing its weight words for up to 8 tokens (``T``) before
moving on: weights are read ``ceil(n / 8)`` times instead of ``n`` times.

Simulator geometry (compile-time constants, the GPU's are 32 / 8 / 1): one
lane per row (``LANES = 1``: no shuffle, no barrier), 8 threads a block and
16 rows a thread (``ROWS_PER_THREAD``), since the simulator pays for every
thread it starts.  The float64 sums then run in another order than on the
GPU (~1e-16 relative, below the float32 output's rounding); the integer block
dots are the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8_0Act, q8_0_to_device
from ds4nb.kernels.intrinsics import (SIMULATOR, device, dot8, float32, float64, int32, uint64, wait_prior_grid,
                                      warp_sum)
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, Requirements, implementation
from ds4nb.quants import dequantize, dequantize_q8_0_activation, quantize_q8_0, random_blocks
from ds4nb.quants.repack import PackedWeight, layout_name, repack

Q = GGMLQuantizationType
QK8_0 = 32
LANES = 1 if SIMULATOR else 32  # lanes per row (a warp on the GPU)
ROWS_PER_BLOCK = 8  # rows a block works on at once (GPU: warps per block, one row each)
ROWS_PER_THREAD = 16 if SIMULATOR else 1  # rows a lane walks one after the other
TOKENS_PER_PASS = 8  # q8_0.matmul: tokens sharing one read of the weights
EARLY_BLOCKS = 2     # q8_0.matvec: blocks a lane reads before waiting for the prior grid (_make_matvec)

_D0 = np.float64(0.0)


@device
def _q8_dot(w0, w1, w2, w3, dw, xq, xd, xw, nb, b):
    """Block ``b``: its 4 weight words (scale ``dw``) . the 4 activation words (row starting at word
    ``4 * xw``, scale ``xw``), scaled by d_w * d_x (float64, exact)."""
    xb = 4 * xw + b
    s = dot8(w0, xq[uint64(xb)], int32(0))
    s = dot8(w1, xq[uint64(xb + nb)], s)
    s = dot8(w2, xq[uint64(xb + 2 * nb)], s)
    s = dot8(w3, xq[uint64(xb + 3 * nb)], s)
    return float64(s) * (float64(dw) * float64(xd[uint64(xw + b)]))


@device
def _q8_block(qs, dm, xq, xd, wq, wd, xw, nb, b):
    """One 32-value block of weight row ``wq`` (words) / ``wd`` (scales) . the activation (``_q8_dot``)."""
    return _q8_dot(qs[uint64(wq + b)], qs[uint64(wq + nb + b)], qs[uint64(wq + 2 * nb + b)],
                   qs[uint64(wq + 3 * nb + b)], float32(dm[uint64(wd + b)]), xq, xd, xw, nb, b)


@L.kernel_factory
def _make_matvec(nb: int):
    """Row-per-warp matvec for rows of ``nb`` blocks.  ``nb`` is a compile-time
    constant: the block-minor offsets ``j * nb`` fold into the loads' immediates
    and the ``nb // 32`` full steps have a constant trip count, so they unroll
    and every lane has all of its weight words in flight at once.  Row ``r``
    reads activation row ``r // rows_per_x`` (one row for a plain matvec; the
    head groups of ``attn_output_a`` in one launch, docs/model.md step 13).

    A lane reads the words of its first ``early`` blocks before waiting for the
    prior grid: weights do not change during a step, so a launch made early
    (``_launch.Recorder``) streams them while the kernel that writes the
    activation (a quantization) still runs, instead of after it."""
    full = nb // LANES
    early = min(full, EARLY_BLOCKS)
    n_early = max(1, early)      # local array sizes (compile-time constants)
    n_words = 4 * n_early

    @device
    def early_weights(qs, dm, row, ew, ed):
        """Words and scales of the lane's first ``early`` blocks of row ``row`` (weights only: no grid of the
        step writes them, so this may run before ``wait_prior_grid``)."""
        lane = cuda.threadIdx.x % LANES
        wq = row * 4 * nb
        for p in range(early):
            b = lane + LANES * p
            for j in range(4):
                ew[4 * p + j] = qs[uint64(wq + j * nb + b)]
            ed[p] = float32(dm[uint64(row * nb + b)])

    @device
    def early_pair(qs, dm, n_rows, qs2, dm2, n_rows2, row, ew, ed):
        """``early_weights`` of launch row ``row``: the first matrix's rows, then the second's."""
        if row < n_rows:
            early_weights(qs, dm, row, ew, ed)
        elif row < n_rows + n_rows2:
            early_weights(qs2, dm2, row - n_rows, ew, ed)

    @device
    def row_dot(qs, dm, n_rows, rows_per_x, xq, xd, out, row, lane, ew, ed, has_early):
        if row >= n_rows:  # a whole warp leaves: shuffles below stay full-warp
            return
        wq = row * 4 * nb
        wd = row * nb
        xw = (row // rows_per_x) * nb
        acc = _D0
        for it in range(full):
            if has_early and it < early:
                acc += _q8_dot(ew[4 * it], ew[4 * it + 1], ew[4 * it + 2], ew[4 * it + 3], ed[it], xq, xd, xw, nb,
                               lane + LANES * it)
            else:
                acc += _q8_block(qs, dm, xq, xd, wq, wd, xw, nb, lane + LANES * it)
        if lane < nb - LANES * full:
            acc += _q8_block(qs, dm, xq, xd, wq, wd, xw, nb, lane + LANES * full)
        acc = warp_sum(acc, LANES)
        if lane == 0:
            out[row] = float32(acc)   # the one rounding

    @device
    def pair_row(qs, dm, n_rows, rows_per_x, qs2, dm2, n_rows2, xq, xd, out, out2, row, lane, ew, ed, has_early):
        """Row ``row`` of the launch: the first matrix's rows, then the second's (a warp-uniform branch)."""
        if row < n_rows:
            row_dot(qs, dm, n_rows, rows_per_x, xq, xd, out, row, lane, ew, ed, has_early)
        else:
            row_dot(qs2, dm2, n_rows2, n_rows2, xq, xd, out2, row - n_rows, lane, ew, ed, has_early)

    @cuda.jit
    def kernel(qs, dm, n_rows, rows_per_x, qs2, dm2, n_rows2, xq, xd, out, out2):
        row = cuda.blockIdx.x * (ROWS_PER_BLOCK * ROWS_PER_THREAD) + cuda.threadIdx.x // LANES
        ew = cuda.local.array(n_words, uint64)
        ed = cuda.local.array(n_early, float32)
        early_pair(qs, dm, n_rows, qs2, dm2, n_rows2, row, ew, ed)
        wait_prior_grid()
        lane = cuda.threadIdx.x % LANES
        pair_row(qs, dm, n_rows, rows_per_x, qs2, dm2, n_rows2, xq, xd, out, out2, row, lane, ew, ed, True)
        if ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, ROWS_PER_THREAD):
                pair_row(qs, dm, n_rows, rows_per_x, qs2, dm2, n_rows2, xq, xd, out, out2,
                         row + rep * ROWS_PER_BLOCK, lane, ew, ed, False)

    return kernel


@L.kernel_factory
def _make_matmul(nb: int):
    @device
    def row_dots(qs, dm, n_rows, n_tok, xq, xd, out, row, lane):
        if row >= n_rows:
            return
        t0 = cuda.blockIdx.y * TOKENS_PER_PASS
        wq = row * 4 * nb
        acc = cuda.local.array(TOKENS_PER_PASS, float64)
        for i in range(TOKENS_PER_PASS):
            acc[i] = _D0
        for b in range(lane, nb, LANES):
            w0 = qs[uint64(wq + b)]
            w1 = qs[uint64(wq + nb + b)]
            w2 = qs[uint64(wq + 2 * nb + b)]
            w3 = qs[uint64(wq + 3 * nb + b)]
            d = float64(float32(dm[uint64(row * nb + b)]))
            for i in range(TOKENS_PER_PASS):
                t = t0 + i
                if t < n_tok:
                    xb = t * 4 * nb + b
                    s = dot8(w0, xq[uint64(xb)], int32(0))
                    s = dot8(w1, xq[uint64(xb + nb)], s)
                    s = dot8(w2, xq[uint64(xb + 2 * nb)], s)
                    s = dot8(w3, xq[uint64(xb + 3 * nb)], s)
                    acc[i] += float64(s) * (d * float64(xd[uint64(t * nb + b)]))
        for i in range(TOKENS_PER_PASS):
            v = warp_sum(acc[i], LANES)
            if lane == 0 and t0 + i < n_tok:
                out[(t0 + i) * n_rows + row] = float32(v)

    @cuda.jit
    def kernel(qs, dm, n_rows, n_tok, xq, xd, out):
        wait_prior_grid()
        lane = cuda.threadIdx.x % LANES
        row = cuda.blockIdx.x * (ROWS_PER_BLOCK * ROWS_PER_THREAD) + cuda.threadIdx.x // LANES
        row_dots(qs, dm, n_rows, n_tok, xq, xd, out, row, lane)
        if ROWS_PER_THREAD > 1:  # the simulator's further rows (a constant-false branch on the GPU)
            for rep in range(1, ROWS_PER_THREAD):
                row_dots(qs, dm, n_rows, n_tok, xq, xd, out, row + rep * ROWS_PER_BLOCK, lane)

    return kernel


def kernel_for(kind: str, nb: int) -> Any:
    """The compiled-on-first-launch kernel for ``kind`` ('matvec' or 'matmul') and ``nb`` blocks per row."""
    return (_make_matvec if kind == "matvec" else _make_matmul)(nb)


def _check(w: PackedWeight, x: Q8_0Act) -> tuple[int, int, int]:
    if w.qtype != Q.Q8_0:
        raise ValueError(f"expected a Q8_0 weight, got {w.qtype.name}")
    n_rows, k = w.shape[-2], w.shape[-1]
    nb = k // QK8_0
    n_tok = x.d.size // nb
    return n_rows, nb, n_tok


@implementation("q8_0.matvec", "warp8", layout=layout_name(Q.Q8_0), priority=10,
                requires=Requirements(max_batch=1))
def q8_0_matvec_warp8(w: PackedWeight, x: Q8_0Act, *, out: Any, w2: PackedWeight | None = None,
                      out2: Any | None = None, stream: Any = 0) -> Any:
    """y = W x for one token: one warp per row, dp4a on block-minor words; ``w2`` given, also ``out2 = W2 x``
    in the same launch (two projections of one activation: one launch's latency instead of two)."""
    n_rows, nb, _ = _check(w, x)
    if w2 is None:
        return _matvec(w, x, out, n_rows, nb, n_rows, stream)
    n_rows2, nb2, _ = _check(w2, x)
    if nb2 != nb or out2 is None:
        raise ValueError(f"q8_0.matvec: w2 needs the same row length ({nb2} blocks, not {nb}) and an out2")
    return _matvec(w, x, out, n_rows, nb, n_rows, stream, w2, out2, n_rows2)


@implementation("q8_0.grouped_matvec", "warp8", layout=layout_name(Q.Q8_0), priority=10)
def q8_0_grouped_matvec_warp8(w: PackedWeight, x: Q8_0Act, *, out: Any, stream: Any = 0) -> Any:
    """y[g*R:(g+1)*R] = W[g*R:(g+1)*R] x[g] for G activation rows in one launch (warp8's kernel)."""
    n_rows, nb, groups = _check(w, x)
    if groups < 1 or n_rows % groups:
        raise ValueError(f"q8_0.grouped_matvec: {n_rows} rows do not split into {groups} groups")
    return _matvec(w, x, out, n_rows, nb, n_rows // groups, stream)


def _matvec(w: PackedWeight, x: Q8_0Act, out: Any, n_rows: int, nb: int, rows_per_x: int, stream: Any,
            w2: PackedWeight | None = None, out2: Any | None = None, n_rows2: int = 0) -> Any:
    w2 = w if w2 is None else w2
    out2 = out if out2 is None else out2
    L.launch(kernel_for("matvec", nb), L.cdiv(n_rows + n_rows2, ROWS_PER_BLOCK * ROWS_PER_THREAD),
             LANES * ROWS_PER_BLOCK, stream, w.qs, w.dm, n_rows, rows_per_x, w2.qs, w2.dm, n_rows2, x.qs, x.d,
             L.flat(out), L.flat(out2))
    return out


@implementation("q8_0.matmul", "warp8_t8", layout=layout_name(Q.Q8_0), priority=10)
def q8_0_matmul_warp8(w: PackedWeight, x: Q8_0Act, *, out: Any, stream: Any = 0) -> Any:
    """Y = X W^T for n tokens: row per warp, each weight word reused for 8 tokens."""
    n_rows, nb, n_tok = _check(w, x)
    grid = (L.cdiv(n_rows, ROWS_PER_BLOCK * ROWS_PER_THREAD), L.cdiv(n_tok, TOKENS_PER_PASS))
    L.launch(kernel_for("matmul", nb), grid, LANES * ROWS_PER_BLOCK, stream, w.qs, w.dm, n_rows, n_tok, x.qs, x.d,
                                                                  L.flat(out))
    return out


# ---------------------------------------------------------------------------
# Parity cases: twin = dequantize(W) @ dequantize(quantize_q8_0(x)) in float64 (exact operands),
# rounded once to float32 (docs/model.md, "Numerics: one rounding per value")
# ---------------------------------------------------------------------------

#: model-scale shapes: attn_q_b (1024 -> 32768) and the output head (4096 -> 129280)
MODEL_SHAPES = {"q_b": (32768, 1024), "output": (129280, 4096)}


def q8_0_reference(raw: np.ndarray, shape: tuple[int, int], xq: np.ndarray, xd: np.ndarray,
                   chunk: int = 16384) -> np.ndarray:
    """float64 (n_tok, n_rows) = x_deq @ W_deq^T from the exact float64 operands, dequantizing W in row chunks."""
    x = dequantize_q8_0_activation(xq, xd, dtype=np.float64)
    n_rows, k = shape
    rb = raw.size // n_rows
    out = np.empty((x.shape[0], n_rows))
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        wd = dequantize(raw[r0 * rb:r1 * rb], Q.Q8_0, (r1 - r0, k), dtype=np.float64)
        out[:, r0:r1] = x @ wd.T
    return out


def make_q8_0_case(rng: np.random.Generator, n_rows: int, k: int, n_tok: int) -> Case:
    raw = random_blocks(Q.Q8_0, (n_rows, k), rng, rms=0.02)
    x = (rng.standard_normal((n_tok, k)) * rng.uniform(0.5, 2.0, size=(n_tok, 1))).astype(np.float32)
    w = repack(raw, Q.Q8_0, (n_rows, k)).to_device()
    xa = q8_0_to_device(x)
    ref = q8_0_reference(raw, (n_rows, k), *quantize_q8_0(x))
    out = L.device_array(n_tok * n_rows, np.float32)
    return Case((w, xa), out, (ref.reshape(-1).astype(np.float32),), (CONTRACT,), weight_bytes=raw.size,
                info={"rows": n_rows, "k": k, "tokens": n_tok})


def _case_matvec(rng: np.random.Generator, scale: str) -> Case:
    if scale == "tiny":
        return make_q8_0_case(rng, 19, 1088, 1)  # 34 blocks: lanes 0,1 take two, rows not a multiple of 8
    return make_q8_0_case(rng, *MODEL_SHAPES["q_b"], 1)


def _case_grouped(rng: np.random.Generator, scale: str) -> Case:
    """attn_output_a's shape: G groups of R rows, group g applied to activation row g."""
    groups, rows, k = (3, 7, 96) if scale == "tiny" else (8, 1024, 4096)
    raw = random_blocks(Q.Q8_0, (groups * rows, k), rng, rms=0.02)
    x = rng.standard_normal((groups, k)).astype(np.float32)
    xq, xd = quantize_q8_0(x)
    full = q8_0_reference(raw, (groups * rows, k), xq, xd)                 # (G, G*R): every group x every row
    ref = np.concatenate([full[g, g * rows:(g + 1) * rows] for g in range(groups)])
    out = L.device_array(groups * rows, np.float32)
    return Case((repack(raw, Q.Q8_0, (groups * rows, k)).to_device(), q8_0_to_device(x)), out,
                (ref.astype(np.float32),), (CONTRACT,), weight_bytes=raw.size,
                info={"groups": groups, "rows": rows, "k": k})


def _case_matmul(rng: np.random.Generator, scale: str) -> Case:
    if scale == "tiny":
        return make_q8_0_case(rng, 5, 256, 10)  # 10 tokens: one full pass of 8 and a partial one
    return make_q8_0_case(rng, 4096, 4096, 24)


# The outputs are checked under the contract (parity.CONTRACT: bit-identical but for rare one-ulp
# differences); the tolerance is for relative-error checks of chained results (float32 rounding).
_TOL = 1e-6

OPS = [
    OpSpec("q8_0.matvec", "Q8_0 weight x Q8_0 activation, one token",
           "(w: PackedWeight Q8_0 (N, K), x: Q8_0Act (1, K), *, out f32 (N,), w2=None (N2, K), out2=None (N2,), "
           "stream)",
           "dequantize(W) @ dequantize_q8_0_activation(quantize_q8_0(x)) in float64, rounded once", _TOL, _case_matvec),
    OpSpec("q8_0.grouped_matvec", "Q8_0 weight rows in G groups, group g x activation row g, one launch",
           "(w: PackedWeight Q8_0 (G*R, K), x: Q8_0Act (G, K), *, out f32 (G*R,), stream)",
           "per group: dequantize(W_g) @ dequantize_q8_0_activation(quantize_q8_0(x_g)) in float64, rounded once",
           _TOL, _case_grouped),
    OpSpec("q8_0.matmul", "Q8_0 weight x Q8_0 activations, n tokens",
           "(w: PackedWeight Q8_0 (N, K), x: Q8_0Act (n, K), *, out f32 (n, N), stream)",
           "dequantize(W) @ dequantize_q8_0_activation(quantize_q8_0(X)).T in float64, rounded once", _TOL,
           _case_matmul),
]
