"""Device intrinsics shared by every ds4nb kernel, in two worlds.

On a real GPU, ``dp4a`` and ``byte_perm`` are the one-instruction ``__dp4a``
and ``prmt.b32`` wrappers of the tiny CUDA C++ file ``intrinsics.cu``
(declared with ``cuda.declare_device`` and linked by LTO, so they inline); the
MMAs (int8 and float64), whose results are several values, are numba
intrinsics emitting one inline-asm ``mma.sync`` each; ``load_f32x4`` /
``store_f32x4`` move four float32 values as one 16-byte access.  Warp
shuffles are numba's ``shfl_xor_sync`` and the integer reinterpretations are
plain truncating casts.

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


def _sim_load_f32x4(a, i):
    return a[i], a[i + 1], a[i + 2], a[i + 3]


def _sim_store_f32x4(a, i, v0, v1, v2, v3):
    a[i], a[i + 1], a[i + 2], a[i + 3] = v0, v1, v2, v3


def _sim_half_bits(u):
    return np.float64(np.array(int(u) & 0xFFFF, np.uint16).view(np.float16))


def _sim_warp_exchange(value, name):
    """Every lane's ``value`` of this thread's warp (a list of 32) after one exchange, and the thread id."""
    table, tid = _sim_exchange(value)
    w0 = tid & ~31
    try:
        return [table[w0 + j] for j in range(32)], tid
    except KeyError:
        raise RuntimeError(f"{name}: a lane of thread {tid}'s warp is not in it") from None


def _sim_mma_f64(a, b, c0, c1):
    """The warp's m8n8k4 float64 MMA from every lane's (a, b) after one exchange: this lane's ``D[g][2t]``,
    ``D[g][2t+1]`` (``g = lane / 4``, ``t = lane % 4``; A[g][t] and B[t][g] are lane ``4 g + t``'s)."""
    ops, tid = _sim_warp_exchange((np.float64(a), np.float64(b)), "mma_f64")
    g, t = (tid & 31) >> 2, tid & 3
    d0, d1 = np.float64(c0), np.float64(c1)
    for k in range(4):
        d0 += ops[4 * g + k][0] * ops[4 * (2 * t) + k][1]
        d1 += ops[4 * g + k][0] * ops[4 * (2 * t + 1) + k][1]
    return d0, d1


def _sim_mma_f64_k16(a, b, c):
    """The warp's m16n8k16 float64 MMA (``mma_f64_k16``'s fragment layout) after one exchange: this lane's
    4 values of D = A B + C."""
    ops, tid = _sim_warp_exchange((tuple(np.float64(v) for v in a), tuple(np.float64(v) for v in b)), "mma_f64_k16")
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for lane, (fa, fb) in enumerate(ops):
        gl, tl = lane >> 2, lane & 3
        for i in range(8):
            A[gl + 8 * (i & 1), tl + 4 * (i >> 1)] = fa[i]
        for i in range(4):
            B[tl + 4 * i, gl] = fb[i]
    g, t = (tid & 31) >> 2, tid & 3
    out = []
    for i in range(4):
        r, n = g + 8 * (i >> 1), 2 * t + (i & 1)
        d = np.float64(c[i])
        for k in range(16):
            d += A[r, k] * B[k, n]
        out.append(d)
    return tuple(out)


def _sim_mma_s8(a, b, c):
    """The warp's m16n8k32 int8 MMA (``mma_s8``'s fragment layout) from every lane's fragments after one
    exchange: this lane's ``(D[g][2t], D[g][2t+1], D[g+8][2t], D[g+8][2t+1])`` of ``D = A B + C`` (int32,
    wrapping as the tensor cores do).  Lane ``4 g + t`` holds A's rows g (a[0], a[2]) and g + 8 (a[1], a[3]) at k
    quads t (a[0], a[1]) and t + 4 (a[2], a[3]), and B's column g at k quads t (b[0]) and t + 4 (b[1]); a quad is
    4 int8, k ascending from the low byte."""
    def i8x8(lo, hi):   # quads t and t + 4 as 8 int8
        return _S8.unpack(((int(lo) & 0xFFFFFFFF) | ((int(hi) & 0xFFFFFFFF) << 32)).to_bytes(8, "little"))

    ops, tid = _sim_warp_exchange((i8x8(a[0], a[2]), i8x8(a[1], a[3]), i8x8(b[0], b[1])), "mma_s8")
    g, t = (tid & 31) >> 2, tid & 3
    out = []
    for i in range(4):                                  # D[g + 8 (i // 2)][2t + i % 2]
        r, col = i >> 1, 2 * t + (i & 1)
        d = int(c[i])
        for j in range(4):                              # lanes 4 g + j hold the A row's k quads j, j + 4
            d += sum(x * y for x, y in zip(ops[4 * g + j][r], ops[4 * col + j][2]))
        out.append(_wrap_i32(d))
    return tuple(out)


# ---------------------------------------------------------------------------
# Bindings
# ---------------------------------------------------------------------------

if SIMULATOR:
    mma_s8 = _sim_mma_s8          # warp-collective, emulated with one exchange a call; launchers keep
    #                               their dp4a path here (has_int8_mma), tests ask for the MMA path
    mma_f64 = _sim_mma_f64        # warp-collective too, emulated with one exchange (tests ask for it)
    mma_f64_k16 = _sim_mma_f64_k16
    dp4a = _sim_dp4a
    byte_perm = _sim_byte_perm
    shfl_xor = _sim_shfl_xor
    shfl_idx = _sim_shfl_idx
    as_i32 = _sim_as_i32
    hi_i32 = _sim_hi_i32
    rint = _sim_rint
    dot8 = _sim_dot8
    half_bits = _sim_half_bits
    load_f32x4 = _sim_load_f32x4
    store_f32x4 = _sim_store_f32x4

    def warp_sum(v, width):
        """Sum of ``v`` over aligned groups of ``width`` lanes (a power of two <= 32); every lane gets it."""
        return _sim_group(v, width, False)

    def warp_max(v, width):
        """Max of ``v`` over aligned groups of ``width`` lanes; every lane gets it."""
        return _sim_group(v, width, True)

    def warp_sum_pairwise(v, width):
        """Pairwise sum of ``v`` over aligned groups of ``width`` lanes in lane order; every lane gets it."""
        return _sim_group(v, width, False, True)

    def wait_prior_grid():
        """No-op: the simulator runs launches one after another."""

else:
    from numba.cuda import libdevice

    #: int32 c + dot(int8x4 a, int8x4 b); one IDP4A instruction.
    dp4a = cuda.declare_device("ds4nb_dp4a", "int32(int32, int32, int32)", link=[str(CU_PATH)], abi="c")

    #: PRMT: byte i = byte ``(s >> 4i) & 7`` of the 8 bytes ``y:x`` (its sign replicated if bit 4i+3 is set).
    byte_perm = cuda.declare_device("ds4nb_byte_perm", "uint32(uint32, uint32, uint32)", link=[str(CU_PATH)],
                                    abi="c")

    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    @intrinsic
    def mma_f64(typingctx, a, b, c0, c1):
        """Float64 tensor-core MMA m8n8k4 (sm_80+): this lane's ``(D[g][2t], D[g][2t+1])`` of ``D = A B + C``,
        where A[g][t] = lane ``4 g + t``'s ``a`` and B[t][g] its ``b`` (``g = lane / 4``, ``t = lane % 4``).
        One inline-asm ``mma.sync`` with both halves of D as outputs; every product and sum an IEEE float64
        operation (a float64 dot product in some order: the contract of docs/model.md).  Warp-collective."""
        sig = types.UniTuple(types.float64, 2)(types.float64, types.float64, types.float64, types.float64)

        def codegen(context, builder, signature, args):
            f64 = ir.DoubleType()
            fnty = ir.FunctionType(ir.LiteralStructType([f64, f64]), [f64] * 4)
            asm = ir.InlineAsm(fnty, "mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 "
                                     "{$0, $1}, {$2}, {$3}, {$4, $5};", "=d,=d,d,d,d,d")
            d = builder.call(asm, [context.cast(builder, v, t, types.float64)
                                   for v, t in zip(args, signature.args)])
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_value(d, 0), builder.extract_value(d, 1)])

        return sig, codegen

    @intrinsic
    def half_bits(typingctx, u):
        """The F16 value whose bits are the low 16 bits of the integer ``u``, widened to float64 (exact):
        a weight word of several F16 values loaded at once and taken apart by shifts."""
        if not isinstance(u, types.Integer):
            return None
        sig = types.float64(u)

        def codegen(context, builder, signature, args):
            h = builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType())
            return builder.fpext(h, ir.DoubleType())

        return sig, codegen

    def _f32x4_pointer(context, builder, aryty, ary, i):
        """``&a[i]`` of a float32 array as a pointer to 4 floats (16-byte aligned: the caller's promise)."""
        data = context.make_array(aryty)(context, builder, ary).data
        ptr = builder.gep(data, [context.cast(builder, i[1], i[0], types.intp)])
        return builder.bitcast(ptr, ir.VectorType(ir.FloatType(), 4).as_pointer())

    @intrinsic
    def load_f32x4(typingctx, a, i):
        """``(a[i], a[i + 1], a[i + 2], a[i + 3])`` of a float32 array in one 16-byte load: ``&a[i]`` must be
        16-byte aligned (launchers check the array and keep ``i % 4 == 0``)."""
        if not (isinstance(a, types.Array) and a.dtype == types.float32 and isinstance(i, types.Integer)):
            return None
        sig = types.UniTuple(types.float32, 4)(a, i)

        def codegen(context, builder, signature, args):
            vec = builder.load(_f32x4_pointer(context, builder, signature.args[0], args[0],
                                              (signature.args[1], args[1])), align=16)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_element(vec, ir.IntType(32)(k)) for k in range(4)])

        return sig, codegen

    @intrinsic
    def store_f32x4(typingctx, a, i, v0, v1, v2, v3):
        """``a[i:i + 4] = v0, v1, v2, v3`` (float32) in one 16-byte store, ``&a[i]`` 16-byte aligned."""
        if not (isinstance(a, types.Array) and a.dtype == types.float32 and isinstance(i, types.Integer)):
            return None
        sig = types.void(a, i, v0, v1, v2, v3)

        def codegen(context, builder, signature, args):
            vec = ir.Constant(ir.VectorType(ir.FloatType(), 4), None)
            for k in range(4):
                v = context.cast(builder, args[2 + k], signature.args[2 + k], types.float32)
                vec = builder.insert_element(vec, v, ir.IntType(32)(k))
            builder.store(vec, _f32x4_pointer(context, builder, signature.args[0], args[0],
                                              (signature.args[1], args[1])), align=16)
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def mma_s8(typingctx, a, b, c):
        """Integer tensor-core MMA m16n8k32 (sm_80+): ``D = A (16 x 32 int8) B (32 x 8 int8) + C`` in int32.
        With ``g = lane / 4``, ``t = lane % 4``, a lane holds ``a`` = 4 int32 of 4 int8 each: A's row g at k
        4t..4t+3 (a[0]), row g + 8 there (a[1]), the same rows at k + 16 (a[2], a[3]); ``b`` = 2 int32: B's
        column g at k 4t.. (b[0]) and k + 16 (b[1]); ``c`` = C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1], and
        gets D in ``c``'s layout (tuples).  One inline-asm ``mma.sync``.  Warp-collective; its simulator twin
        costs a block barrier a call, so launchers take their dp4a path there unless asked (``has_int8_mma``)."""
        i32 = types.int32
        sig = types.UniTuple(i32, 4)(types.UniTuple(i32, 4), types.UniTuple(i32, 2), types.UniTuple(i32, 4))

        def codegen(context, builder, signature, args):
            r = ir.IntType(32)
            vals = [builder.extract_value(args[0], i) for i in range(4)]
            vals += [builder.extract_value(args[1], i) for i in range(2)]
            vals += [builder.extract_value(args[2], i) for i in range(4)]
            fnty = ir.FunctionType(ir.LiteralStructType([r] * 4), [r] * 10)
            asm = ir.InlineAsm(fnty, "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {$0, $1, $2, $3}, "
                                     "{$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};",
                               ",".join(["=r"] * 4 + ["r"] * 10))
            res = builder.call(asm, vals)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_value(res, i) for i in range(4)])

        return sig, codegen

    @intrinsic
    def mma_f64_k16(typingctx, a, b, c):
        """Float64 tensor-core MMA m16n8k16 (sm_90+; Hopper's FP64 rate, 8x the work of ``mma_f64``'s
        m8n8k4 in one instruction): ``D = A (16 x 16) B (16 x 8) + C``.  With ``g = lane / 4``, ``t = lane %
        4``, a lane holds ``a`` = 8 values A[g + 8 (i % 2)][t + 4 (i // 2)], ``b`` = 4 values B[t + 4 i][g],
        ``c`` = 4 values C[g + 8 (i // 2)][2 t + i % 2], and gets D in ``c``'s layout (tuples).  IEEE float64
        products and sums (a float64 dot in some order: docs/model.md's contract).  Warp-collective."""
        f64 = types.float64
        sig = types.UniTuple(f64, 4)(types.UniTuple(f64, 8), types.UniTuple(f64, 4), types.UniTuple(f64, 4))

        def codegen(context, builder, signature, args):
            d = ir.DoubleType()
            vals = [builder.extract_value(args[0], i) for i in range(8)]
            vals += [builder.extract_value(args[1], i) for i in range(4)]
            vals += [builder.extract_value(args[2], i) for i in range(4)]
            fnty = ir.FunctionType(ir.LiteralStructType([d] * 4), [d] * 16)
            asm = ir.InlineAsm(fnty, "mma.sync.aligned.m16n8k16.row.col.f64.f64.f64.f64 {$0, $1, $2, $3}, "
                                     "{$4, $5, $6, $7, $8, $9, $10, $11}, {$12, $13, $14, $15}, "
                                     "{$16, $17, $18, $19};", ",".join(["=d"] * 4 + ["d"] * 16))
            res = builder.call(asm, vals)
            return context.make_tuple(builder, signature.return_type,
                                      [builder.extract_value(res, i) for i in range(4)])

        return sig, codegen

    #: Programmatic dependent launch (``_launch.Launch.early``), a kernel's first statement: wait until the
    #: grid this launch follows has finished and its writes are visible, then let the next grid (if launched
    #: early) start its blocks.  In a kernel launched normally, or below sm_90 (where it compiles to nothing),
    #: it returns at once.
    wait_prior_grid = cuda.declare_device("ds4nb_wait_prior_grid", "int32()", link=[str(CU_PATH)], abi="c")

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
def has_f64_mma() -> bool:
    """Whether launchers should use the FP64 tensor-core kernels (``gemm_f64``, ``attention_mma``): sm_90+,
    whose m16n8k16 (``mma_f64_k16``) the GEMM needs; earlier GPUs keep the scalar float64 kernels (sm_80's
    FP64 MMA is m8n8k4 only, and consumer GPUs run float64 at 1/64 rate).  False in the simulator, where an
    MMA costs a block barrier: launchers take their scalar path there, and tests run the MMA kernels through
    the simulator's twins by asking for them explicitly."""
    if SIMULATOR:
        return False
    return tuple(cuda.get_current_device().compute_capability) >= (9, 0)


@functools.cache
def has_int8_mma() -> bool:
    """Whether launchers should use ``mma_s8``: integer MMA m16n8k32 needs sm_80.  False in the
    simulator, where its twin costs a block barrier a call: launchers take their dp4a path there and tests
    ask for the MMA path explicitly."""
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
    "mma_f64",
    "mma_f64_k16",
    "mma_s8",
    "has_f64_mma",
    "has_int8_mma",
    "half_bits",
    "hi_i32",
    "jit_kernel",
    "load_f32x4",
    "rint",
    "shfl_idx",
    "shfl_xor",
    "store_f32x4",
    "warp_max",
    "warp_sum",
    "warp_sum_pairwise",
]
