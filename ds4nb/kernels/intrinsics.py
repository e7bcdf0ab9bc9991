"""Device intrinsics shared by every ds4nb kernel, in two worlds.

On a real GPU, ``dp4a`` and ``byte_perm`` are the one-instruction ``__dp4a``
and ``prmt.b32`` from the tiny CUDA C++ file ``intrinsics.cu`` (declared
with ``cuda.declare_device`` and linked by LTO, so they inline), warp shuffles are numba's ``shfl_xor_sync`` and the
integer reinterpretations are plain truncating casts.

Under ``NUMBA_ENABLE_CUDASIM=1`` the same names are bound to pure-Python
equivalents, so every kernel in ``ds4nb.kernels`` runs unchanged in the
simulator:

* ``dp4a`` does the four signed byte products in Python integers, ``byte_perm``
  picks bytes the way PTX ``prmt.b32`` does;
* ``shfl_xor`` exchanges values through a per-block table with a block
  barrier (the simulator has no warp shuffles).  Like a real full-mask
  shuffle it needs every live thread of the warp to make the same calls, and a
  partner lane that has exited is an error, not a silent stale value;
* the 32-bit reinterpretations mask explicitly (numba's ``int32(x)`` raises in
  the simulator when ``x`` does not fit, instead of truncating).

The simulator runs every CUDA thread as a Python thread and a block barrier
costs milliseconds, so the simulator twins are also written for speed (none
of this changes what runs on a GPU):

* ``shfl_xor``, ``warp_sum`` and ``warp_max`` exchange values through a
  per-block table with ONE barrier per call (each call has its own table,
  freed one call later); a group reduction combines the group's values in the
  butterfly order of the GPU shuffles, so float results are the GPU's, and a
  group of one lane returns at once (no barrier, as no shuffle on the GPU);
* ``dot8`` unpacks both words with ``struct`` (same wrapped int32 result);
* ``device`` returns the plain Python function when it does not use ``cuda``
  (numba's simulator swaps module globals on every device-function call);
* the scalar types ``float32 ... uint64`` exported here are the numpy types
  in the simulator (what numba's types return when called there, at a fifth
  of the cost) and numba's types on a GPU: kernels import them from here.

Kernels that choose a different launch geometry in the simulator (one lane per
row, fewer threads, fewer splits) test with ``SIMULATOR``.

Kernels must only use these helpers for bit reinterpretation (never
``numba.int32(x)`` on a value that may not fit), and write every float
constant and cast with the scalar types from here (``float32(x)``,
``float64(x)``) or numpy scalars: float64 is deliberate in device code (the
accumulators of docs/model.md's "one rounding per value" numerics) and must
never appear by accident in float32 arithmetic.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
import threading
from pathlib import Path

import numpy as np
from numba import config, cuda

#: True when numba runs kernels in its Python simulator.
SIMULATOR: bool = bool(config.ENABLE_CUDASIM)

#: Python's thread switch interval while simulating (``DS4NB_SIM_SWITCH_INTERVAL``, seconds; 0 keeps
#: Python's 5 ms).  numba's simulator runs a block's threads as Python threads and its block
#: manager busy-polls them, so every thread that wakes up from a barrier (or gets the GIL back
#: after the manager) waits up to one interval: 1 ms makes barrier-heavy kernels several times
#: faster and costs nothing measurable elsewhere.
SIM_SWITCH_INTERVAL = float(os.environ.get("DS4NB_SIM_SWITCH_INTERVAL", "0.001"))

if SIMULATOR:
    if SIM_SWITCH_INTERVAL > 0:
        sys.setswitchinterval(SIM_SWITCH_INTERVAL)
    # numba's scalar types called in the simulator are ``getattr(np, name)(value)``
    float32, float64, int32, int64, uint32, uint64 = (
        np.float32, np.float64, np.int32, np.int64, np.uint32, np.uint64)
else:
    from numba import float32, float64, int32, int64, uint32, uint64  # noqa: F401

#: The CUDA C++ file linked into kernels that call ``dp4a``.
CU_PATH = Path(__file__).with_name("intrinsics.cu")

FULL_MASK = 0xFFFFFFFF


def _uses_cuda(code) -> bool:
    """Whether a code object (or one nested in it) names the global ``cuda``."""
    if "cuda" in code.co_names:
        return True
    return any(_uses_cuda(c) for c in code.co_consts if hasattr(c, "co_names"))


def device(fn):
    """``cuda.jit(device=True)``, force-inlined on the GPU.

    In the simulator a function that does not use ``cuda`` (thread indices,
    barriers, shared arrays) is returned as is: numba's simulator would swap
    the module's globals on every call, which costs more than most helpers.
    """
    if SIMULATOR:
        return cuda.jit(device=True)(fn) if _uses_cuda(fn.__code__) else fn
    return cuda.jit(device=True, forceinline=True)(fn)


def jit_kernel(fn=None, *, launch_bounds=None):
    """``cuda.jit`` for kernels; GPU-only options (launch bounds) are dropped in the simulator."""

    def wrap(f):
        if SIMULATOR or launch_bounds is None:
            return cuda.jit(f)
        return cuda.jit(f, launch_bounds=launch_bounds)

    return wrap if fn is None else wrap(fn)


# ---------------------------------------------------------------------------
# Simulator twins
# ---------------------------------------------------------------------------


def _wrap_i32(v: int) -> int:
    return ((int(v) + 0x80000000) & 0xFFFFFFFF) - 0x80000000


_S4 = struct.Struct("<4b")


def _sim_dp4a(a, b, c):
    a0, a1, a2, a3 = _S4.unpack((int(a) & 0xFFFFFFFF).to_bytes(4, "little"))
    b0, b1, b2, b3 = _S4.unpack((int(b) & 0xFFFFFFFF).to_bytes(4, "little"))
    return ((int(c) + a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3 + 0x80000000) & 0xFFFFFFFF) - 0x80000000


def _sim_exchange(value):
    """Publish ``value`` and return (this round's table {thread id: value}, thread id) after ONE barrier.

    Round ``n`` is a thread's ``n``-th exchange; like real shuffles, every
    live thread of the block must make the same exchanges in the same order.
    A thread drops its entry of round ``n - 1`` after the barrier of round
    ``n``, when every thread has read that round (reads come before the next
    barrier), so no second barrier is needed.
    """
    t = threading.current_thread()
    n = t.__dict__.get("_ds4nb_round", 0)
    t._ds4nb_round = n + 1
    rounds = t._manager.__dict__.setdefault("_ds4nb_rounds", {})
    table = rounds.get(n)
    if table is None:
        table = rounds.setdefault(n, {})
    tid = t.thread_id
    table[tid] = value
    t.syncthreads()
    prev = rounds.get(n - 1)
    if prev is not None:
        prev.pop(tid, None)
        if not prev:
            rounds.pop(n - 1, None)
    return table, tid


def _sim_shfl_xor(value, lane_mask):
    table, tid = _sim_exchange(value)
    partner = (tid & ~31) | ((tid & 31) ^ int(lane_mask))
    try:
        return table[partner]
    except KeyError:
        raise RuntimeError(f"shfl_xor: partner lane {partner} of thread {tid} is not in the shuffle") from None


def _sim_shfl_idx(value, src_lane):
    table, tid = _sim_exchange(value)
    src = (tid & ~31) | (int(src_lane) & 31)
    try:
        return table[src]
    except KeyError:
        raise RuntimeError(f"shfl_idx: source lane {src} of thread {tid} is not in the shuffle") from None


def _sim_group(value, width, is_max, ascending=False):
    """``warp_sum`` / ``warp_max`` (``warp_sum_pairwise``: ``ascending``) over aligned groups of ``width``
    lanes: one exchange, then the GPU's xor-butterfly on the group's values (same offsets in the same order,
    same operand order, so the same float result)."""
    width = int(width)
    if width == 1:
        return value
    table, tid = _sim_exchange(value)
    g0 = tid - (tid & 31) % width
    try:
        vals = [table[g0 + j] for j in range(width)]
    except KeyError:
        raise RuntimeError(f"group reduction: a lane of thread {tid}'s group is not in it") from None
    offsets = []
    off = width >> 1
    while off > 0:
        offsets.append(off)
        off >>= 1
    for off in reversed(offsets) if ascending else offsets:
        if is_max:
            vals = [vals[j ^ off] if vals[j ^ off] > vals[j] else vals[j] for j in range(width)]
        else:
            vals = [vals[j] + vals[j ^ off] for j in range(width)]
    return vals[tid - g0]


_S8 = struct.Struct("<8b")
_M64 = 0xFFFFFFFFFFFFFFFF


def _sim_dot8(w, y, acc):
    a0, a1, a2, a3, a4, a5, a6, a7 = _S8.unpack((int(w) & _M64).to_bytes(8, "little"))
    b0, b1, b2, b3, b4, b5, b6, b7 = _S8.unpack((int(y) & _M64).to_bytes(8, "little"))
    s = int(acc) + a0 * b0 + a1 * b1 + a2 * b2 + a3 * b3 + a4 * b4 + a5 * b5 + a6 * b6 + a7 * b7
    return ((s + 0x80000000) & 0xFFFFFFFF) - 0x80000000   # two wrapping dp4a == one wrap (mod 2^32)


def _sim_byte_perm(x, y, s):
    b = ((int(x) & 0xFFFFFFFF) | ((int(y) & 0xFFFFFFFF) << 32)).to_bytes(8, "little")
    s = int(s)
    if not s & 0x8888:  # no sign-replicate selector: four byte picks
        return b[s & 7] | (b[(s >> 4) & 7] << 8) | (b[(s >> 8) & 7] << 16) | (b[(s >> 12) & 7] << 24)
    r = 0
    for i in (0, 4, 8, 12):
        nib = (s >> i) & 0xF
        byte = b[nib & 7]
        if nib & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0x00
        r |= byte << (2 * i)
    return r


def _sim_as_i32(x):
    return ((int(x) + 0x80000000) & 0xFFFFFFFF) - 0x80000000


def _sim_hi_i32(w):
    return (((int(w) >> 32) + 0x80000000) & 0xFFFFFFFF) - 0x80000000


def _sim_rint(x):
    return np.float32(np.rint(np.float32(x)))


# ---------------------------------------------------------------------------
# Bindings
# ---------------------------------------------------------------------------

if SIMULATOR:
    mma_s8_lo = mma_s8_hi = None  # warp-collective: kernels take their dp4a path in the simulator
    dp4a = _sim_dp4a
    byte_perm = _sim_byte_perm
    shfl_xor = _sim_shfl_xor
    shfl_idx = _sim_shfl_idx
    as_i32 = _sim_as_i32
    hi_i32 = _sim_hi_i32
    rint = _sim_rint
    dot8 = _sim_dot8

    def warp_sum(v, width):
        """Sum of ``v`` over aligned groups of ``width`` lanes (a power of two <= 32); every lane gets it."""
        return _sim_group(v, width, False)

    def warp_max(v, width):
        """Max of ``v`` over aligned groups of ``width`` lanes; every lane gets it."""
        return _sim_group(v, width, True)

    def warp_sum_pairwise(v, width):
        """Pairwise sum of ``v`` over aligned groups of ``width`` lanes in lane order; every lane gets it."""
        return _sim_group(v, width, False, True)
else:
    from numba.cuda import libdevice

    #: int32 c + dot(int8x4 a, int8x4 b); one IDP4A instruction.
    dp4a = cuda.declare_device("ds4nb_dp4a", "int32(int32, int32, int32)", link=[str(CU_PATH)], abi="c")

    #: PRMT: byte i = byte ``(s >> 4i) & 7`` of the 8 bytes ``y:x`` (its sign replicated if bit 4i+3 is set).
    byte_perm = cuda.declare_device("ds4nb_byte_perm", "uint32(uint32, uint32, uint32)", link=[str(CU_PATH)],
                                    abi="c")

    #: Integer tensor-core MMA 16x8x32 (sm_80+; see intrinsics.cu): a lane's D[g][2t], D[g][2t+1] packed in an
    #: int64 (low word first), and D[g+8][2t], D[g+8][2t+1].  Warp-collective; no simulator twin (kernels that
    #: use it have a dp4a path, taken in the simulator and on older GPUs).
    mma_s8_lo = cuda.declare_device("ds4nb_mma_s8_lo", "int64(int32, int32, int32, int32, int32, int32)",
                                    link=[str(CU_PATH)], abi="c")
    mma_s8_hi = cuda.declare_device("ds4nb_mma_s8_hi", "int64(int32, int32, int32, int32, int32, int32)",
                                    link=[str(CU_PATH)], abi="c")

    @device
    def shfl_xor(value, lane_mask):
        """Value of lane ``lane ^ lane_mask`` (all 32 lanes must call)."""
        return cuda.shfl_xor_sync(FULL_MASK, value, lane_mask)

    @device
    def shfl_idx(value, src_lane):
        """Value of lane ``src_lane`` (all 32 lanes must call)."""
        return cuda.shfl_sync(FULL_MASK, value, src_lane)

    @device
    def as_i32(x):
        """Low 32 bits of an integer, reinterpreted as int32."""
        return int32(x)

    @device
    def hi_i32(w):
        """High 32 bits of a uint64, reinterpreted as int32."""
        return int32(w >> uint64(32))

    @device
    def rint(x):
        """Round float32 to nearest, ties to even (C ``rintf``, numpy ``rint``)."""
        return libdevice.rintf(x)


    @device
    def warp_sum(v, width):
        """Sum of ``v`` over aligned groups of ``width`` lanes (a power of two <= 32); every lane gets it."""
        off = width >> 1
        while off > 0:
            v += shfl_xor(v, off)
            off >>= 1
        return v

    @device
    def warp_sum_pairwise(v, width):
        """Sum of ``v`` over aligned groups of ``width`` lanes, pairwise in lane order: ``((v0 + v1) + (v2 +
        v3)) + ...`` (xor offsets 1, 2, 4, ...; ``warp_sum`` pairs lanes ``width / 2`` apart first).  A float sum
        whose order a sequential walk over the lanes can reproduce (``moe_mma``); every lane gets it."""
        off = 1
        while off < width:
            v += shfl_xor(v, off)
            off <<= 1
        return v

    @device
    def warp_max(v, width):
        """Max of ``v`` over aligned groups of ``width`` lanes; every lane gets it."""
        off = width >> 1
        while off > 0:
            o = shfl_xor(v, off)
            if o > v:
                v = o
            off >>= 1
        return v

    @device
    def dot8(w, y, acc):
        """acc + dot of two int8x8 vectors packed in uint64 words (two dp4a)."""
        acc = dp4a(as_i32(w), as_i32(y), acc)
        return dp4a(hi_i32(w), hi_i32(y), acc)


@functools.cache
def has_int8_mma() -> bool:
    """Whether kernels can use ``mma_s8_lo/hi``: integer MMA m16n8k32 needs sm_80, and the simulator has no
    warp-collective MMA (kernels that use it take their dp4a path there)."""
    if SIMULATOR:
        return False
    return tuple(cuda.get_current_device().compute_capability) >= (8, 0)


__all__ = [
    "CU_PATH",
    "SIMULATOR",
    "as_i32",
    "device",
    "float32",
    "float64",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "dot8",
    "byte_perm",
    "dp4a",
    "mma_s8_hi",
    "mma_s8_lo",
    "has_int8_mma",
    "hi_i32",
    "jit_kernel",
    "rint",
    "shfl_idx",
    "shfl_xor",
    "warp_max",
    "warp_sum",
    "warp_sum_pairwise",
]
