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
* ``shfl_xor`` exchanges values through a per-block table with two block
  barriers (the simulator has no warp shuffles).  Like a real full-mask
  shuffle it needs every live thread of the warp to make the same calls, and a
  partner lane that has exited is an error, not a silent stale value;
* the 32-bit reinterpretations mask explicitly (numba's ``int32(x)`` raises in
  the simulator when ``x`` does not fit, instead of truncating).

Kernels must only use these helpers for bit reinterpretation (never
``numba.int32(x)`` on a value that may not fit) and only ``float32`` constants
from this module or numpy scalars, so that no float64 sneaks into device code.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from numba import config, cuda, int32, uint64

#: True when numba runs kernels in its Python simulator.
SIMULATOR: bool = bool(config.ENABLE_CUDASIM)

#: The CUDA C++ file linked into kernels that call ``dp4a``.
CU_PATH = Path(__file__).with_name("intrinsics.cu")

FULL_MASK = 0xFFFFFFFF


def device(fn):
    """``cuda.jit(device=True)``, force-inlined on the GPU (the simulator has no inline option)."""
    if SIMULATOR:
        return cuda.jit(device=True)(fn)
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


def _sim_dp4a(a, b, c):
    a = int(a) & 0xFFFFFFFF
    b = int(b) & 0xFFFFFFFF
    s = int(c)
    for shift in (0, 8, 16, 24):
        x = (a >> shift) & 0xFF
        y = (b >> shift) & 0xFF
        s += (x - ((x & 0x80) << 1)) * (y - ((y & 0x80) << 1))
    return _wrap_i32(s)


def _sim_shfl_xor(value, lane_mask):
    t = threading.current_thread()
    table = t._manager.__dict__.setdefault("_ds4nb_shfl", {})
    tid = t.thread_id
    table[tid] = value
    t.syncthreads()
    partner = (tid & ~31) | ((tid & 31) ^ int(lane_mask))
    try:
        v = table[partner]
    except KeyError:
        raise RuntimeError(f"shfl_xor: partner lane {partner} of thread {tid} is not in the shuffle") from None
    t.syncthreads()
    del table[tid]
    return v


def _sim_byte_perm(x, y, s):
    b = (int(x) & 0xFFFFFFFF) | ((int(y) & 0xFFFFFFFF) << 32)
    s = int(s)
    r = 0
    for i in range(4):
        nib = (s >> (4 * i)) & 0xF
        byte = (b >> (8 * (nib & 7))) & 0xFF
        if nib & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0x00
        r |= byte << (8 * i)
    return r


def _sim_as_i32(x):
    return _wrap_i32(int(x))


def _sim_hi_i32(w):
    return _wrap_i32(int(w) >> 32)


def _sim_rint(x):
    return np.float32(np.rint(np.float32(x)))


# ---------------------------------------------------------------------------
# Bindings
# ---------------------------------------------------------------------------

if SIMULATOR:
    dp4a = _sim_dp4a
    byte_perm = _sim_byte_perm
    shfl_xor = _sim_shfl_xor
    as_i32 = _sim_as_i32
    hi_i32 = _sim_hi_i32
    rint = _sim_rint
else:
    from numba.cuda import libdevice

    #: int32 c + dot(int8x4 a, int8x4 b); one IDP4A instruction.
    dp4a = cuda.declare_device("ds4nb_dp4a", "int32(int32, int32, int32)", link=[str(CU_PATH)], abi="c")

    #: PRMT: byte i = byte ``(s >> 4i) & 7`` of the 8 bytes ``y:x`` (its sign replicated if bit 4i+3 is set).
    byte_perm = cuda.declare_device("ds4nb_byte_perm", "uint32(uint32, uint32, uint32)", link=[str(CU_PATH)],
                                    abi="c")

    @device
    def shfl_xor(value, lane_mask):
        """Value of lane ``lane ^ lane_mask`` (all 32 lanes must call)."""
        return cuda.shfl_xor_sync(FULL_MASK, value, lane_mask)

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


__all__ = [
    "CU_PATH",
    "SIMULATOR",
    "as_i32",
    "device",
    "dot8",
    "byte_perm",
    "dp4a",
    "hi_i32",
    "jit_kernel",
    "rint",
    "shfl_xor",
    "warp_max",
    "warp_sum",
]
