"""Elementwise glue of the decode and prefill steps.

HC expansion, the dense SwiGLU, an axis swap (prefill's grouped
output projection) and the per-token sum of routed expert slots (prefill).
Each is one thread per output element over a flat index (grid-stride), so the
launch geometry is the same for any shape; they move a few KiB per token and
exist so a decode step never leaves the device.  The simulator, which pays for
every thread, launches blocks of 8 threads that stride over ~128 elements each.

Numerics (docs/model.md, "Numerics: one rounding per value"): ``ffn.swiglu``
evaluates ``silu(min(g, c)) * clip(u, -c, c)`` in float64 (sigmoid through a
float64 ``exp``) and rounds once; ``moe.slot_sum`` sums its float32 slots in
float64 and rounds once; the copies are exact.  (Step 19's routed + shared sum
is formed in ``hc.post``.)  Against the twins: bit-identical but for
rare (~1e-7 per value) one-ulp differences.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import SIMULATOR, float32, float64, wait_prior_grid
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

THREADS = 8 if SIMULATOR else 256
_PER_THREAD = 128 if SIMULATOR else 1   # elements a thread strides over (at least)
_CLAMP_OFF = np.float32(1e-6)  # docs/model.md step 17: no clamp when c <= 1e-6
_D1 = np.float64(1.0)


def _blocks(n: int) -> int:
    return max(1, min(L.cdiv(n, THREADS * _PER_THREAD), 4096))


@cuda.jit
def _expand_kernel(x, n_tok, n_hc, n_embd, out):
    # out[t, h, i] = x[t, i]: every HC stream starts as the token's embedding (step 1)
    wait_prior_grid()
    total = n_tok * n_hc * n_embd
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < total:
        t = i // (n_hc * n_embd)
        out[i] = x[t * n_embd + i % n_embd]
        i += stride


@implementation("hc.expand", "elementwise", layout="f32")
def hc_expand(x: Any, *, out: Any, n_hc: int, stream: Any = 0) -> Any:
    """x (T, n_embd) -> streams (T, n_hc, n_embd), each a copy of x (docs/model.md step 1)."""
    n_embd = tuple(x.shape)[-1]
    n_tok = x.size // n_embd
    L.launch(_expand_kernel, _blocks(out.size), THREADS, stream, L.flat(x), n_tok, n_hc, n_embd, L.flat(out))
    return out


@cuda.jit
def _swiglu_kernel(g, u, n, c, out):
    # mid = silu(min(g, c)) * clamp(u, -c, c) in float64, rounded once (like ops.swiglu_clamped)
    wait_prior_grid()
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    cd = float64(c)
    while i < n:
        a = float64(g[i])
        b = float64(u[i])
        if c > _CLAMP_OFF:
            a = min(a, cd)
            b = min(max(b, -cd), cd)
        out[i] = float32(a / (_D1 + math.exp(-a)) * b)
        i += stride


@implementation("ffn.swiglu", "elementwise", layout="f32")
def swiglu(gate: Any, up: Any, clamp: float, *, out: Any, stream: Any = 0) -> Any:
    """Clamped SwiGLU of the shared expert (docs/model.md step 18): silu(min(g, c)) * clamp(u, -c, c)."""
    L.launch(_swiglu_kernel, _blocks(gate.size), THREADS, stream, L.flat(gate), L.flat(up), gate.size, np.float32(clamp),
                                                         L.flat(out))
    return out


@cuda.jit
def _swap01_kernel(x, a, b, c, out):
    # out[j, i, k] = x[i, j, k] for x (a, b, c)
    wait_prior_grid()
    total = a * b * c
    n = cuda.grid(1)
    stride = cuda.gridsize(1)
    while n < total:
        i = n // (b * c)
        j = (n // c) % b
        k = n % c
        out[(j * a + i) * c + k] = x[n]
        n += stride


@implementation("copy.swap01", "elementwise", layout="f32")
def swap01(x: Any, a: int, b: int, c: int, *, out: Any, stream: Any = 0) -> Any:
    """x (a, b, c) -> out (b, a, c): regroups prefill heads by output group (docs/model.md step 13)."""
    L.launch(_swap01_kernel, _blocks(a * b * c), THREADS, stream, L.flat(x), a, b, c, L.flat(out))
    return out


@cuda.jit
def _slot_sum_kernel(x, n_tok, n_slot, n, out):
    # out[t, i] = sum over slots s of x[t, s, i], in float64 (slot order), rounded once
    wait_prior_grid()
    total = n_tok * n
    m = cuda.grid(1)
    stride = cuda.gridsize(1)
    while m < total:
        t = m // n
        i = m % n
        acc = float64(x[(t * n_slot) * n + i])
        for s in range(1, n_slot):
            acc += float64(x[(t * n_slot + s) * n + i])
        out[m] = float32(acc)
        m += stride


@implementation("moe.slot_sum", "elementwise", layout="f32")
def slot_sum(x: Any, n_tok: int, n_slot: int, *, out: Any, stream: Any = 0) -> Any:
    """x (T, n_slot, n) -> out (T, n): routed expert outputs summed in float64, rounded once (step 17)."""
    n = x.size // (n_tok * n_slot)
    L.launch(_slot_sum_kernel, _blocks(n_tok * n), THREADS, stream, L.flat(x), n_tok, n_slot, n, L.flat(out))
    return out


# ---------------------------------------------------------------------------
# parity cases


def _case_expand(rng: np.random.Generator, scale: str) -> Case:
    n_tok, n_hc, n_embd = (2, 4, 64) if scale == "tiny" else (8, 4, 4096)
    x = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    ref = np.repeat(x[:, None, :], n_hc, axis=1)
    out = L.device_array(ref.size, np.float32)
    return Case((cuda.to_device(x),), out, (ref.reshape(-1).astype(np.float64),), (False,),
                kwargs={"n_hc": n_hc}, info={"shape": ref.shape})


def swiglu_ref(g: np.ndarray, u: np.ndarray, clamp: float) -> np.ndarray:
    """float32 ``silu(min(g, c)) * clip(u, -c, c)`` evaluated in float64 from float32 inputs, rounded once
    (docs/model.md step 18; ``reference.ops.swiglu_clamped``); no clamp when ``c <= 1e-6``."""
    g = np.asarray(g, dtype=np.float32).astype(np.float64)
    u = np.asarray(u, dtype=np.float32).astype(np.float64)
    c = float(np.float32(clamp))
    if c > float(_CLAMP_OFF):
        g = np.minimum(g, c)
        u = np.clip(u, -c, c)
    with np.errstate(over="ignore"):
        return (g / (1.0 + np.exp(-g)) * u).astype(np.float32)


def _case_swiglu(rng: np.random.Generator, scale: str) -> Case:
    n = 300 if scale == "tiny" else 2048 * 8
    g = (rng.standard_normal(n) * 6).astype(np.float32)
    u = (rng.standard_normal(n) * 6).astype(np.float32)
    clamp = float(rng.choice([10.0, 3.0, 0.0]))
    ref = swiglu_ref(g, u, clamp)
    out = L.device_array(n, np.float32)
    return Case((cuda.to_device(g), cuda.to_device(u), clamp), out, (ref,), (CONTRACT,), info={"clamp": clamp})


def _case_swap01(rng: np.random.Generator, scale: str) -> Case:
    a, b, c = (3, 2, 64) if scale == "tiny" else (64, 8, 4096)
    x = rng.standard_normal((a, b, c)).astype(np.float32)
    ref = np.swapaxes(x, 0, 1)
    out = L.device_array(x.size, np.float32)
    return Case((cuda.to_device(x.reshape(-1)), a, b, c), out, (ref.reshape(-1).astype(np.float64),), (False,))


def _case_slot_sum(rng: np.random.Generator, scale: str) -> Case:
    t, s, n = (2, 3, 100) if scale == "tiny" else (64, 6, 4096)
    x = rng.standard_normal((t, s, n)).astype(np.float32)
    ref = x.astype(np.float64).sum(axis=1).astype(np.float32)   # float64 sum, rounded once
    out = L.device_array(t * n, np.float32)
    return Case((cuda.to_device(x.reshape(-1)), t, s), out, (ref.reshape(-1),), (CONTRACT,))


OPS = [
    OpSpec("hc.expand", "embedding row copied into every HC stream",
           "(x f32 (T, n_embd), *, out f32 (T, n_hc, n_embd), n_hc, stream)", "numpy.repeat", 0.0, _case_expand),
    OpSpec("ffn.swiglu", "clamped SwiGLU of the shared expert",
           "(gate f32 (n,), up f32 (n,), clamp, *, out f32 (n,), stream)",
           "silu(min(g, c)) * clip(u, -c, c) in float64, rounded once (ds4nb.reference.ops.swiglu_clamped)",
           1e-6, _case_swiglu),  # checked under parity.CONTRACT
    OpSpec("copy.swap01", "swap the first two axes of a 3-D array",
           "(x f32 (a, b, c), a, b, c, *, out f32 (b, a, c), stream)", "numpy.swapaxes", 0.0, _case_swap01),
    OpSpec("moe.slot_sum", "per-token sum of routed expert slots, in order",
           "(x f32 (T, n_slot, n), n_tok, n_slot, *, out f32 (T, n), stream)",
           "numpy float64 sum over the slots, rounded once (checked under parity.CONTRACT)", 0.0,
           _case_slot_sum),
]
