"""The MoE router on the device (docs/model.md step 16), after the F16 ``ffn_gate_inp`` matvec.

``router.select``: for each token (one block, one thread per expert),
``p = float32(sqrt(softplus(logit)))`` evaluated in float64 and rounded once
(softplus with the reference's +-20 cut-offs: ``x`` above 20, ``exp(x)``
below -20, ``log1p(exp(x))`` otherwise), then either

* top-k of ``p + bias`` (``bias`` optional) summed in float64, best first,
  ties to the lower expert id: ``k`` rounds of a block-wide arg-max over
  (order-preserving int64 image of the float64 key, expert id) pairs, a pair
  winning on the larger key, then the lower id; the winner drops out of the
  next round (NaN keys come last, as in the oracle's stable argsort); or
* hash routing: the ``k`` experts of ``tid2eid[token]`` (token ids read on
  the device, e.g. straight from the sampler's output);

and the weights ``float32(p[e_i] / max(sum_i p[e_i], 6.1e-5) * scale)``
evaluated in float64 from the float32 ``p`` (without ``normalise``:
``float32(p * scale)``).

Numerics (docs/model.md, "one rounding per value"): ``p`` and the weights are
rounded once each, so they equal the oracle's (``ops.router_probs``,
``ops.route_weights``) bit for bit except where libdevice's and numpy's
float64 ``exp`` / ``log1p`` (or the weight sum's order) straddle a float32
rounding boundary (~1e-7 of the values, one ulp).  The selection key
``p + bias`` is one float64 addition of two float32 values, so it is exactly
the oracle's, and the selection is exact.

Outputs: ``selected`` int32 (T, k), ``weights`` f32 (T, k).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.argmax import better_pair, lane_argmax
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, int32, int64, wait_prior_grid
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

_F0 = np.float32(0.0)
_D0 = np.float64(0.0)
_D20 = np.float64(20.0)
ROUTE_SUM_FLOOR = np.float32(6.103515625e-5)
_FLOOR64 = np.float64(ROUTE_SUM_FLOOR)
_IMASK = np.int64(0xFFFFFFFF)
_ILO = np.int32(0x7FFFFFFF)                  # the expert id of "no candidate" (a removed or padding slot)
_KMIN = np.int64(-0x8000000000000000)        # key of NaN scores and taken or padding slots: below every other key
_KSIGN = np.int64(-0x8000000000000000)       # float64 sign bit (as int64)
_KEXP = np.int64(0x7FF0000000000000)
_KMAG = np.int64(0x7FFFFFFFFFFFFFFF)
_KMANT = np.int64(0x000FFFFFFFFFFFFF)
_K0 = np.int64(0)
MAX_EXPERTS = 1024
MAX_USED = 32
# The simulator runs one thread per token (one-lane "warps", no shuffles) that takes every expert,
# in branches that are constant-false on the GPU (one thread per expert there).
LANES = 1 if SIMULATOR else 32
EXPERTS_PER_THREAD = MAX_EXPERTS if SIMULATOR else 1

if SIMULATOR:
    def f32_bits(x):
        """The IEEE bits of a float32 as a non-negative int64."""
        return np.int64(np.float32(x).view(np.uint32))

    def f64_bits(x):
        """The IEEE bits of a float64 as an int64."""
        return np.float64(x).view(np.int64)
else:
    from numba.cuda import libdevice

    @device
    def f32_bits(x):
        """The IEEE bits of a float32 as a non-negative int64."""
        return int64(libdevice.float_as_int(x)) & _IMASK

    @device
    def f64_bits(x):
        """The IEEE bits of a float64 as an int64."""
        return libdevice.double_as_longlong(x)


@device
def f64_key(v):
    """int64 whose order is the order of the float64 ``v``; -0.0 ties with +0.0; NaN -> _KMIN (last, as
    in numpy's argsort; +-inf keep their places)."""
    u = f64_bits(v)
    if (u & _KEXP) == _KEXP and (u & _KMANT) != _K0:
        return _KMIN
    if u == _KSIGN:
        return _K0
    if u < _K0:
        return u ^ _KMAG
    return u


@device
def softplus64(x):
    """log(1 + exp(x)) in float64 with the reference's cut-offs at +-20 (ops._softplus64)."""
    d = float64(x)
    if d > _D20:
        return d
    if d < -_D20:
        return math.exp(d)
    return math.log1p(math.exp(d))


@device
def _expert_prob(logits, t, n_expert, probs, e):
    p = float32(math.sqrt(softplus64(logits[t * n_expert + e])))     # one rounding
    probs[e] = p
    return p


@device
def _expert_key(p, bias, has_bias, e):
    s = float64(p) + float64(bias[e]) if has_bias else float64(p)   # exact-as-the-oracle float64 sum
    return f64_key(s)


@cuda.jit
def _router_kernel(logits, n_expert, bias, has_bias, k, scale, normalise, hash_mode, table, tokens,
                   sel_out, w_out):
    wait_prior_grid()
    t = cuda.blockIdx.x
    e = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lane = e % LANES
    valid = e < n_expert
    probs = cuda.shared.array(MAX_EXPERTS, float32)
    red_k = cuda.shared.array(32, int64)
    red_i = cuda.shared.array(32, int32)
    sel = cuda.shared.array(MAX_USED, int32)
    p = _F0
    if valid:
        p = _expert_prob(logits, t, n_expert, probs, e)
    if EXPERTS_PER_THREAD > 1:  # the simulator: this thread's further experts (constant-false on the GPU)
        for j in range(1, EXPERTS_PER_THREAD):
            if e + j * nt >= n_expert:
                break
            _expert_prob(logits, t, n_expert, probs, e + j * nt)
    if hash_mode:
        if e < k:
            sel[e] = table[tokens[t] * k + e]
        if EXPERTS_PER_THREAD > 1:
            for j in range(1, EXPERTS_PER_THREAD):
                if e + j * nt < k:
                    sel[e + j * nt] = table[tokens[t] * k + e + j * nt]
    else:
        key = _KMIN
        idx = _ILO
        if valid:
            key = _expert_key(p, bias, has_bias, e)
            idx = int32(e)
        keys = cuda.local.array(EXPERTS_PER_THREAD, int64)   # the simulator's further experts' keys
        ids = cuda.local.array(EXPERTS_PER_THREAD, int32)    # ... and their ids (_ILO: none / taken)
        if EXPERTS_PER_THREAD > 1:
            for j in range(1, EXPERTS_PER_THREAD):
                keys[j] = _KMIN
                ids[j] = _ILO
                if e + j * nt < n_expert:
                    keys[j] = _expert_key(probs[e + j * nt], bias, has_bias, e + j * nt)
                    ids[j] = int32(e + j * nt)
        for r in range(k):
            bk = key
            bi = idx
            if EXPERTS_PER_THREAD > 1:
                for j in range(1, EXPERTS_PER_THREAD):
                    if e + j * nt >= n_expert:
                        break
                    if better_pair(keys[j], ids[j], bk, bi):
                        bk = keys[j]
                        bi = ids[j]
            bk, bi = lane_argmax(bk, bi, LANES)          # warp arg-max of (key, id) pairs
            if lane == 0:
                red_k[e // LANES] = bk
                red_i[e // LANES] = bi
            cuda.syncthreads()
            bk = _KMIN
            bi = _ILO
            if lane < nt // LANES:
                bk = red_k[lane]
                bi = red_i[lane]
            bk, bi = lane_argmax(bk, bi, LANES)          # every warp re-reduces the warp winners
            win = bi
            if e == 0:
                sel[r] = win
            if idx == win:   # the winner drops out: (_KMIN, _ILO) never beats a candidate
                key = _KMIN
                idx = _ILO
            if EXPERTS_PER_THREAD > 1:
                for j in range(1, EXPERTS_PER_THREAD):
                    if e + j * nt >= n_expert:
                        break
                    if ids[j] == win:
                        keys[j] = _KMIN
                        ids[j] = _ILO
            cuda.syncthreads()          # red_k / red_i are rewritten next round
    cuda.syncthreads()
    if e == 0:
        tot = _D0
        for i in range(k):
            tot += float64(probs[sel[i]])
        tot = max(tot, _FLOOR64)
        sc = float64(scale)
        for i in range(k):
            w = float64(probs[sel[i]])
            if normalise:
                w = w / tot
            w_out[t * k + i] = float32(w * sc)                       # one rounding
            sel_out[t * k + i] = sel[i]


class RouteOut(NamedTuple):
    selected: Any   # int32 (T, k)
    weights: Any    # f32 (T, k)


def alloc_route(n_tok: int, k: int, stream: Any = 0) -> RouteOut:
    return RouteOut(L.device_array((n_tok, k), np.int32, stream), L.device_array((n_tok, k), np.float32, stream))



def _launch(logits, bias, tid2eid, tokens, out, k, scale, normalise, stream):
    n_tok, kk = out.selected.shape
    n_expert = logits.size // n_tok
    if kk != k or not 0 < k <= min(n_expert, MAX_USED) or n_expert > MAX_EXPERTS:
        raise ValueError(f"router: k={k} of {n_expert} experts (out {tuple(out.selected.shape)})")
    nt = 1 if SIMULATOR else max(32, L.cdiv(n_expert, 32) * 32)
    hashed = tid2eid is not None
    L.launch(_router_kernel, n_tok, nt, stream,
        L.flat(logits), n_expert, L.placeholder(np.float32) if bias is None else L.flat(bias), int(bias is not None),
        int(k), np.float32(scale), int(bool(normalise)), int(hashed),
        L.flat(tid2eid) if hashed else L.placeholder(np.int32), L.flat(tokens) if hashed else L.placeholder(np.int32),
        L.flat(out.selected), L.flat(out.weights))
    return out


@cuda.jit
def _hash_selection_kernel(table, tokens, k, out):
    wait_prior_grid()
    i = cuda.grid(1)
    if i < out.size:
        out[i] = table[tokens[i // k] * k + i % k]


def hash_selection(tid2eid: Any, tokens: Any, *, out: Any, k: int, stream: Any = 0) -> Any:
    """``out`` int32 (T, k) = ``tid2eid[tokens]``: a hash layer's experts, known from the token ids alone, the
    ids ``router.hash`` selects (a decode step copies the host-mapped ones ahead of the layer:
    ``ds4nb.engine.model``; a tool of the engine's, not an op with alternatives)."""
    n = out.size
    L.launch(_hash_selection_kernel, L.cdiv(n, 32), 32, stream, L.flat(tid2eid), L.flat(tokens), int(k), L.flat(out))
    return out


@implementation("router.select", "block_topk", layout="f32 logits")
def router_select(logits: Any, bias: Any | None = None, *, out: RouteOut, k: int, scale: float,
                  normalise: bool = True, stream: Any = 0) -> RouteOut:
    """Top-k experts of sqrt(softplus(logits)) (+ bias) per token and their normalised, scaled weights."""
    return _launch(logits, bias, None, None, out, k, scale, normalise, stream)


@implementation("router.hash", "block_table", layout="f32 logits, i32 tid2eid")
def router_hash(logits: Any, tid2eid: Any, tokens: Any, *, out: RouteOut, k: int, scale: float,
                normalise: bool = True, stream: Any = 0) -> RouteOut:
    """Hash layers: experts tid2eid[token] (token ids int32 (T,) on the device), weights as router.select."""
    return _launch(logits, None, tid2eid, tokens, out, k, scale, normalise, stream)


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def _shape(scale: str) -> tuple[int, int, int]:
    return (3, 8, 2) if scale == "tiny" else (1, 256, 6)     # (T, n_expert, k)


def _case_select(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_e, k = _shape(scale)
    logits = (3 * rng.standard_normal((n_tok, n_e))).astype(np.float32)
    logits[0, 1] = logits[0, 0]                       # a tie in p, broken by the lower id
    logits[-1, :3] = [25.0, -25.0, 19.5]              # softplus cut-offs
    bias = (0.1 * rng.standard_normal(n_e)).astype(np.float32)
    bias[1] = bias[0]
    probs = ops.router_probs(logits)
    sel = np.stack([ops.select_experts_topk(probs[t], bias, k) for t in range(n_tok)]).astype(np.int32)
    w = np.stack([ops.route_weights(probs[t][sel[t]], 1.5, True) for t in range(n_tok)])
    out = alloc_route(n_tok, k)
    return Case((cuda.to_device(logits), cuda.to_device(bias)), out, (sel, w), (True, CONTRACT),
                kwargs=dict(k=k, scale=1.5), info={"shape": (n_tok, n_e, k)})


def _case_hash(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference import ops

    n_tok, n_e, k = _shape(scale)
    n_vocab = 50 if scale == "tiny" else 129280
    table = np.stack([rng.choice(n_e, k, replace=False) for _ in range(n_vocab)]).astype(np.int32)
    tokens = rng.integers(0, n_vocab, n_tok).astype(np.int32)
    logits = (3 * rng.standard_normal((n_tok, n_e))).astype(np.float32)
    probs = ops.router_probs(logits)
    sel = table[tokens]
    w = np.stack([ops.route_weights(probs[t][sel[t]], 1.5, True) for t in range(n_tok)])
    out = alloc_route(n_tok, k)
    return Case((cuda.to_device(logits), cuda.to_device(table), cuda.to_device(tokens)), out, (sel, w),
                (True, CONTRACT), kwargs=dict(k=k, scale=1.5), info={"shape": (n_tok, n_e, k)})


OPS = [
    OpSpec("router.select", "router probabilities sqrt(softplus), biased top-k, normalised scaled weights",
           "(logits f32 (T, n_expert), bias f32 (n_expert,) | None, *, out: RouteOut, k, scale, normalise=True, "
           "stream)",
           "ops.router_probs + ops.select_experts_topk + ops.route_weights",
           1e-6, _case_select),   # selection exact; weights CONTRACT (one float64 evaluation, one rounding)
    OpSpec("router.hash", "hash routing: experts tid2eid[token], weights from the router probabilities",
           "(logits f32 (T, n_expert), tid2eid i32 (n_vocab, k), tokens i32 (T,), *, out: RouteOut, k, scale, "
           "normalise=True, stream)",
           "tid2eid[token] + ops.router_probs + ops.route_weights", 1e-6, _case_hash),
]
