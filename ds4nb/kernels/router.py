"""The MoE router on the device (docs/model.md step 16), after the F16 ``ffn_gate_inp`` matvec.

``router.select``: for each token (one block, one thread per expert),
``p = sqrt(softplus(logit))`` (softplus in float64 with the reference's
+-20 cut-offs, rounded once, like the oracle), then either

* top-k of ``p + bias`` (``bias`` optional), best first, ties to the lower
  expert id: ``k`` rounds of a block-wide max over 64-bit keys
  ``(order-preserving float bits << 31) | (2^31 - 1 - expert)``, which are
  distinct, so the max is unique; the winner drops out of the next round; or
* hash routing: the ``k`` experts of ``tid2eid[token]`` (token ids read on
  the device, e.g. straight from the sampler's output);

and the weights ``p[e_i] / max(sum_i p[e_i], 6.1e-5) * scale`` (sum left to
right over the selected slots; without ``normalise`` only the scale).

Outputs: ``selected`` int32 (T, k), ``weights`` f32 (T, k).  Exact against
the twin except that the weights' float32 division may differ by an ulp.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.f16_matvec import group_max
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, int32, int64
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, implementation

_F0 = np.float32(0.0)
_D20 = np.float64(20.0)
ROUTE_SUM_FLOOR = np.float32(6.103515625e-5)
_I0 = np.int64(0)
_I31 = np.int64(31)
_ILO = np.int64(0x7FFFFFFF)
_ISIGN = np.int64(0x80000000)
_IMASK = np.int64(0xFFFFFFFF)
_IEXP = np.int64(0x7F800000)
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
else:
    from numba.cuda import libdevice

    @device
    def f32_bits(x):
        """The IEEE bits of a float32 as a non-negative int64."""
        return int64(libdevice.float_as_int(x)) & _IMASK


@device
def argmax_key(v, i):
    """Distinct int64 key: larger float first, then lower index; non-finite -> 0 (never best)."""
    u = f32_bits(v)
    if (u & _IEXP) == _IEXP:
        return _I0
    if u == _ISIGN:
        u = _I0                  # -0.0 ties with +0.0: the lower index wins
    o = (~u & _IMASK) if (u & _ISIGN) != _I0 else (u | _ISIGN)
    return (o << _I31) | (_ILO - int64(i))


@device
def softplus64(x):
    """log(1 + exp(x)) in float64 with the reference's cut-offs at +-20 (ops.softplus)."""
    d = float64(x)
    if d > _D20:
        return d
    if d < -_D20:
        return math.exp(d)
    return math.log1p(math.exp(d))


@device
def _expert_prob(logits, t, n_expert, probs, e):
    p = float32(softplus64(logits[t * n_expert + e]))
    p = math.sqrt(p)
    probs[e] = p
    return p


@device
def _expert_key(p, bias, has_bias, e):
    s = p + bias[e] if has_bias else p
    return argmax_key(s, e)


@cuda.jit
def _router_kernel(logits, n_expert, bias, has_bias, k, scale, normalise, hash_mode, table, tokens,
                   sel_out, w_out):
    t = cuda.blockIdx.x
    e = cuda.threadIdx.x
    nt = cuda.blockDim.x
    lane = e % LANES
    valid = e < n_expert
    probs = cuda.shared.array(MAX_EXPERTS, float32)
    red = cuda.shared.array(32, int64)
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
        key = _I0
        if valid:
            key = _expert_key(p, bias, has_bias, e)
        keys = cuda.local.array(EXPERTS_PER_THREAD, int64)   # the simulator's further experts' keys
        if EXPERTS_PER_THREAD > 1:
            for j in range(1, EXPERTS_PER_THREAD):
                keys[j] = _I0
                if e + j * nt < n_expert:
                    keys[j] = _expert_key(probs[e + j * nt], bias, has_bias, e + j * nt)
        for r in range(k):
            best = key
            if EXPERTS_PER_THREAD > 1:
                for j in range(1, EXPERTS_PER_THREAD):
                    best = max(best, keys[j])
            m = group_max(best, LANES)
            if lane == 0:
                red[e // LANES] = m
            cuda.syncthreads()
            m = red[lane] if lane < nt // LANES else _I0
            m = group_max(m, LANES)
            win = int32(_ILO - (m & _ILO))
            if e == 0:
                sel[r] = win
            if e == win:
                key = _I0
            if EXPERTS_PER_THREAD > 1:
                for j in range(1, EXPERTS_PER_THREAD):
                    if e + j * nt == win:
                        keys[j] = _I0
            cuda.syncthreads()          # red is rewritten next round
    cuda.syncthreads()
    if e == 0:
        tot = _F0
        for i in range(k):
            tot += probs[sel[i]]
        tot = max(tot, ROUTE_SUM_FLOOR)
        for i in range(k):
            w = probs[sel[i]]
            if normalise:
                w = w / tot
            w_out[t * k + i] = w * scale
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
    _router_kernel[n_tok, nt, stream](
        L.flat(logits), n_expert, L.placeholder(np.float32) if bias is None else L.flat(bias), int(bias is not None),
        int(k), np.float32(scale), int(bool(normalise)), int(hashed),
        L.flat(tid2eid) if hashed else L.placeholder(np.int32), L.flat(tokens) if hashed else L.placeholder(np.int32),
        L.flat(out.selected), L.flat(out.weights))
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
    return Case((cuda.to_device(logits), cuda.to_device(bias)), out, (sel, w), (True, False),
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
                (True, False), kwargs=dict(k=k, scale=1.5), info={"shape": (n_tok, n_e, k)})


OPS = [
    OpSpec("router.select", "router probabilities sqrt(softplus), biased top-k, normalised scaled weights",
           "(logits f32 (T, n_expert), bias f32 (n_expert,) | None, *, out: RouteOut, k, scale, normalise=True, "
           "stream)",
           "ops.router_probs + ops.select_experts_topk + ops.route_weights",
           1e-6, _case_select),   # selection exact; weights same float32 ops
    OpSpec("router.hash", "hash routing: experts tid2eid[token], weights from the router probabilities",
           "(logits f32 (T, n_expert), tid2eid i32 (n_vocab, k), tokens i32 (T,), *, out: RouteOut, k, scale, "
           "normalise=True, stream)",
           "tid2eid[token] + ops.router_probs + ops.route_weights", 1e-6, _case_hash),
]
