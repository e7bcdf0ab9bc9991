"""Device intrinsics (dp4a, shuffles, reinterpretation, rint) and the block-minor layouts."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import intrinsics as K
from ds4nb.quants import quantize_q8_0, quantize_q8_K, random_blocks
from ds4nb.quants.formats import BLOCK_DTYPE
from ds4nb.quants.repack import (
    pack_q8_0_activation,
    pack_q8_K_activation,
    repack,
    unpack,
    unpack_q8_0_activation,
    unpack_q8_K_activation,
)

Q = GGMLQuantizationType


def _dp4a_ref(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    ab = a.astype("<i4").view(np.int8).reshape(-1, 4).astype(np.int64)
    bb = b.astype("<i4").view(np.int8).reshape(-1, 4).astype(np.int64)
    s = c.astype(np.int64) + (ab * bb).sum(axis=1)
    return ((s + 2**31) % 2**32 - 2**31).astype(np.int32)


@cuda.jit
def _dp4a_kernel(a, b, c, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = K.dp4a(a[i], b[i], c[i])


@cuda.jit
def _byte_perm_kernel(x, y, s, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = K.byte_perm(x[i], y[i], s[i])


@cuda.jit
def _shfl_kernel(x, out_sum, out_max, out_xor):
    i = cuda.threadIdx.x
    v = x[i]
    out_sum[i] = K.warp_sum(v, 32)
    out_max[i] = K.warp_max(v, 8)
    out_xor[i] = K.shfl_xor(v, 5)


@cuda.jit
def _pairwise_kernel(x, out, width):
    i = cuda.threadIdx.x
    out[i] = K.warp_sum_pairwise(x[i], width)


def _pairwise_ref(v: np.ndarray) -> np.float32:
    """((v0 + v1) + (v2 + v3)) + ... in float32, the order moe_mma's sequential walk reproduces."""
    while v.size > 1:
        v = (v[0::2] + v[1::2]).astype(np.float32)
    return v[0]


@cuda.jit
def _bits_kernel(w, lo, hi, f, r):
    i = cuda.grid(1)
    if i < w.size:
        lo[i] = K.as_i32(w[i])
        hi[i] = K.hi_i32(w[i])
        r[i] = K.rint(f[i])


def test_dp4a_matches_numpy(kernel_rng: np.random.Generator) -> None:
    n = 64
    a = kernel_rng.integers(-2**31, 2**31, n).astype(np.int32)
    b = kernel_rng.integers(-2**31, 2**31, n).astype(np.int32)
    c = kernel_rng.integers(-2**31, 2**31, n).astype(np.int32)
    a[0], b[0], c[0] = -0x7F7F7F80, -0x7F7F7F80, 2**31 - 1  # -128 * -128 * 4 wraps past int32 max
    out = cuda.to_device(np.full(n, -1, np.int32))
    _dp4a_kernel[1, n](cuda.to_device(a), cuda.to_device(b), cuda.to_device(c), out)
    np.testing.assert_array_equal(out.copy_to_host(), _dp4a_ref(a, b, c))


def test_byte_perm_matches_numpy(kernel_rng: np.random.Generator) -> None:
    n = 64
    x, y, s = (kernel_rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for _ in range(3))
    s[0] = 0x76543210  # identity on y:x -> x
    out = cuda.to_device(np.zeros(n, np.uint32))
    _byte_perm_kernel[1, n](cuda.to_device(x), cuda.to_device(y), cuda.to_device(s), out)
    pool = np.stack([x, y], axis=1).view(np.uint8).reshape(n, 8)  # bytes of (y:x), x first
    nib = (s[:, None].astype(np.int64) >> (4 * np.arange(4))) & 0xF
    picked = np.take_along_axis(pool, nib & 7, axis=1)
    replicated = np.where(picked & 0x80, 0xFF, 0x00).astype(np.uint8)  # nibble bit 3: sign-replicate
    ref = np.where(nib & 8, replicated, picked).astype(np.uint8).copy().view("<u4").reshape(n)
    got = out.copy_to_host()
    assert got[0] == x[0]
    np.testing.assert_array_equal(got, ref)


def test_warp_shuffles(kernel_rng: np.random.Generator) -> None:
    x = kernel_rng.standard_normal(64).astype(np.float32)
    outs = [cuda.to_device(np.full(64, np.nan, np.float32)) for _ in range(3)]
    _shfl_kernel[1, 64](cuda.to_device(x), *outs)
    s, m, xo = (o.copy_to_host() for o in outs)
    for w in range(2):
        lane = x[32 * w:32 * w + 32]
        # float32 sums in another order differ by at most ~n*eps*sum|x| (cancellation defeats a relative bound)
        bound = 32 * np.finfo(np.float32).eps * np.abs(lane).sum()
        np.testing.assert_allclose(s[32 * w:32 * w + 32], lane.astype(np.float64).sum(), rtol=0, atol=bound)
    np.testing.assert_array_equal(m, np.repeat(x.reshape(8, 8).max(axis=1), 8))
    np.testing.assert_array_equal(xo, x[np.arange(64) ^ 5])


@pytest.mark.parametrize("width", [2, 8, 32])
def test_warp_sum_pairwise_is_pairwise_in_lane_order(width: int, kernel_rng: np.random.Generator) -> None:
    # magnitudes spread over 12 binades: float32 sums in another order give other bits
    x = (kernel_rng.standard_normal(64) * 2.0 ** kernel_rng.integers(-6, 6, 64)).astype(np.float32)
    out = cuda.to_device(np.full(64, np.nan, np.float32))
    _pairwise_kernel[1, 64](cuda.to_device(x), out, width)
    want = np.repeat([_pairwise_ref(x[g:g + width]) for g in range(0, 64, width)], width)
    np.testing.assert_array_equal(out.copy_to_host().view(np.uint32), want.view(np.uint32))


def test_reinterpret_and_rint(kernel_rng: np.random.Generator) -> None:
    w = kernel_rng.integers(0, 2**63, 32, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    f = np.concatenate([np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5], np.float32),
                        (kernel_rng.standard_normal(24) * 100).astype(np.float32)])
    lo, hi, r = (cuda.to_device(np.full(32, -1, dt)) for dt in (np.int32, np.int32, np.float32))
    _bits_kernel[1, 32](cuda.to_device(w), lo, hi, cuda.to_device(f), r)
    np.testing.assert_array_equal(lo.copy_to_host(), w.view(np.int32).reshape(-1, 2)[:, 0])
    np.testing.assert_array_equal(hi.copy_to_host(), w.view(np.int32).reshape(-1, 2)[:, 1])
    np.testing.assert_array_equal(r.copy_to_host(), np.rint(f))  # ties to even


@cuda.jit
def _f32x4_kernel(src, off, dst):
    """Thread i moves values 4i .. 4i + 3 of ``src[off:]`` to ``dst`` in reverse order, 16 bytes at a time."""
    i = cuda.threadIdx.x
    v0, v1, v2, v3 = K.load_f32x4(src, off + 4 * i)
    K.store_f32x4(dst, 4 * i, v3, v2, v1, v0)


def test_f32x4_loads_and_stores(kernel_rng: np.random.Generator) -> None:
    """One 16-byte load and store a thread, at an aligned offset into the array: the four values, in order."""
    x = kernel_rng.standard_normal(4 * 64 + 8).astype(np.float32)
    out = cuda.to_device(np.full(4 * 64, np.nan, np.float32))
    _f32x4_kernel[1, 64](cuda.to_device(x), 8, out)
    np.testing.assert_array_equal(out.copy_to_host(), x[8:].reshape(64, 4)[:, ::-1].reshape(-1))


@cuda.jit
def _mma_f64_kernel(a, b, c, d):
    """Two warps, each D = A B + C on its own 8x4, 4x8 and 8x8 matrices (the MMA's fragment layout)."""
    tid = cuda.threadIdx.x
    w, lane = tid // 32, tid % 32
    g, t = lane // 4, lane % 4
    d0, d1 = K.mma_f64(a[w, g, t], b[w, t, g], c[w, g, 2 * t], c[w, g, 2 * t + 1])
    d[w, g, 2 * t] = d0
    d[w, g, 2 * t + 1] = d1


def test_mma_f64_is_a_float64_matmul(kernel_rng: np.random.Generator) -> None:
    # integers below 2^20: every product and sum is exact, so any order gives numpy's bits
    a, b = (kernel_rng.integers(-2**20, 2**20, (2, *s)).astype(np.float64) for s in ((8, 4), (4, 8)))
    c = kernel_rng.integers(-2**40, 2**40, (2, 8, 8)).astype(np.float64)
    d = cuda.to_device(np.full((2, 8, 8), np.nan))
    _mma_f64_kernel[1, 64](cuda.to_device(a), cuda.to_device(b), cuda.to_device(c), d)
    np.testing.assert_array_equal(d.copy_to_host(), a @ b + c)
    # random reals: a float64 evaluation in some order (a few ulps of the terms' magnitude)
    a, b, c = kernel_rng.standard_normal((2, 8, 4)), kernel_rng.standard_normal((2, 4, 8)), \
        kernel_rng.standard_normal((2, 8, 8))
    _mma_f64_kernel[1, 64](cuda.to_device(a), cuda.to_device(b), cuda.to_device(c), d)
    bound = 8 * np.finfo(np.float64).eps * (np.abs(a) @ np.abs(b) + np.abs(c))
    err = np.abs(d.copy_to_host() - (a @ b + c))
    assert (err <= bound).all(), f"max error {err.max():.3g}, its bound {bound[err > bound].min():.3g}"


@cuda.jit
def _mma_s8_kernel(aw, bw, c0, d):
    """Two warps, each D = A B + C on its own 16x32 and 32x8 int8 matrices: ``aw[w, row, q]`` / ``bw[w, col, q]``
    the int32 of A's row / B's column bytes 4q..4q+3 (``mma_s8``'s fragment layout)."""
    tid = cuda.threadIdx.x
    w, lane = tid // 32, tid % 32
    g, t = lane // 4, lane % 4
    a0, a1, a2, a3 = aw[w, g, t], aw[w, g + 8, t], aw[w, g, t + 4], aw[w, g + 8, t + 4]
    b0, b1 = bw[w, g, t], bw[w, g, t + 4]
    c = (c0[w, g, 2 * t], c0[w, g, 2 * t + 1], c0[w, g + 8, 2 * t], c0[w, g + 8, 2 * t + 1])
    d0, d1, d2, d3 = K.mma_s8((a0, a1, a2, a3), (b0, b1), c)
    d[w, g, 2 * t] = d0
    d[w, g, 2 * t + 1] = d1
    d[w, g + 8, 2 * t] = d2
    d[w, g + 8, 2 * t + 1] = d3


def test_mma_s8_is_an_int8_matmul(kernel_rng: np.random.Generator) -> None:
    """The int8 MMA (the simulator's twin, or the tensor cores on a GPU) against numpy on random fragments."""
    a = kernel_rng.integers(-128, 128, (2, 16, 32)).astype(np.int8)
    b = kernel_rng.integers(-128, 128, (2, 32, 8)).astype(np.int8)
    a[0, 0], b[0, :, 0] = -128, -128                        # the largest dot: 32 x 2^14, no overflow
    aw = np.ascontiguousarray(a).view("<i4")                                    # (2, 16, 8): quads of a row
    bw = np.ascontiguousarray(b.transpose(0, 2, 1)).view("<i4")                 # (2, 8, 8): quads of a column
    c = kernel_rng.integers(-2**24, 2**24, (2, 16, 8)).astype(np.int32)
    d = cuda.to_device(np.full((2, 16, 8), -1, np.int32))
    _mma_s8_kernel[1, 64](cuda.to_device(aw), cuda.to_device(bw), cuda.to_device(c), d)
    np.testing.assert_array_equal(d.copy_to_host(), a.astype(np.int64) @ b.astype(np.int64) + c)


@cuda.jit
def _mma_f64_k16_kernel(a, b, c, d):
    """One warp: D = A B + C with A 16 x 16, B 16 x 8 in the m16n8k16 fragment layout (intrinsics)."""
    lane = cuda.threadIdx.x
    g, t = lane // 4, lane % 4
    fa = (a[g, t], a[g + 8, t], a[g, t + 4], a[g + 8, t + 4], a[g, t + 8], a[g + 8, t + 8], a[g, t + 12],
          a[g + 8, t + 12])
    fb = (b[t, g], b[t + 4, g], b[t + 8, g], b[t + 12, g])
    r = K.mma_f64_k16(fa, fb, (c[g, 2 * t], c[g, 2 * t + 1], c[g + 8, 2 * t], c[g + 8, 2 * t + 1]))
    d[g, 2 * t] = r[0]
    d[g, 2 * t + 1] = r[1]
    d[g + 8, 2 * t] = r[2]
    d[g + 8, 2 * t + 1] = r[3]


def test_mma_f64_k16_is_a_float64_matmul(kernel_rng: np.random.Generator) -> None:
    if not K.SIMULATOR and tuple(cuda.get_current_device().compute_capability) < (9, 0):
        pytest.skip("m16n8k16 float64 MMA needs sm_90")
    # integers below 2^20: every product and sum is exact, so any order gives numpy's bits
    a = kernel_rng.integers(-2**20, 2**20, (16, 16)).astype(np.float64)
    b = kernel_rng.integers(-2**20, 2**20, (16, 8)).astype(np.float64)
    c = kernel_rng.integers(-2**40, 2**40, (16, 8)).astype(np.float64)
    d = cuda.to_device(np.full((16, 8), np.nan))
    _mma_f64_k16_kernel[1, 32](cuda.to_device(a), cuda.to_device(b), cuda.to_device(c), d)
    np.testing.assert_array_equal(d.copy_to_host(), a @ b + c)


@pytest.mark.gpu
def test_dp4a_is_linked_from_cuda_cpp() -> None:
    """On a GPU the intrinsic is the linked CUDA C++ __dp4a (one IDP.4A in the SASS, no call)."""
    assert not K.SIMULATOR and K.CU_PATH.exists()
    a = np.arange(32, dtype=np.int32)
    out = cuda.device_array(32, np.int32)
    _dp4a_kernel[1, 32](cuda.to_device(a), cuda.to_device(a), cuda.to_device(a), out)
    try:
        sass = _dp4a_kernel.inspect_sass()
    except Exception as exc:  # nvdisasm missing: the numeric check above still ran
        pytest.skip(f"no SASS: {exc}")
    text = "\n".join(sass.values()) if isinstance(sass, dict) else str(sass)
    assert "IDP.4A" in text and "ds4nb_dp4a" not in text  # inlined by LTO: no call to the wrapper


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------

SHAPES = {Q.Q8_0: (3, 2, 96), Q.IQ2_XXS: (2, 3, 512), Q.Q2_K: (5, 768), Q.Q4_K: (2, 2, 512)}


@pytest.mark.parametrize("qtype", list(SHAPES), ids=lambda q: q.name)
def test_repack_round_trip_and_block_minor_order(qtype, kernel_rng: np.random.Generator) -> None:
    shape = SHAPES[qtype]
    raw = random_blocks(qtype, shape, kernel_rng)
    p = repack(raw, qtype, shape)
    assert p.nbytes == raw.size
    np.testing.assert_array_equal(unpack(p), raw)
    # word j of block b of a row sits at [.., j, b] and holds the block's qs bytes 8j..8j+7
    blocks = raw.view(BLOCK_DTYPE[qtype]).reshape(*shape[:-1], -1)
    qs_bytes = np.ascontiguousarray(blocks["qs"]).view(np.uint8).reshape(*blocks.shape, -1)
    b = blocks.shape[-1] - 1
    row = (0,) * (len(shape) - 1)
    for j in range(p.qs.shape[-2]):
        assert p.qs[row + (j, b)] == qs_bytes[row + (b,)][8 * j:8 * j + 8].view("<u8")[0]
    assert p.dm[row + (0, b)] == blocks["d"][row + (b,)]


def test_activation_layouts_round_trip(kernel_rng: np.random.Generator) -> None:
    x = kernel_rng.standard_normal((3, 512)).astype(np.float32)
    a = quantize_q8_0(x)
    xq, xd = pack_q8_0_activation(*a)
    assert xq.shape == (3, 4, 16)
    for u, v in zip(a, unpack_q8_0_activation(xq, xd)):
        np.testing.assert_array_equal(u, v)
    k = quantize_q8_K(x)
    yq, yd, ybs = pack_q8_K_activation(*k)
    assert yq.shape == (3, 32, 2) and ybs.shape == (3, 8, 2)
    # pair word p: bsums[2p] low half, bsums[2p + 1] high half
    word = int(ybs[1, 3, 1])
    assert (word & 0xFFFF) == int(k[2][1, 16 + 6]) & 0xFFFF
    assert word >> 16 == int(k[2][1, 16 + 7])
    for u, v in zip(k, unpack_q8_K_activation(yq, yd, ybs)):
        np.testing.assert_array_equal(u, v)


def test_layout_errors() -> None:
    with pytest.raises(NotImplementedError):
        repack(np.zeros(8, np.uint8), Q.F16, (2, 2))
    with pytest.raises(ValueError, match="needs"):
        repack(np.zeros(33, np.uint8), Q.Q8_0, (1, 32))
    with pytest.raises(ValueError):
        pack_q8_K_activation(np.zeros((1, 100), np.int8), np.zeros(1), np.zeros(6))



def test_every_kernel_waits_for_the_prior_grid_first() -> None:
    """Every kernel of ``ds4nb.kernels`` starts with ``wait_prior_grid()`` (after its docstring): a step
    launches it early (``_launch.Recorder``), so nothing may touch memory another grid writes before the wait.
    Before it a kernel may only compute indices (no array reads), allocate local arrays and call ``early_*``
    device functions, which read weights (nothing a grid of the step writes)."""
    import ast
    from pathlib import Path

    import ds4nb.kernels

    def index_math(stmt) -> bool:
        """An assignment without array reads or calls (but local / shared array allocations)."""
        if not isinstance(stmt, ast.Assign):
            return False
        nodes = list(ast.walk(stmt.value))
        return not any(isinstance(n, ast.Subscript) for n in nodes) and all(
            ast.unparse(n.func) in ("cuda.local.array", "cuda.shared.array") for n in nodes if isinstance(n, ast.Call))

    def early_call(stmt) -> bool:
        return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name) and stmt.value.func.id.startswith("early_"))

    found, early = [], []
    for path in sorted(Path(ds4nb.kernels.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef):
                continue
            decorators = [ast.unparse(d) for d in node.decorator_list]
            if not any((d == "cuda.jit" or d.startswith(("cuda.jit(", "jit_kernel"))) and "device=True" not in d
                       for d in decorators):
                continue
            body = node.body[1:] if isinstance(node.body[0], ast.Expr) and isinstance(
                node.body[0].value, ast.Constant) else node.body
            found.append(node.name)
            waits = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == "wait_prior_grid()"]
            assert waits, f"{path.name}: {node.name} does not wait for the prior grid"
            before = body[:waits[0]]
            assert all(index_math(st) or early_call(st) for st in before), \
                f"{path.name}: {node.name} does more than index math and early_* weight reads before the wait"
            if any(early_call(st) for st in before):
                early.append(node.name)
    assert len(found) > 40 and early, (len(found), early)
