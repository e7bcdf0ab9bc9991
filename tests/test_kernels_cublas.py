"""The ``cublas`` Q8_0 strategy's kernels: Q8_0 -> F16 dequantization, float32 -> F16, the cuBLAS GEMM.

Simulator (and any device): ``q8_0.dequantize_f16`` and ``vec.to_f16`` bit for
bit against numpy (gguf's dequantization, ``astype(np.float16)``) on tiny
shapes, including F16 scales over the whole finite range (subnormal results,
overflow to inf) and every int8 value.  ``@pytest.mark.gpu``: ``f16.gemm``
against float64 numpy on odd and DS4 shapes, recorded as a ``LibraryCall``,
and captured in a CUDA graph between numba kernels (graph == eager, bit for
bit).  Reproduce a failure with DS4NB_TEST_SEED=<seed>.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.errors import UsageError
from ds4nb.kernels import _launch as L
from ds4nb.kernels import cublas as C
from ds4nb.kernels.registry import DeviceInfo
from ds4nb.plugins import get_registry
from ds4nb.quants import random_blocks
from ds4nb.quants.formats import BLOCK_DTYPE
from ds4nb.quants.repack import repack

Q = GGMLQuantizationType


def _wide_q8_0(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Raw Q8_0 bytes whose scales are random finite F16 bit patterns (subnormal to 65504, both signs)
    and whose quants are random bytes (all of -128..127).  The first three scales are 65504 (products
    overflow to inf), 5 * 2^-24 (subnormal products) and -0."""
    n_blocks = int(np.prod(shape[:-1])) * shape[-1] // 32
    blocks = np.zeros(n_blocks, dtype=BLOCK_DTYPE[Q.Q8_0])
    bits = rng.integers(0, 0x7C00, n_blocks, dtype=np.uint16) | (rng.integers(0, 2, n_blocks, dtype=np.uint16) << 15)
    bits[:3] = [0x7BFF, 0x0005, 0x8000]
    blocks["d"] = bits.view(np.float16)
    blocks["qs"] = rng.integers(-128, 128, (n_blocks, 32), dtype=np.int8)
    return blocks.view(np.uint8).reshape(-1)


def _run_dequantize(raw: np.ndarray, shape: tuple[int, ...], stream=0) -> np.ndarray:
    w = repack(raw, Q.Q8_0, shape).to_device()
    out = cuda.to_device(np.full(int(np.prod(shape)), np.nan, np.float16))
    C.dequantize_q8_0_f16(w, out=out, stream=stream)
    cuda.synchronize()
    return out.copy_to_host()


_OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")


@_OVERFLOW_OK
@pytest.mark.parametrize("shape", [(5, 64), (3, 32), (2, 3, 96)])
def test_dequantize_f16_bit_equals_gguf(shape, kernel_rng) -> None:
    raw = _wide_q8_0(kernel_rng, shape)
    rows = int(np.prod(shape[:-1]))
    with np.errstate(over="ignore"):
        want = C.gguf_f16(raw, (rows, shape[-1])).reshape(-1)
    got = _run_dequantize(raw, shape)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))   # bit for bit: -0, subnormals, inf
    assert np.isinf(want).any() and (np.abs(want[want != 0]) < np.float16(6.1e-5)).any()  # the edges are in


def test_dequantize_f16_realistic_blocks(kernel_rng) -> None:
    raw = random_blocks(Q.Q8_0, (7, 160), kernel_rng, rms=0.02)                 # odd rows, 5 blocks a row
    got = _run_dequantize(raw, (7, 160))
    assert np.array_equal(got.view(np.uint16), C.gguf_f16(raw, (7, 160)).reshape(-1).view(np.uint16))


def test_dequantize_f16_recorded_then_launched(kernel_rng) -> None:
    raw = random_blocks(Q.Q8_0, (3, 64), kernel_rng, rms=0.02)
    w = repack(raw, Q.Q8_0, (3, 64)).to_device()
    out = cuda.to_device(np.full(3 * 64, np.nan, np.float16))
    rec = L.Recorder()
    C.dequantize_q8_0_f16(w, out=out, stream=rec)
    assert len(rec.launches) == 1 and isinstance(rec.launches[0], L.Launch)
    assert np.isnan(out.copy_to_host()).all()                                  # recorded, not run
    rec.launches[0](0)
    cuda.synchronize()
    assert np.array_equal(out.copy_to_host(), C.gguf_f16(raw, (3, 64)).reshape(-1))


def test_dequantize_f16_rejects_bad_arguments(kernel_rng) -> None:
    raw = random_blocks(Q.Q8_0, (2, 32), kernel_rng, rms=0.02)
    w = repack(raw, Q.Q8_0, (2, 32)).to_device()
    with pytest.raises(ValueError, match="float16"):
        C.dequantize_q8_0_f16(w, out=cuda.device_array(64, np.float32))
    with pytest.raises(ValueError, match="64 float16"):
        C.dequantize_q8_0_f16(w, out=cuda.device_array(63, np.float16))
    q2 = repack(random_blocks(Q.Q2_K, (1, 256), kernel_rng), Q.Q2_K, (1, 256))
    with pytest.raises(ValueError, match="Q8_0"):
        C.dequantize_q8_0_f16(q2, out=cuda.device_array(256, np.float16))


def test_f16_bytes() -> None:
    w = repack(np.zeros(6 * 2 * 34, np.uint8), Q.Q8_0, (2, 3, 64))
    assert C.f16_bytes(w) == 2 * 6 * 64


@_OVERFLOW_OK
def test_to_f16_bit_equals_numpy(kernel_rng) -> None:
    special = np.array([0.0, -0.0, 1 + 2.0 ** -11, 1 + 3 * 2.0 ** -11, 65504, 65519.99, 65520, -1e6, np.inf,
                        -np.inf, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26, 1e-9, 6.1e-5], np.float32)  # ties, edges
    x = np.concatenate([special, (kernel_rng.standard_normal(25) * 10.0 ** kernel_rng.uniform(-8, 5, 25))])
    x = x.astype(np.float32).reshape(5, 8)                                      # a 2-D activation
    out = cuda.to_device(np.full((5, 8), np.nan, np.float16))
    with np.errstate(over="ignore"):
        C.to_f16(cuda.to_device(x), out=out)
        want = x.astype(np.float16)
    cuda.synchronize()
    assert np.array_equal(out.copy_to_host().view(np.uint16), want.view(np.uint16))


def test_to_f16_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="float32"):
        C.to_f16(cuda.device_array(4, np.float64), out=cuda.device_array(4, np.float16))
    with pytest.raises(ValueError, match="4 float16"):
        C.to_f16(cuda.device_array(4, np.float32), out=cuda.device_array(5, np.float16))


def test_registered_ops() -> None:
    reg = get_registry()
    assert {"q8_0.dequantize_f16", "vec.to_f16", "f16.gemm"} <= set(reg.ops())
    gemm = reg.get("f16.gemm", "cublas")
    assert gemm.fn is C.f16_gemm and gemm.layout == "f16"
    req = gemm.requires
    assert req.needs_cupy and not req.simulator and req.min_batch == 2
    assert gemm.unmet(DeviceInfo("cudasim", (9, 0), simulator=True), 8)        # never in the simulator
    assert "needs batch >= 2" in gemm.unmet(DeviceInfo("H200", (9, 0), has_cupy=True), 1)
    assert not gemm.unmet(DeviceInfo("H200", (9, 0), has_cupy=True), 2)


def test_stream_handle_cases() -> None:
    class Proto:                                     # numba >= 0.29 streams, cuda.core Stream / GraphBuilder
        def __cuda_stream__(self):
            return (0, 0x1234)

    class OldNumba:                                  # a ctypes handle
        handle = ctypes.c_void_p(0x5678)

    class OldDefault:
        handle = ctypes.c_void_p(None)

    assert C.stream_handle(0) == 0 and C.stream_handle(7) == 7
    assert C.stream_handle(Proto()) == 0x1234
    assert C.stream_handle(OldNumba()) == 0x5678 and C.stream_handle(OldDefault()) == 0
    for bad in (L.Recorder(), "stream", True, None):
        with pytest.raises(UsageError):
            C.stream_handle(bad)


def test_f16_gemm_without_cublas_is_a_one_line_error() -> None:
    if C.cublas_available():
        pytest.skip("cuBLAS is available here")
    with pytest.raises(UsageError, match="needs CuPy") as exc:
        C.f16_gemm(None, None, out=None, n_rows=2, k=32, n_tok=2, stream=L.Recorder())
    assert "\n" not in str(exc.value)


# ---------------------------------------------------------------------------
# f16.gemm on a GPU
# ---------------------------------------------------------------------------


def _need_cublas() -> None:
    if not C.cublas_available():
        pytest.skip(f"f16.gemm needs CuPy: {C.CUPY_HINT}")


def _operands(rng, n_rows, k, n_tok):
    w16 = (rng.standard_normal((n_rows, k)) * 0.02).astype(np.float16)
    x16 = (rng.standard_normal((n_tok, k)) * rng.uniform(0.5, 2.0, (n_tok, 1))).astype(np.float16)
    return w16, x16


def _check_gemm(got: np.ndarray, w16: np.ndarray, x16: np.ndarray, scale: float = 1.0) -> float:
    ref = scale * C.f16_gemm_reference(w16, x16)
    got = got.reshape(ref.shape).astype(np.float64)
    assert np.isfinite(got).all()
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    bound = scale * (np.abs(x16.astype(np.float64)) @ np.abs(w16.astype(np.float64)).T)   # sum |x w|
    worst = float(np.max(np.abs(got - ref) / bound))
    print(f"f16.gemm {w16.shape[0]}x{w16.shape[1]} x {x16.shape[0]} tokens: rel. error {err:.3g}, "
          f"max |err| / sum|xw| {worst:.3g}")
    assert err < C.GEMM_TOL and worst < 1e-4
    return err


@pytest.mark.gpu
@pytest.mark.parametrize(("n_rows", "k", "n_tok"), [
    (19, 96, 2), (37, 160, 3), (301, 72, 13), (5, 8, 1),                       # odd shapes
    *[(1024, 4096, t) for t in (1, 7, 64, 300)],                                # attn_q_a-like 4096 -> 1024
    *[(32768, 1024, t) for t in (1, 7, 64, 300)],                               # attn_q_b 1024 -> 32768
])
def test_f16_gemm_against_numpy(n_rows, k, n_tok, kernel_rng) -> None:
    _need_cublas()
    w16, x16 = _operands(kernel_rng, n_rows, k, n_tok)
    out = cuda.to_device(np.full((n_tok, n_rows), np.nan, np.float32))
    C.f16_gemm(cuda.to_device(w16), cuda.to_device(x16), out=out, n_rows=n_rows, k=k, n_tok=n_tok)
    cuda.synchronize()
    _check_gemm(out.copy_to_host(), w16, x16)


@pytest.mark.gpu
def test_f16_gemm_recorded_as_a_library_call(kernel_rng) -> None:
    _need_cublas()
    n_rows, k, n_tok = 300, 512, 24
    w16, x16 = _operands(kernel_rng, n_rows, k, n_tok)
    out = cuda.to_device(np.full(n_tok * n_rows, np.nan, np.float32))
    rec = L.Recorder()
    rec.family = "gemm"
    C.f16_gemm(cuda.to_device(w16), cuda.to_device(x16), out=out, n_rows=n_rows, k=k, n_tok=n_tok, stream=rec)
    (call,) = rec.launches
    assert isinstance(call, L.LibraryCall) and call.family == "gemm"
    cuda.synchronize()
    assert np.isnan(out.copy_to_host()).all()                                   # recorded, not run
    call(0)                                                                     # legacy default stream
    cuda.synchronize()
    first = out.copy_to_host()
    _check_gemm(first, w16, x16)
    out.copy_to_device(np.full(n_tok * n_rows, np.nan, np.float32))
    s = cuda.stream()
    assert C.stream_handle(s) == int(s.handle)
    call(s)                                                                     # a numba stream
    s.synchronize()
    assert np.array_equal(out.copy_to_host(), first)


@cuda.jit
def _scale_kernel(y, n, out):
    i = cuda.grid(1)
    if i < n:
        out[i] = y[i] * np.float32(2.0)                                          # exact


@pytest.mark.gpu
def test_f16_gemm_captured_between_numba_kernels(kernel_rng) -> None:
    """Q8_0 weight -> F16 (load), then a step [x -> F16, GEMM, 2 * y]: eager and captured graph agree bit
    for bit, and a replay reads the current input."""
    _need_cublas()
    from ds4nb.engine.graph import _core_device, capture

    n_rows, k, n_tok = 1024, 4096, 64
    raw = random_blocks(Q.Q8_0, (n_rows, k), kernel_rng, rms=0.02)
    w16 = cuda.device_array(n_rows * k, np.float16)
    C.dequantize_q8_0_f16(repack(raw, Q.Q8_0, (n_rows, k)).to_device(), out=w16)
    w16_host = C.gguf_f16(raw, (n_rows, k))
    cuda.synchronize()
    assert np.array_equal(w16.copy_to_host().reshape(n_rows, k), w16_host)

    x = cuda.to_device(kernel_rng.standard_normal((n_tok, k)).astype(np.float32))
    x16 = cuda.device_array((n_tok, k), np.float16)
    y = cuda.device_array(n_tok * n_rows, np.float32)
    z = cuda.device_array(n_tok * n_rows, np.float32)
    rec = L.Recorder()
    C.to_f16(x, out=x16, stream=rec)
    C.f16_gemm(w16, x16, out=y, n_rows=n_rows, k=k, n_tok=n_tok, stream=rec)
    L.launch(_scale_kernel, L.cdiv(y.size, 256), 256, rec, y, y.size, z)
    assert [type(launch) for launch in rec.launches] == [L.Launch, L.LibraryCall, L.Launch]

    def poison():
        for a in (x16, y, z):
            a.copy_to_device(np.full(a.shape, np.nan, a.dtype))
        cuda.synchronize()

    stream = cuda.stream()

    def eager() -> np.ndarray:
        poison()
        for launch in rec.launches:
            launch(stream)
        stream.synchronize()
        return z.copy_to_host()

    want = eager()
    _check_gemm(want, w16_host, x.copy_to_host().astype(np.float16), scale=2.0)

    graph = capture(rec.launches)                    # after the eager run, as StepRunner does
    core = _core_device().create_stream()
    poison()
    graph.launch(core)
    core.sync()
    assert np.array_equal(z.copy_to_host(), want), "captured graph != eager"

    x.copy_to_device(kernel_rng.standard_normal((n_tok, k)).astype(np.float32))   # a new input, same buffers
    want2 = eager()
    poison()
    graph.launch(core)
    core.sync()
    assert np.array_equal(z.copy_to_host(), want2) and not np.array_equal(want, want2)
    _check_gemm(want2, w16_host, x.copy_to_host().astype(np.float16), scale=2.0)
