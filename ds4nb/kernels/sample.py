"""Next-token sampling on the device (the twin: ``ds4nb.sampling``).

Decode then copies 8 bytes (token id, status) to the host instead of the
129280 logits.  The filters are the twin's, in its order: drop non-finite
logits; top-k (ties to the lower id, k <= 1024); weights
``w = exp((logit - max) / T)`` in float64 with ``total`` = their sum over the
top-k set (or over every finite logit without top-k); min-p keeps
``w >= min_p``; candidates sorted by weight (ties: lower id); top-p keeps the
shortest prefix whose cumulative weight reaches ``top_p * total``; the
draw is ``searchsorted(cumsum, u * cumsum[-1])`` with a uniform ``u`` from the
host (one ``rng.random()`` per non-greedy call, like the twin, so a seeded
generator reproduces the twin's tokens).  Temperature 0 is the argmax (NaN
never wins, ties to the lower id).

The parameters live in device memory (a float64 *sampling record*, written
by the host with each token, :func:`sampling_record`), so one captured decode
step serves greedy and sampled generation alike.  Launches (the same four
every token; the ones that do not apply exit at once):

0. greedy: ``sample.argmax``'s multi-block arg-max, gated on the record.
1. ``_stats`` (single block of 1024 threads; a vocabulary pass is ~126
   coalesced loads a thread; the simulator runs it on one thread with
   ``LANES = 1``): argmax, finite max and count, and the top-k size
   ``min(top_k, finite count)`` (0 when greedy or without top-k); without
   top-k a second pass gathers the ids with ``w >= min_p`` (at most ``CAP``)
   and sums ``total``.
2. ``topk.select`` (``ds4nb.kernels.indexer``) over the logits, k from
   device memory (nothing when it is 0).
3. ``_draw``: sorts the candidates by (logit desc, id asc) (a bitonic sort of
   64-bit keys; equals the twin's weight order except where distinct logits
   round to the same float64 weight, i.e. underflowed weights), then min-p,
   top-p, the cumulative sums (float64, one thread, in order) and the draw.

More than ``CAP`` min-p survivors without top-k (e.g. ``min_p = 0``) set
status 1; :func:`sample_token` then falls back to the twin on the host.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import argmax as _am    # module imports: add_module registers marked names it sees
from ds4nb.kernels import indexer as _ix
from ds4nb.kernels.f16_matvec import block_sum, group_max
from ds4nb.kernels.indexer import topk_key
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, int32, int64, uint64, wait_prior_grid
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, implementation
from ds4nb.kernels.router import f32_bits

CAP = 1024                      # candidates the draw kernel sorts in shared memory
THREADS = 1024
LANES = 1 if SIMULATOR else 32  # lanes of a reduction group; the simulator's blocks are one thread
_F0 = np.float32(0.0)
_D0 = np.float64(0.0)
_I0 = np.int64(0)
_I31 = np.int64(31)
_ILO = np.int64(0x7FFFFFFF)
_ISIGN = np.int64(0x80000000)
_IMASK = np.int64(0xFFFFFFFF)
_U0 = np.uint64(0)
_ULO = np.uint64(0xFFFFFFFF)
_NEG_INF = np.float32(-np.inf)
_FINF = np.float32(np.inf)
ST_ARGMAX, ST_FINITE, ST_NCAND, ST_TOPK = 0, 1, 2, 3
SF_TOTAL, SF_MAX = 0, 1
#: fields of the float64 sampling record (greedy and top_k are exact small integers)
SP_GREEDY, SP_TOP_K, SP_TEMP, SP_MIN_P, SP_TOP_P, SP_U = range(6)
SP_FIELDS = 6


def sampling_record(params: Any, u: float, n_vocab: int, out: np.ndarray | None = None) -> np.ndarray:
    """The float64 sampling record of ``params`` (a ``SamplingParams``) and the uniform draw ``u``."""
    from ds4nb.sampling import MAX_TOP_K

    rec = np.zeros(SP_FIELDS, np.float64) if out is None else out
    greedy = params.temperature == 0
    rec[SP_GREEDY] = float(greedy)
    rec[SP_TOP_K] = min(int(params.top_k), MAX_TOP_K, CAP, n_vocab)
    rec[SP_TEMP] = 1.0 if greedy else params.temperature
    rec[SP_MIN_P] = params.min_p
    rec[SP_TOP_P] = params.top_p
    rec[SP_U] = u
    return rec


@device
def _greedy_key(v, i):
    """Distinct int64 key for the twin's argmax: NaN counts as -inf, +-inf are ordinary values."""
    if v != v:
        v = _NEG_INF
    u = f32_bits(v)
    if u == _ISIGN:
        u = _I0                  # -0.0 ties with +0.0 (the lower id wins, as numpy's argmax)
    o = (~u & _IMASK) if (u & _ISIGN) != _I0 else (u | _ISIGN)
    return (o << _I31) | (_ILO - int64(i))


@cuda.jit
def _stats_kernel(logits, n, sp, cap, ids, st_i, st_f, out):
    wait_prior_grid()
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lane = tid % LANES
    nw = nt // LANES
    if sp[SP_GREEDY] != 0:            # sample.argmax answers (uniform branch)
        if tid == 0:
            st_i[ST_TOPK] = 0
            out[1] = 0
        return
    top_k = int32(sp[SP_TOP_K])
    temp = sp[SP_TEMP]
    min_p = sp[SP_MIN_P]
    # pass 1: argmax (NaN as -inf, ties to the lower id), finite max and count
    best = _I0
    fmax = _NEG_INF
    cnt = int32(0)
    for i in range(tid, n, nt):
        v = logits[i]
        best = max(best, _greedy_key(v, i))
        if not math.isinf(v) and v == v:
            fmax = max(fmax, v)
            cnt += 1
    redi = cuda.shared.array(32, int64)
    redf = cuda.shared.array(32, float32)
    redc = cuda.shared.array(32, int32)
    redd = cuda.shared.array(32, float64)
    best = group_max(best, LANES)
    fmax = group_max(fmax, LANES)
    if lane == 0:
        redi[tid // LANES] = best
        redf[tid // LANES] = fmax
    cuda.syncthreads()
    best = group_max(redi[lane] if lane < nw else _I0, LANES)
    fmax = group_max(redf[lane] if lane < nw else _NEG_INF, LANES)
    cnt = block_sum(cnt, redc, nw, int32(0), LANES)
    arg = int32(_ILO - (best & _ILO))
    if best == _I0:
        arg = int32(0)
    if tid == 0:
        st_i[ST_ARGMAX] = arg
        st_i[ST_FINITE] = cnt
        st_i[ST_NCAND] = 0
        st_i[ST_TOPK] = min(top_k, cnt)
        st_f[SF_MAX] = float64(fmax)
    if top_k > 0 or cnt == 0:
        return
    # pass 2 (no top-k): weights, their total, and the min-p survivors
    cuda.syncthreads()
    tot = _D0
    fm = float64(fmax)
    for i in range(tid, n, nt):
        v = logits[i]
        if not math.isinf(v) and v == v:
            w = math.exp((float64(v) - fm) / temp)
            tot += w
            if w >= min_p:
                slot = cuda.atomic.add(st_i, ST_NCAND, 1)
                if slot < cap:
                    ids[slot] = i
    tot = block_sum(tot, redd, nw, _D0, LANES)
    if tid == 0:
        st_f[SF_TOTAL] = tot


@cuda.jit
def _draw_kernel(logits, ids, st_i, st_f, sp, out):
    wait_prior_grid()
    if sp[SP_GREEDY] != 0:            # sample.argmax answered
        return
    tid = cuda.threadIdx.x
    nt = cuda.blockDim.x
    nw = nt // LANES
    top_k = int32(sp[SP_TOP_K])
    use_topk = top_k > 0
    temp = sp[SP_TEMP]
    min_p = sp[SP_MIN_P]
    top_p = sp[SP_TOP_P]
    u = sp[SP_U]
    keys = cuda.shared.array(CAP, uint64)
    wts = cuda.shared.array(CAP, float64)
    redd = cuda.shared.array(32, float64)
    if st_i[ST_FINITE] == 0:          # nothing finite: the argmax (uniform branch)
        if tid == 0:
            out[0] = st_i[ST_ARGMAX]
            out[1] = 0
        return
    n_c = min(top_k, st_i[ST_FINITE]) if use_topk else st_i[ST_NCAND]
    if n_c > CAP:
        if tid == 0:
            out[0] = -1
            out[1] = 1
        return
    for j in range(tid, CAP, nt):
        keys[j] = topk_key(f32_bits(logits[ids[j]]), ids[j]) if j < n_c else _U0
    sb = 1
    while sb < n_c:
        sb *= 2
    size = 2
    while size <= sb:
        stride = size // 2
        while stride > 0:
            cuda.syncthreads()
            for i in range(tid, sb, nt):
                j = i ^ stride
                if j > i:
                    a = keys[i]
                    b = keys[j]
                    if (a < b) == ((i & size) == 0):
                        keys[i] = b
                        keys[j] = a
            stride //= 2
        size *= 2
    cuda.syncthreads()
    fm = st_f[SF_MAX]
    part = _D0
    for j in range(tid, n_c, nt):
        idx = int32(_ULO - (keys[j] & _ULO))
        w = math.exp((float64(logits[idx]) - fm) / temp)
        wts[j] = w
        part += w
    total = block_sum(part, redd, nw, _D0, LANES)
    if not use_topk:
        total = st_f[SF_TOTAL]
    cuda.syncthreads()
    if tid == 0:
        n_keep = 0
        while n_keep < n_c and wts[n_keep] >= min_p:
            n_keep += 1
        cum = _D0
        for j in range(n_keep):       # cumulative weights in place
            cum += wts[j]
            wts[j] = cum
        if top_p > _D0 and top_p < np.float64(1.0):
            for j in range(n_keep):
                if wts[j] >= top_p * total:
                    n_keep = j + 1
                    break
        target = u * wts[n_keep - 1]
        pick = n_keep - 1
        for j in range(n_keep):
            if wts[j] >= target:
                pick = j
                break
        out[0] = int32(_ULO - (keys[pick] & _ULO))
        out[1] = 0


class SampleScratch(NamedTuple):
    ids: Any     # int32 (CAP,)
    st_i: Any    # int32 (4,)
    st_f: Any    # f64 (2,)
    argmax: Any  # the greedy arg-max's workspace


def alloc_scratch(n_vocab: int, stream: Any = 0) -> SampleScratch:
    return SampleScratch(L.device_array(CAP, np.int32, stream), L.device_array(4, np.int32, stream),
                         L.device_array(2, np.float64, stream), _am.alloc_workspace(1, n_vocab, stream))


def _threads() -> int:
    return 1 if SIMULATOR else THREADS   # the simulator: one thread (one-lane warps, no shuffles)


@implementation("sample.draw", "block_filters", layout="f32 logits")
def sample_launch(logits: Any, *, out: Any, sp: Any, scratch: SampleScratch | None = None,
                  stream: Any = 0) -> Any:
    """out int32 (2,) = (token, status) for logits f32 (n_vocab,); status 1: fall back to the host.

    ``sp`` is the float64 sampling record on the device (:func:`sampling_record`).
    """
    n = logits.size
    scratch = scratch or alloc_scratch(n, stream)
    nt = _threads()
    _am.argmax(logits.reshape(1, n), out=out, workspace=scratch.argmax, gate=(sp, SP_GREEDY), stream=stream)
    L.launch(_stats_kernel, 1, nt, stream, L.flat(logits), n, sp, CAP, scratch.ids, scratch.st_i, scratch.st_f, out)
    _ix.topk(logits, n, min(CAP, n), out=scratch.ids, k_from=(scratch.st_i, ST_TOPK), stream=stream)
    L.launch(_draw_kernel, 1, nt, stream, L.flat(logits), scratch.ids, scratch.st_i, scratch.st_f, sp, out)
    return out


def sample_device(logits: Any, *, out: Any, params: Any, u: float, scratch: SampleScratch | None = None,
                  stream: Any = 0) -> Any:
    """``sample.draw`` with host-side parameters: uploads their sampling record first (tests, one-off calls)."""
    sp = cuda.to_device(sampling_record(params, u, logits.size), stream=stream)
    return sample_launch(logits, out=out, sp=sp, scratch=scratch, stream=stream)


class FixedDraw:
    """Stands in for a numpy Generator: the twin's single ``random()`` returns ``u``."""

    def __init__(self, u: float):
        self.u = u

    def random(self) -> float:
        return self.u


def sample_token(logits: Any, params: Any, rng: np.random.Generator, *, out: Any | None = None,
                 scratch: SampleScratch | None = None, stream: Any = 0) -> int:
    """Sample on the device; only 8 bytes come back (the logits too on the rare fallback)."""
    from ds4nb.sampling import sample as host_sample

    u = 0.0 if params.temperature == 0 else float(rng.random())
    out = out if out is not None else L.device_array(2, np.int32, stream)
    sample_device(logits, out=out, params=params, u=u, scratch=scratch, stream=stream)
    tok, status = (int(v) for v in out.copy_to_host(stream=stream))
    if status:
        return host_sample(logits.copy_to_host(stream=stream), params, FixedDraw(u))
    return tok


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def random_logits(rng: np.random.Generator, n: int) -> np.ndarray:
    # a vocabulary-sized row gets a spread that leaves < CAP min-p survivors (real logits do)
    spread = rng.uniform(0.5, 4) if n < 10000 else rng.uniform(2.5, 6)
    x = (rng.standard_normal(n) * spread).astype(np.float32)
    x[rng.integers(0, n, 3)] = -np.inf
    x[rng.integers(0, n)] = np.nan
    x[rng.integers(0, n, 4)] = x.max()        # ties at the top
    return x


def _case(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.sampling import SamplingParams, sample

    n = 300 if scale == "tiny" else 129280
    x = random_logits(rng, n)
    top_k = int(rng.choice([0, 5, 12] if scale == "tiny" else [0, 50, 1024]))
    params = SamplingParams(temperature=float(rng.choice([0.0, 0.7, 1.0])), top_k=top_k,
                            top_p=float(rng.choice([1.0, 0.9])), min_p=float(rng.choice([0.05, 0.2])))
    u = float(rng.random())
    ref = sample(x, params, FixedDraw(u))
    out = L.device_array(2, np.int32)
    return Case((cuda.to_device(x),), out, (np.array([ref, 0], np.int32),), (True,),
                kwargs=dict(sp=cuda.to_device(sampling_record(params, u, n))), info={"n": n, "params": params})


OPS = [
    OpSpec("sample.draw", "device sampling: greedy, or top-k / temperature / min-p / top-p with a host uniform",
           "(logits f32 (n_vocab,), *, out int32 (2,) = (token, status), sp: f64 sampling record (params, u), "
           "scratch=None, stream)",
           "ds4nb.sampling.sample (with a generator returning u)", 0.0, _case),
]
