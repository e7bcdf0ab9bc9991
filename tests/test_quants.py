"""Tests for ds4nb.quants: dequantizers vs gguf, row ranges, random blocks, activation quantization.

Every test draws fresh random data; the seed is printed (pytest shows it on
failure) and embedded in assertion messages. Reproduce with DS4NB_TEST_SEED=<seed>.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import gguf.quants
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ds4nb.quants import (
    BLOCK_DTYPE,
    block_size,
    dequantize,
    dequantize_q8_0_activation,
    dequantize_q8_K_activation,
    dequantize_rows,
    quantize_q8_0,
    quantize_q8_K,
    random_blocks,
    row_bytes,
    type_size,
)

Q = GGMLQuantizationType
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
BLOCK_TYPES = (Q.Q8_0, Q.Q4_K, Q.Q2_K, Q.IQ2_XXS)
WEIGHT_TYPES = FLOAT_TYPES + BLOCK_TYPES
N_COLS = 256  # one super-block: a valid row length for every type
FP16_FIELDS = {Q.Q8_0: ("d",), Q.Q4_K: ("d", "dmin"), Q.Q2_K: ("d", "dmin"), Q.IQ2_XXS: ("d",)}


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("DS4NB_TEST_SEED", np.random.SeedSequence().entropy % 2**63))
    print(f"seed={value}")
    return value


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def finite_random_bits(rng: np.random.Generator, n: int, dtype: str) -> np.ndarray:
    """Arbitrary bit patterns of a float dtype, NaN/inf patterns made finite by clearing the top exponent bit."""
    bits, exponent, top_exponent_bit = {
        "f2": (np.uint16, 0x7C00, 0x4000),
        "bf16": (np.uint16, 0x7F80, 0x4000),
        "f4": (np.uint32, 0x7F800000, 0x40000000),
    }[dtype]
    raw = rng.integers(0, np.iinfo(bits).max, size=n, dtype=bits, endpoint=True)
    non_finite = (raw & exponent) == exponent
    raw[non_finite] &= bits(~top_exponent_bit & np.iinfo(bits).max)
    return raw


def random_tensor_bytes(rng: np.random.Generator, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Uniformly random bytes with every fp16/f32/bf16 field made finite (any sign, subnormals included)."""
    n_bytes = int(np.prod(shape[:-1])) * row_bytes(qtype, shape[-1])
    if qtype == Q.F32:
        return finite_random_bits(rng, n_bytes // 4, "f4").view(np.uint8)
    if qtype in (Q.F16, Q.BF16):
        return finite_random_bits(rng, n_bytes // 2, "f2" if qtype == Q.F16 else "bf16").view(np.uint8)
    raw = rng.integers(0, 256, size=n_bytes, dtype=np.uint8)
    blocks = raw.view(BLOCK_DTYPE[qtype])
    for field in FP16_FIELDS[qtype]:
        blocks[field] = finite_random_bits(rng, blocks.shape[0], "f2").view(np.float16)
    return raw


def gguf_dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(*shape[:-1], row_bytes(qtype, shape[-1]))
    if qtype in FLOAT_TYPES:
        rows = rows.view({Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.uint8}[qtype])
    return np.asarray(gguf.quants.dequantize(rows, qtype), dtype=np.float32).reshape(shape)


# --------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("qtype", (*WEIGHT_TYPES, Q.I32), ids=lambda q: q.name)
def test_sizes_follow_gguf(qtype: GGMLQuantizationType) -> None:
    bs, ts = GGML_QUANT_SIZES[qtype]
    assert (block_size(qtype), type_size(qtype)) == (bs, ts)
    assert row_bytes(qtype, 4 * bs) == 4 * ts
    if qtype in BLOCK_DTYPE:
        assert BLOCK_DTYPE[qtype].itemsize == ts
        with pytest.raises(ValueError):
            row_bytes(qtype, bs + 1)


# --------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_dequantize_equals_gguf(qtype: GGMLQuantizationType, rng: np.random.Generator, seed: int) -> None:
    # Exact equality: each dequantizer does the same float32 operations in the
    # same order as ggml's reference (and gguf's port of it), so no rounding slack.
    shape = (3, 5, 2 * N_COLS)
    raw = random_tensor_bytes(rng, qtype, shape)
    ours = dequantize(raw, qtype, shape)
    assert ours.dtype == np.float32 and ours.shape == shape
    np.testing.assert_array_equal(ours, gguf_dequantize(raw, qtype, shape), err_msg=f"seed={seed}")


def test_dequantize_i32_passthrough(rng: np.random.Generator) -> None:
    table = rng.integers(-(2**31), 2**31 - 1, size=(7, 6), dtype=np.int32)
    out = dequantize(table.view(np.uint8).reshape(-1), Q.I32, (7, 6))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, table)


def test_dequantize_checks_byte_count() -> None:
    with pytest.raises(ValueError):
        dequantize(np.zeros(33, np.uint8), Q.Q8_0, (1, 32))


def test_dequantize_accepts_readonly_memmap(tmp_path, rng: np.random.Generator) -> None:
    shape = (4, 512)
    raw = random_tensor_bytes(rng, Q.IQ2_XXS, shape)
    path = tmp_path / "t.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    np.testing.assert_array_equal(dequantize(mm, Q.IQ2_XXS, shape), dequantize(raw, Q.IQ2_XXS, shape))


# --------------------------------------------------------------------------- row ranges


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_dequantize_rows_equals_full_rows(qtype: GGMLQuantizationType, rng: np.random.Generator, seed: int) -> None:
    n_rows, n_cols = 37, 2 * N_COLS
    raw = random_tensor_bytes(rng, qtype, (n_rows, n_cols))
    full = dequantize(raw, qtype, (n_rows, n_cols))
    start = int(rng.integers(0, n_rows))
    stop = int(rng.integers(start, n_rows + 1))
    part = dequantize_rows(raw, qtype, n_cols, start, stop)
    assert part.shape == (stop - start, n_cols)
    np.testing.assert_array_equal(part, full[start:stop], err_msg=f"seed={seed} rows=[{start},{stop})")


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_dequantize_rows_ignores_garbage_rows(qtype: GGMLQuantizationType, tmp_path, rng: np.random.Generator) -> None:
    """Rows outside the range are all-0xFF (NaN scales / NaN floats) in a read-only memmap."""
    n_rows, n_cols, start, stop = 11, N_COLS, 4, 7
    rb = row_bytes(qtype, n_cols)
    good = random_blocks(qtype, (stop - start, n_cols), rng, rms=0.5)
    raw = np.full(n_rows * rb, 0xFF, dtype=np.uint8)
    raw[start * rb : stop * rb] = good
    path = tmp_path / "garbage.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    with np.errstate(all="raise"):
        part = dequantize_rows(mm, qtype, n_cols, start, stop)
    np.testing.assert_array_equal(part, dequantize(good, qtype, (stop - start, n_cols)))
    assert np.isfinite(part).all()


_GUARD_SCRIPT = textwrap.dedent(
    """
    import ctypes, mmap, sys
    import numpy as np
    from gguf.constants import GGMLQuantizationType as Q
    from ds4nb.quants import dequantize, dequantize_rows, random_blocks, row_bytes

    PAGE = mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rng = np.random.default_rng(int(sys.argv[1]))

    def up(n):
        return -(-n // PAGE) * PAGE

    for name in sys.argv[2:]:
        qtype = Q[name]
        n_cols = 256
        rb = row_bytes(qtype, n_cols)
        # A row span whose byte length is a whole number of pages.
        span_rows = PAGE // int(np.gcd(rb, PAGE))
        start, stop, n_rows = 3, 3 + span_rows, span_rows + 5
        before, span, after = start * rb, span_rows * rb, (n_rows - stop) * rb
        head = up(before) + PAGE  # guard pages before the span
        size = head + span + up(after) + PAGE
        buf = mmap.mmap(-1, size)
        tensor = np.frombuffer(buf, dtype=np.uint8, count=n_rows * rb, offset=head - before)
        good = random_blocks(qtype, (span_rows, n_cols), rng, rms=1.0)
        tensor[before : before + span] = good
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert libc.mprotect(addr, head, 0) == 0
        assert libc.mprotect(addr + head + span, size - head - span, 0) == 0
        part = dequantize_rows(tensor, qtype, n_cols, start, stop)  # faults if it reads other rows
        assert np.array_equal(part, dequantize(good, qtype, (span_rows, n_cols))), name
        print("ok", name, flush=True)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs mprotect via libc")
def test_dequantize_rows_reads_only_its_rows(seed: int) -> None:
    """The bytes of all other rows sit in PROT_NONE pages: any read of them kills the child."""
    names = [q.name for q in WEIGHT_TYPES]
    proc = subprocess.run(
        [sys.executable, "-c", _GUARD_SCRIPT, str(seed), *names],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"seed={seed} rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.split() == [w for n in names for w in ("ok", n)]


# --------------------------------------------------------------------------- random blocks


@pytest.mark.parametrize("qtype", WEIGHT_TYPES, ids=lambda q: q.name)
def test_random_blocks_rms_finite_deterministic(qtype: GGMLQuantizationType, rng: np.random.Generator, seed: int) -> None:
    shape = (2, 16, 4096)  # 256 blocks of 256 for the K/IQ types
    rms = float(np.exp(rng.uniform(np.log(0.01), np.log(10.0))))
    state = rng.bit_generator.state
    raw = random_blocks(qtype, shape, rng, rms=rms)
    assert raw.dtype == np.uint8 and raw.shape == (int(np.prod(shape[:-1])) * row_bytes(qtype, shape[-1]),)

    values = dequantize(raw, qtype, shape).astype(np.float64)
    assert np.isfinite(values).all()
    assert np.isfinite(gguf_dequantize(raw, qtype, shape)).all()
    measured = float(np.sqrt(np.mean(values**2)))
    assert abs(measured / rms - 1) < 0.15, f"seed={seed} rms={rms} measured={measured}"
    assert abs(values.mean()) < 0.2 * rms, f"seed={seed} mean={values.mean()}"

    rng.bit_generator.state = state
    np.testing.assert_array_equal(random_blocks(qtype, shape, rng, rms=rms), raw)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_random_blocks_scales_vary_per_block(qtype: GGMLQuantizationType, rng: np.random.Generator) -> None:
    blocks = random_blocks(qtype, (4, 1024), rng, rms=0.05).view(BLOCK_DTYPE[qtype])
    for field in FP16_FIELDS[qtype]:
        d = blocks[field].astype(np.float32)
        assert np.isfinite(d).all() and (d > 0).all()
        assert len(np.unique(d)) > 1


def test_random_blocks_rejects_unrepresentable_rms(rng: np.random.Generator) -> None:
    with pytest.raises(ValueError):
        random_blocks(Q.Q4_K, (1, 256), rng, rms=1e-6)
    with pytest.raises(ValueError):
        random_blocks(Q.F16, (1, 256), rng, rms=1e5)


# --------------------------------------------------------------------------- activation quantization
# Independent twins: one block at a time, one element at a time, with numpy
# float32 scalars for the reference's float arithmetic and Python's round()
# (round-half-to-even, like lrintf in the default rounding mode).

F32 = np.float32


def q8_0_block_twin(x: np.ndarray) -> tuple[list[int], np.float32]:
    amax = F32(0)
    for v in x:
        amax = max(amax, abs(v))
    d = amax / F32(127)
    inv_d = F32(1) / d if d != 0 else F32(0)
    return [min(127, max(-128, round(float(v * inv_d)))) for v in x], d


def q8_K_block_twin(x: np.ndarray) -> tuple[list[int], np.float32, list[int]]:
    amax, signed_max = F32(0), F32(0)
    for v in x:
        if abs(v) > amax:
            amax, signed_max = abs(v), v
    if amax == 0:
        return [0] * len(x), F32(0), [0] * (len(x) // 16)
    iscale = F32(-127) / signed_max
    qs = [min(127, max(-128, round(float(iscale * v)))) for v in x]
    return qs, F32(1) / iscale, [sum(qs[i : i + 16]) for i in range(0, len(x), 16)]


def tricky_activation(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian rows of mixed scale plus zeros, exact-tie values and repeated extremes."""
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 4))).astype(np.float32)
    x[rng.random(n) < 0.05] = 0
    # A block whose amax is 127 has d == 1 (Q8_0): halves are exact rounding ties.
    x[:32] = (rng.integers(-254, 255, 32) / 2).astype(np.float32)
    x[0] = 127.0
    x[1:4] = (2.5, -2.5, 3.5)  # ties: the first two round toward zero under half-to-even
    return x


# Below ~1e-36 a block's 1/d overflows to inf; the reference's lrintf is then
# undefined too, so the domain stops at 1e-30 (real activations never get close).
float32s = st.floats(-1e4, 1e4, width=32).map(lambda v: 0.0 if abs(v) < 1e-30 else v)
activation_rows = hnp.arrays(np.float32, st.sampled_from([256, 512]), elements=float32s)


def test_quantize_q8_0_matches_twin(rng: np.random.Generator, seed: int) -> None:
    x = tricky_activation(rng, 8 * 32).reshape(2, 128)
    x[1, 32:64] = 0  # an all-zero block
    qs, d = quantize_q8_0(x)
    assert qs.dtype == np.int8 and qs.shape == (2, 128) and d.dtype == np.float32 and d.shape == (2, 4)
    for r in range(2):
        for b in range(4):
            tq, td = q8_0_block_twin(x[r, 32 * b : 32 * b + 32])
            assert qs[r, 32 * b : 32 * b + 32].tolist() == tq, f"seed={seed} row={r} block={b}"
            assert d[r, b] == td


@settings(max_examples=60, deadline=None)
@given(activation_rows)
def test_quantize_q8_0_matches_twin_hypothesis(x: np.ndarray) -> None:
    qs, d = quantize_q8_0(x)
    for b in range(len(x) // 32):
        tq, td = q8_0_block_twin(x[32 * b : 32 * b + 32])
        assert qs[32 * b : 32 * b + 32].tolist() == tq and d[b] == td


def test_quantize_q8_0_against_gguf(rng: np.random.Generator, seed: int) -> None:
    """gguf's Q8_0 quantizer differs by design in two places: it stores d as fp16
    and rounds half away from zero. Everything else must agree."""
    x = tricky_activation(rng, 64 * 32)
    qs, d = quantize_q8_0(x)
    ref = np.asarray(gguf.quants.quantize(x.reshape(1, -1), Q.Q8_0)).reshape(-1, 34)
    ref_d = ref[:, :2].copy().view(np.float16)[:, 0]
    ref_qs = ref[:, 2:].copy().view(np.int8).reshape(-1)
    np.testing.assert_array_equal(d.astype(np.float16), ref_d, err_msg=f"seed={seed}")

    scaled = x.reshape(-1, 32) * np.where(d != 0, F32(1) / np.where(d != 0, d, 1), F32(0))[:, None]
    tie = (np.abs(scaled) % 1 == 0.5).reshape(-1)
    np.testing.assert_array_equal(qs[~tie], ref_qs[~tie], err_msg=f"seed={seed}")
    assert tie.any(), "the tricky block should contain rounding ties"
    # Ties: ours is half-to-even, gguf's half-away-from-zero.
    s_tie = scaled.reshape(-1)[tie]
    np.testing.assert_array_equal(qs[tie], np.rint(s_tie))
    np.testing.assert_array_equal(ref_qs[tie], np.sign(s_tie) * np.floor(np.abs(s_tie) + 0.5))
    assert qs[1:3].tolist() == [2, -2] and ref_qs[1:3].tolist() == [3, -3]


def test_quantize_q8_0_partial_block_and_roundtrip(rng: np.random.Generator) -> None:
    x = rng.standard_normal((3, 100)).astype(np.float32)
    qs, d = quantize_q8_0(x)
    assert qs.shape == (3, 100) and d.shape == (3, 4)
    for r in range(3):
        tq, td = q8_0_block_twin(x[r, 96:])
        assert qs[r, 96:].tolist() == tq and d[r, 3] == td
    back = dequantize_q8_0_activation(qs, d)
    assert back.shape == x.shape and back.dtype == np.float32
    err_bound = np.repeat(d, 32, axis=-1)[:, :100] * 0.5001
    assert (np.abs(back - x) <= err_bound).all()


def test_quantize_q8_K_matches_twin(rng: np.random.Generator, seed: int) -> None:
    x = tricky_activation(rng, 6 * 256).reshape(2, 3, 256)
    x[0, 1] = 0  # all-zero block
    x[1, 0, :] = rng.standard_normal(256).astype(np.float32)
    x[1, 0, 10], x[1, 0, 20] = -5.0, 5.0  # magnitude tie: the first (negative) one sets the sign
    x[1, 2] = -np.abs(x[1, 2])  # negative maximum
    qs, d, bsums = quantize_q8_K(x.reshape(2, 768))
    assert (qs.dtype, d.dtype, bsums.dtype) == (np.int8, np.float32, np.int16)
    assert qs.shape == (2, 768) and d.shape == (2, 3) and bsums.shape == (2, 48)
    assert d[1, 0] > 0 and qs[1, 10] == -127 and qs[1, 20] == 127
    for r in range(2):
        for b in range(3):
            tq, td, tsums = q8_K_block_twin(x[r, b])
            sl = slice(256 * b, 256 * b + 256)
            assert qs[r, sl].tolist() == tq, f"seed={seed} row={r} block={b}"
            assert d[r, b] == td
            assert bsums[r, 16 * b : 16 * b + 16].tolist() == tsums


@settings(max_examples=60, deadline=None)
@given(activation_rows)
def test_quantize_q8_K_matches_twin_hypothesis(x: np.ndarray) -> None:
    qs, d, bsums = quantize_q8_K(x)
    for b in range(len(x) // 256):
        tq, td, tsums = q8_K_block_twin(x[256 * b : 256 * b + 256])
        assert qs[256 * b : 256 * b + 256].tolist() == tq and d[b] == td
        assert bsums[16 * b : 16 * b + 16].tolist() == tsums


def test_quantize_q8_K_float64_properties(rng: np.random.Generator, seed: int) -> None:
    """Against the plain float64 formula: q = round(-127 * x / m), |x - d q| <= |d| / 2."""
    x = rng.standard_normal((5, 1024)).astype(np.float32) * F32(3)
    qs, d, bsums = quantize_q8_K(x)
    blocks = x.reshape(5, 4, 256).astype(np.float64)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    exact = -127 * blocks / m
    q = qs.reshape(5, 4, 256).astype(np.float64)
    assert (np.abs(q - exact) <= 0.5 + 1e-4).all(), f"seed={seed}"
    np.testing.assert_allclose(d, -m[..., 0] / 127, rtol=1e-6)
    recon = dequantize_q8_K_activation(qs, d).reshape(5, 4, 256)
    assert (np.abs(recon - blocks) <= np.abs(d)[..., None] * 0.5001).all()
    np.testing.assert_array_equal(bsums, qs.reshape(5, 64, 16).sum(-1, dtype=np.int32))


def test_quantize_q8_K_requires_full_blocks() -> None:
    with pytest.raises(ValueError):
        quantize_q8_K(np.ones(300, np.float32))
