"""The ``cublas`` Q8_0 strategy: an F16 copy of each Q8_0 weight, multiplied by cuBLAS.

Three pieces, each usable inside a recorded step (``_launch.Recorder``) that
is later replayed eagerly or captured as a CUDA graph: nothing in a per-step
call allocates, synchronises or copies to the host.

``q8_0.dequantize_f16`` (:func:`dequantize_q8_0_f16`, run once at load)
    block-minor Q8_0 (``ds4nb.quants.repack``) -> row-major ``(N, K)``
    float16.  Layout: ``qs`` word ``j`` (int8 values ``8j .. 8j+7``, GGUF
    byte order) of block ``b`` of row ``r`` at ``(r * 4 + j) * nb + b``, its
    scale at ``dm[r * nb + b]``.  One thread per word, ``j`` fastest: thread
    ``t = (r * nb + b) * 4 + j`` writes ``out[8t : 8t + 8]`` (``K = 32 nb``
    makes the output offset exactly ``8t``), so a warp stores 512 contiguous
    bytes and reads 8 consecutive words from each of the 4 ``j`` rows.
    Numerics: ``float16(float32(d) * float32(q))``: the float32 product of an
    F16 scale (11 significant bits) and an int8 is exact, and the one
    rounding (nearest-even, ``cvt.rn.f16.f32``; subnormals and overflow to
    inf as IEEE says) is numpy's ``astype(np.float16)``.  Bit-identical to
    ``gguf.quants.dequantize(raw, Q8_0).astype(np.float16)``.

``vec.to_f16`` (:func:`to_f16`, per step)
    float32 -> float16, one rounding to nearest-even per value
    (``x.astype(np.float16)`` exactly).

``f16.gemm`` (:func:`f16_gemm`, per step)
    ``out (n_tok, n_rows) f32 = x16 (n_tok, k) @ w16 (n_rows, k)^T``, all
    row-major, by ``cublasGemmEx`` (F16 operands, F32 output, F32 compute
    ``CUBLAS_COMPUTE_32F``, default algorithm).  Not bit-exact: the operands
    are the F16-rounded weights and activations and cuBLAS accumulates in
    float32 in its own order; the parity case bounds it against float64
    products of the same F16 operands (docs/model.md, ENGINE.md "Numerics":
    the ``cublas`` strategy has a documented tolerance, not the contract).

How cuBLAS is reached.  CuPy provides libcublas (``pip install
'ds4nb[cublas]'`` / ``[cublas13]``); it is *called* through ctypes, not
through CuPy's wrappers: ``cupy_backends.cuda.libs.cublas.gemmEx`` (CuPy
14.2) first resets the handle's stream to CuPy's current stream, and its
``setStream`` raises ``NotImplementedError`` on a capturing stream ("calling
cuBLAS API during stream capture is currently unsupported").  cuBLAS itself
supports stream capture (cuBLAS docs, "CUDA Graphs support"): with
``CUBLAS_POINTER_MODE_HOST`` the values of ``alpha``/``beta`` are captured
into the graph; with its default workspace a captured call may add
``cudaMallocAsync`` memory nodes, which ``cublasSetWorkspace`` with a
user-owned buffer avoids.  ``cublasSetStream`` resets the workspace to the
default pool, so every call sets the stream, then the workspace, then runs
the GEMM.

Process state (:class:`_Cublas`, created on first use): the libcublas
CuPy loaded, and per device one cuBLAS handle of our own (pointer mode
host; CuPy's handles are left alone) and one persistent workspace (32 MiB
on cc >= 9.0, 4 MiB before: cuBLAS's recommended sizes).  Handle and
workspace are made by :func:`f16_gemm` when it prepares a call, i.e. when a
step is recorded or run eagerly, never inside a capture (``cublasCreate``
and the workspace allocation call ``cudaMalloc``, which stream capture
forbids).  One workspace per device means these GEMMs must not run on two
streams at once (the engine has one stream per device).
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.errors import Ds4Error, UsageError
from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import SIMULATOR, float32, int32, uint64, wait_prior_grid
from ds4nb.kernels.parity import Case
from ds4nb.kernels.registry import OpSpec, Requirements, implementation
from ds4nb.quants.repack import PackedWeight, layout_name, repack

Q = GGMLQuantizationType
QK8_0 = 32
THREADS = 8 if SIMULATOR else 256
_PER_THREAD = 16 if SIMULATOR else 1    # items a thread strides over (at least): the simulator pays per thread
_MAX_BLOCKS = 4 if SIMULATOR else 65536

CUPY_HINT = "pip install 'ds4nb[cublas]' (CUDA 12) or 'ds4nb[cublas13]' (CUDA 13)"


def _blocks(n: int) -> int:
    return max(1, min(L.cdiv(n, THREADS * _PER_THREAD), _MAX_BLOCKS))


def _rows(w: PackedWeight) -> int:
    """Rows of the dequantized matrix (leading dimensions flattened)."""
    return int(np.prod(w.shape[:-1], dtype=np.int64))


def f16_bytes(w: PackedWeight) -> int:
    """Device bytes of the F16 copy of ``w`` (2 * N * K): what the ``cublas`` strategy adds to a budget."""
    return 2 * _rows(w) * int(w.shape[-1])


# ---------------------------------------------------------------------------
# q8_0.dequantize_f16
# ---------------------------------------------------------------------------


@cuda.jit
def _dequantize_kernel(qs, dm, n_words, nb, out):
    # word t = (r * nb + b) * 4 + j of the tensor -> out[8t .. 8t + 7] (grid-stride)
    wait_prior_grid()
    t = cuda.grid(1)
    stride = cuda.gridsize(1)
    while t < n_words:
        j = t % 4
        rb = t // 4                                  # r * nb + b: the block over the whole tensor
        r = rb // nb
        w = qs[uint64((r * 4 + j) * nb + (rb - r * nb))]
        d = float32(dm[uint64(rb)])
        base = 8 * t
        for i in range(8):
            byte = int32((w >> uint64(8 * i)) & uint64(0xFF))
            q = byte - ((byte & 0x80) << 1)          # two's complement int8
            out[uint64(base + i)] = d * float32(int32(q))   # exact float32 product, one f16 rounding
        t += stride


def _check_f16_out(out: Any, n: int, what: str) -> None:
    if np.dtype(out.dtype) != np.float16 or out.size != n:
        raise ValueError(f"{what}: out must be {n} float16 values, got {out.size} {np.dtype(out.dtype).name}")


@implementation("q8_0.dequantize_f16", "elementwise", layout=layout_name(Q.Q8_0))
def dequantize_q8_0_f16(w: PackedWeight, *, out: Any, stream: Any = 0) -> Any:
    """Block-minor Q8_0 weight -> its (N, K) float16 row-major copy (once per weight, at load)."""
    if w.qtype != Q.Q8_0:
        raise ValueError(f"expected a Q8_0 weight, got {w.qtype.name}")
    n_rows, k = _rows(w), int(w.shape[-1])
    _check_f16_out(out, n_rows * k, "q8_0.dequantize_f16")
    nb = k // QK8_0
    n_words = n_rows * nb * 4
    L.launch(_dequantize_kernel, _blocks(n_words), THREADS, stream, w.qs, w.dm, n_words, nb, L.flat(out))
    return out


# ---------------------------------------------------------------------------
# vec.to_f16
# ---------------------------------------------------------------------------


@cuda.jit
def _to_f16_kernel(x, n, out):
    wait_prior_grid()
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    while i < n:
        out[uint64(i)] = x[uint64(i)]                # float32 -> float16: one rounding to nearest-even
        i += stride


@implementation("vec.to_f16", "elementwise", layout="f32")
def to_f16(x: Any, *, out: Any, stream: Any = 0) -> Any:
    """float32 -> float16, same shape (the ``cublas`` strategy's activations)."""
    if np.dtype(x.dtype) != np.float32:
        raise ValueError(f"vec.to_f16: x must be float32, got {np.dtype(x.dtype).name}")
    _check_f16_out(out, x.size, "vec.to_f16")
    L.launch(_to_f16_kernel, _blocks(x.size), THREADS, stream, L.flat(x), x.size, L.flat(out))
    return out


# ---------------------------------------------------------------------------
# cuBLAS: availability, streams, the process's handle and workspace
# ---------------------------------------------------------------------------


@functools.cache
def cublas_available() -> bool:
    """Whether ``f16.gemm`` can run here: CuPy (with its libcublas) imports and a real CUDA device is present."""
    if SIMULATOR:
        return False
    try:
        import cupy  # noqa: F401
        from cupy_backends.cuda.libs import cublas  # noqa: F401  (loads libcublas)
    except Exception:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:
        return False


def stream_handle(stream: Any) -> int:
    """The ``CUstream`` (an int) of ``stream``: 0 (the legacy default stream), an int handle, a numba
    stream, a ``cuda.core`` Stream or GraphBuilder (during capture: the capturing stream), a CuPy stream.

    Objects speaking the ``__cuda_stream__`` protocol (numba >= 0.29 streams, every ``cuda.core``
    stream and graph builder) are asked for it; older numba streams have a ctypes ``handle``.
    """
    if isinstance(stream, bool):
        raise UsageError(f"not a CUDA stream: {stream!r}")
    if isinstance(stream, int):
        return stream
    if isinstance(stream, L.Recorder):
        raise UsageError("a Recorder is not a CUDA stream: record through _launch.call, run the LibraryCall later")
    proto = getattr(stream, "__cuda_stream__", None)
    if proto is not None:
        _, handle = proto()
        return int(handle)
    handle = getattr(stream, "handle", None)
    if handle is not None:                                  # numba's ctypes-era Stream
        value = getattr(handle, "value", handle)
        return int(value or 0)
    ptr = getattr(stream, "ptr", None)                      # CuPy Stream
    if isinstance(ptr, int):
        return ptr
    raise UsageError(f"not a CUDA stream: {type(stream).__name__} (expected 0, a numba stream, "
                     "a cuda.core Stream or GraphBuilder)")


# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
CUBLAS_OP_N, CUBLAS_OP_T = 0, 1
CUDA_R_32F, CUDA_R_16F = 0, 2
CUBLAS_COMPUTE_32F = 68
CUBLAS_GEMM_DEFAULT = -1
CUBLAS_POINTER_MODE_HOST = 0

_STATUS = {1: "NOT_INITIALIZED", 3: "ALLOC_FAILED", 7: "INVALID_VALUE", 8: "ARCH_MISMATCH",
           11: "MAPPING_ERROR", 13: "EXECUTION_FAILED", 14: "INTERNAL_ERROR", 15: "NOT_SUPPORTED",
           16: "LICENSE_ERROR"}


def _libcublas_path() -> str | None:
    """The file of the libcublas already in this process (CuPy's): /proc/self/maps, else cuda.pathfinder."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if path.rsplit("/", 1)[-1].startswith("libcublas.so"):
                    return path
    except OSError:
        pass
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        return load_nvidia_dynamic_lib("cublas").abs_path
    except Exception:
        return None


def _load_libcublas() -> ctypes.CDLL:
    if not cublas_available():
        raise UsageError(f"the cublas strategy needs CuPy and a CUDA GPU: {CUPY_HINT}")
    path = _libcublas_path()
    if path is None:
        raise Ds4Error("cuBLAS: CuPy imports but its libcublas could not be located")
    lib = ctypes.CDLL(path)
    vp, i, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, args in (("cublasCreate_v2", [ctypes.POINTER(vp)]),
                       ("cublasSetPointerMode_v2", [vp, i]),
                       ("cublasSetStream_v2", [vp, vp]),
                       ("cublasSetWorkspace_v2", [vp, vp, sz]),
                       ("cublasGemmEx", [vp, i, i, i, i, i, vp, vp, i, i, vp, i, i, vp, vp, i, i, i, i])):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int
    return lib


@dataclass(frozen=True)
class _DeviceState:
    handle: ctypes.c_void_p
    workspace: ctypes.c_void_p
    workspace_bytes: int
    buffer: Any                 # the numba device array behind ``workspace`` (kept alive)


class _Cublas:
    """libcublas and, per device, one handle and one workspace (see the module docstring).

    The only mutable state of this module: created on first use, lives as
    long as the process.  ``lock`` serialises the stream/workspace/GEMM
    triple of a call, which must not interleave with another thread's.
    """

    def __init__(self) -> None:
        self.lib = _load_libcublas()
        self.lock = threading.Lock()
        self._devices: dict[int, _DeviceState] = {}

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise Ds4Error(f"cuBLAS {what} failed: CUBLAS_STATUS_{_STATUS.get(status, status)}")

    def device(self) -> _DeviceState:
        """The current device's handle and workspace, created now if needed (outside any capture)."""
        dev = cuda.get_current_device()
        state = self._devices.get(dev.id)
        if state is None:
            with self.lock:
                state = self._devices.get(dev.id)
                if state is None:
                    handle = ctypes.c_void_p()
                    self.check(self.lib.cublasCreate_v2(ctypes.byref(handle)), "cublasCreate")
                    self.check(self.lib.cublasSetPointerMode_v2(handle, CUBLAS_POINTER_MODE_HOST),
                               "cublasSetPointerMode")
                    size = (32 if tuple(dev.compute_capability) >= (9, 0) else 4) << 20
                    buf = cuda.device_array(size, np.uint8)          # 256-byte aligned, as cuBLAS requires
                    ptr = buf.__cuda_array_interface__["data"][0]
                    state = _DeviceState(handle, ctypes.c_void_p(ptr), size, buf)
                    self._devices[dev.id] = state
        return state


_STATE: _Cublas | None = None
_STATE_LOCK = threading.Lock()
# alpha = 1, beta = 0 as host float32 (pointer mode host: read when the call is made, captured as values)
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def _cublas() -> _Cublas:
    global _STATE
    if _STATE is None:
        with _STATE_LOCK:
            if _STATE is None:
                _STATE = _Cublas()
    return _STATE


def _device_ptr(a: Any, dtype: Any, n: int, what: str) -> int:
    """The device pointer of a C-contiguous device array of at least ``n`` values of ``dtype``."""
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is None:
        raise ValueError(f"f16.gemm: {what} is not a device array")
    if np.dtype(a.dtype) != np.dtype(dtype) or a.size < n:
        raise ValueError(f"f16.gemm: {what} must hold {n} {np.dtype(dtype).name} values, "
                         f"got {a.size} {np.dtype(a.dtype).name}")
    strides = cai.get("strides")
    if strides is not None:
        want, step = [], np.dtype(dtype).itemsize
        for dim in reversed(cai["shape"]):
            want.append(step)
            step *= dim
        if tuple(strides) != tuple(reversed(want)):
            raise ValueError(f"f16.gemm: {what} must be C-contiguous")
    return int(cai["data"][0])


# ---------------------------------------------------------------------------
# f16.gemm
# ---------------------------------------------------------------------------


@implementation("f16.gemm", "cublas", layout="f16", requires=Requirements(needs_cupy=True, simulator=False,
                                                                           min_batch=2))
def f16_gemm(w16: Any, x16: Any, *, out: Any, n_rows: int, k: int, n_tok: int, stream: Any = 0) -> Any:
    """out (n_tok, n_rows) f32 = x16 (n_tok, k) f16 @ w16 (n_rows, k) f16 ^T, by cuBLAS (fp32 accumulation)."""
    n_rows, k, n_tok = int(n_rows), int(k), int(n_tok)
    cub = _cublas()                                  # UsageError without CuPy / a GPU
    a = _device_ptr(w16, np.float16, n_rows * k, "w16")
    b = _device_ptr(x16, np.float16, n_tok * k, "x16")
    c = _device_ptr(out, np.float32, n_tok * n_rows, "out")
    if n_rows == 0 or n_tok == 0:
        return out
    if k == 0:
        raise ValueError("f16.gemm: k must be positive")
    dev = cub.device()                               # handle + workspace: made now, never during a capture
    lib, lock = cub.lib, cub.lock
    keep = (w16, x16, out)                           # the call holds raw pointers: keep the arrays alive
    a, b, c = ctypes.c_void_p(a), ctypes.c_void_p(b), ctypes.c_void_p(c)

    # Row-major buffers read column-major (what cuBLAS speaks):
    #   w16 (n_rows, k) row-major  = W^T (k x n_rows) column-major, ld k
    #   x16 (n_tok, k)  row-major  = X^T (k x n_tok)  column-major, ld k
    #   out (n_tok, n_rows) row-major = C (n_rows x n_tok) column-major, ld n_rows
    # and C = out^T = W X^T = op(A) op(B) with A = the w16 buffer transposed (OP_T: (W^T)^T = W,
    # m = n_rows) and B = the x16 buffer as is (OP_N: X^T, n = n_tok), inner dimension k.
    def cublas_gemm_ex(stream: Any) -> None:
        s = ctypes.c_void_p(stream_handle(stream))
        with lock:
            cub.check(lib.cublasSetStream_v2(dev.handle, s), "cublasSetStream")
            # after setStream, which resets the workspace to cuBLAS's default pool
            cub.check(lib.cublasSetWorkspace_v2(dev.handle, dev.workspace, dev.workspace_bytes),
                      "cublasSetWorkspace")
            cub.check(lib.cublasGemmEx(dev.handle, CUBLAS_OP_T, CUBLAS_OP_N, n_rows, n_tok, k,
                                       ctypes.byref(_ONE), a, CUDA_R_16F, k, b, CUDA_R_16F, k,
                                       ctypes.byref(_ZERO), c, CUDA_R_32F, n_rows,
                                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx")

    cublas_gemm_ex.keep = keep                        # the recorded call owns its arrays
    L.call(cublas_gemm_ex, stream)
    return out


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------

#: DS4 shapes: attn_q_b (1024 -> 32768) and a 4096 -> 1024 projection (N, K)
MODEL_SHAPES = {"q_b": (32768, 1024), "q_a": (1024, 4096)}


def gguf_f16(raw: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The twin of ``q8_0.dequantize_f16``: gguf's float32 dequantization, rounded to float16."""
    from gguf.quants import dequantize

    return dequantize(raw, Q.Q8_0).reshape(shape).astype(np.float16)


def _case_dequantize(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.quants import random_blocks

    shape = (7, 96) if scale == "tiny" else MODEL_SHAPES["q_b"]   # tiny: odd rows, 3 blocks a row
    raw = random_blocks(Q.Q8_0, shape, rng, rms=0.02)
    out = L.device_array(shape[0] * shape[1], np.float16)
    return Case((repack(raw, Q.Q8_0, shape).to_device(),), out, (gguf_f16(raw, shape).reshape(-1),), (True,),
                weight_bytes=raw.size, info={"rows": shape[0], "k": shape[1]})


def _case_to_f16(rng: np.random.Generator, scale: str) -> Case:
    n, top = (45, 9) if scale == "tiny" else (300 * 4096, 12)      # model: some values overflow to inf
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, top, n))).astype(np.float32)  # from f16 subnormals up
    with np.errstate(over="ignore"):
        ref = x.astype(np.float16)
    return Case((L.to_device_flat(x),), L.device_array(n, np.float16), (ref,), (True,), info={"n": n})


def f16_gemm_reference(w16: np.ndarray, x16: np.ndarray) -> np.ndarray:
    """float64 x16 @ w16^T of the F16 operands (exact products), (n_tok, n_rows)."""
    return x16.astype(np.float64) @ w16.astype(np.float64).T


def make_f16_gemm_case(rng: np.random.Generator, n_rows: int, k: int, n_tok: int) -> Case:
    w16 = (rng.standard_normal((n_rows, k)) * 0.02).astype(np.float16)
    x16 = (rng.standard_normal((n_tok, k)) * rng.uniform(0.5, 2.0, size=(n_tok, 1))).astype(np.float16)
    ref = f16_gemm_reference(w16, x16)
    out = L.device_array(n_tok * n_rows, np.float32)
    return Case((L.to_device_flat(w16), L.to_device_flat(x16)), out, (ref.reshape(-1),), (False,),
                kwargs={"n_rows": n_rows, "k": k, "n_tok": n_tok}, weight_bytes=w16.nbytes,
                info={"rows": n_rows, "k": k, "tokens": n_tok})


def _case_gemm(rng: np.random.Generator, scale: str) -> Case:
    if scale == "tiny":
        return make_f16_gemm_case(rng, 19, 96, 5)
    return make_f16_gemm_case(rng, *MODEL_SHAPES["q_b"], 96)


#: f16.gemm: ||out - ref|| / ||ref|| against float64 products of the same F16 operands.  cuBLAS sums in
#: float32 (~eps32 * sqrt(k) relative: ~4e-6 at k = 4096); a float16 accumulator or output would be ~3e-4.
GEMM_TOL = 5e-5

OPS = [
    OpSpec("q8_0.dequantize_f16", "Q8_0 weight -> F16 row-major copy (the cublas strategy, at load)",
           "(w: PackedWeight Q8_0 (N, K), *, out f16 (N*K,), stream)",
           "gguf.quants.dequantize(raw, Q8_0).astype(float16): float32 d * q rounded once", 0.0,
           _case_dequantize),
    OpSpec("vec.to_f16", "float32 -> float16, round to nearest even",
           "(x f32 (n,), *, out f16 (n,), stream)", "x.astype(numpy.float16)", 0.0, _case_to_f16),
    OpSpec("f16.gemm", "F16 weight x F16 activations, float32 out, through cuBLAS",
           "(w16 f16 (N, K), x16 f16 (n, K), *, out f32 (n, N), n_rows, k, n_tok, stream)",
           "float64 x16 @ w16.T of the F16 operands (cuBLAS accumulates in float32)", GEMM_TOL, _case_gemm),
]
