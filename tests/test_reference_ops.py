"""The small ops of the numpy oracle against independent, straightforward computations.

Each test recomputes an op the obvious way (float64 loops, explicit matrices,
brute-force searches) on fresh random inputs and compares.  docs/model.md
step numbers are in the test names' docstrings.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from ds4nb.model.loader import TensorInfo
from ds4nb.quants import quantize_q8_0, random_blocks
from ds4nb.reference import ops
from ds4nb.reference.weights import Q8Matrix, q8_0_round_trip

F32 = np.float32
seeds = st.integers(0, 2**32 - 1)


def rng_of(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# step 2-6: RMSNorm


@given(seeds, st.integers(1, 300), st.booleans())
def test_rms_norm_matches_float64(seed: int, n: int, weighted: bool) -> None:
    """docs/model.md conventions: rms(x; w) = x / sqrt(mean(x^2) + eps) * w."""
    rng = rng_of(seed)
    x = (rng.standard_normal((3, n)) * rng.uniform(1e-3, 1e3)).astype(F32)
    w = rng.standard_normal(n).astype(F32) if weighted else None
    got = ops.rms_norm(x, w, 1e-6)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)
    if weighted:
        want = want * w
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
    assert got.dtype == np.float32


def test_head_rms_norm_normalises_each_head() -> None:
    """docs/model.md step 5.4: each head has unit RMS afterwards."""
    rng = rng_of(1)
    q = (rng.standard_normal((2, 6 * 16)) * rng.uniform(0.1, 10, (2, 96))).astype(F32)
    out = ops.head_rms_norm(q, 6, 16, 1e-6).reshape(2, 6, 16)
    np.testing.assert_allclose(np.sqrt((out.astype(np.float64) ** 2).mean(-1)), 1.0, rtol=1e-5)


# ---------------------------------------------------------------------------
# step 3: Sinkhorn


def sinkhorn_f64(mix, scale, base, n, iters, eps):
    """Textbook Sinkhorn in float64 with the reference's eps placement."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    mix, scale, base = (np.asarray(a, np.float64) for a in (mix, scale, base))
    pre = sig(mix[:n] * scale[0] + base[:n]) + eps
    post = 2 * sig(mix[n:2 * n] * scale[1] + base[n:2 * n])
    c = (mix[2 * n:] * scale[2] + base[2 * n:]).reshape(n, n)
    c = np.exp(c - c.max(1, keepdims=True))
    c = c / c.sum(1, keepdims=True) + eps
    c = c / (c.sum(0, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(1, keepdims=True) + eps)
        c = c / (c.sum(0, keepdims=True) + eps)
    return pre, post, c


@given(seeds, st.integers(2, 6), st.integers(1, 25))
def test_sinkhorn_matches_float64(seed: int, n: int, iters: int) -> None:
    """docs/model.md step 3 against a float64 transcription of the same recipe."""
    rng = rng_of(seed)
    mix = rng.standard_normal(2 * n + n * n).astype(F32)
    scale = rng.uniform(0.1, 2, 3).astype(F32)
    base = rng.standard_normal(2 * n + n * n).astype(F32)
    got = ops.hc_split_sinkhorn(mix, scale, base, n, iters, 1e-6)
    pre, post, comb = sinkhorn_f64(mix, scale, base, n, iters, 1e-6)
    np.testing.assert_allclose(got.pre, pre, rtol=1e-6)
    np.testing.assert_allclose(got.post, post, rtol=1e-6)
    np.testing.assert_allclose(got.comb, comb, rtol=1e-5, atol=1e-7)


@given(seeds)
def test_sinkhorn_is_doubly_stochastic(seed: int) -> None:
    """docs/model.md step 3: columns sum to 1 after the last step; rows converge to 1."""
    rng = rng_of(seed)
    n = 4
    mix = rng.standard_normal((5, 2 * n + n * n)).astype(F32)  # a batch of 5 tokens
    scale = np.array([1.0, 1.0, 0.5], F32)
    base = np.zeros(2 * n + n * n, F32)
    got = ops.hc_split_sinkhorn(mix, scale, base, n, 20, 1e-6)
    c = got.comb.astype(np.float64)
    np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)
    long = ops.hc_split_sinkhorn(mix, scale, base, n, 400, 1e-6).comb.astype(np.float64)
    np.testing.assert_allclose(long.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_allclose(long.sum(-2), 1.0, atol=1e-5)
    assert (c > 0).all() and got.pre.shape == (5, n) and got.post.shape == (5, n)
    assert ((got.post > 0) & (got.post < 2)).all()


def test_hc_pre_and_post_match_einsum() -> None:
    """docs/model.md steps 2 and 14: weighted sum and expansion as matrix products."""
    rng = rng_of(2)
    hc = rng.standard_normal((3, 4, 64)).astype(F32)
    w = rng.uniform(0, 1, (3, 4)).astype(F32)
    np.testing.assert_allclose(ops.hc_weighted_sum(hc, w), np.einsum("thd,th->td", hc, w), rtol=1e-5, atol=1e-6)
    y = rng.standard_normal((3, 64)).astype(F32)
    post = rng.uniform(0, 2, (3, 4)).astype(F32)
    comb = rng.uniform(0, 1, (3, 4, 4)).astype(F32)
    want = post[:, :, None] * y[:, None, :] + np.einsum("tij,tid->tjd", comb, hc)
    np.testing.assert_allclose(ops.hc_post(y, hc, post, comb), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# step 7: RoPE / YaRN

PLAIN = ops.make_rope(16, compressed=False, freq_base=10000.0, compress_freq_base=160000.0,
                      scale_factor=16.0, orig_ctx=65536, beta_fast=32.0, beta_slow=1.0)
YARN = ops.make_rope(16, compressed=True, freq_base=10000.0, compress_freq_base=160000.0,
                     scale_factor=16.0, orig_ctx=65536, beta_fast=32.0, beta_slow=1.0)


@given(seeds, st.integers(0, 5000), st.sampled_from([PLAIN, YARN]), st.booleans())
def test_rope_is_complex_multiplication(seed: int, pos: int, rope: ops.Rope, inverse: bool) -> None:
    """docs/model.md steps 7 and 12: tail pairs times e^(+-i theta), the rest untouched."""
    rng = rng_of(seed)
    x = rng.standard_normal((3, 40)).astype(F32)
    got = ops.apply_rope_tail(x, rope, pos, inverse=inverse)
    assert np.array_equal(got[:, :24], x[:, :24])
    theta = ops.rope_thetas(rope, pos).astype(np.float64)
    z = x[:, 24::2].astype(np.float64) + 1j * x[:, 25::2]
    rot = z * np.exp((-1j if inverse else 1j) * theta) * rope.mscale
    np.testing.assert_allclose(got[:, 24::2], rot.real, atol=2e-6)
    np.testing.assert_allclose(got[:, 25::2], rot.imag, atol=2e-6)


@given(seeds, st.integers(0, 5000), st.sampled_from([PLAIN, YARN]))
def test_inverse_rope_undoes_rope(seed: int, pos: int, rope: ops.Rope) -> None:
    x = rng_of(seed).standard_normal((2, 32)).astype(F32)
    back = ops.apply_rope_tail(ops.apply_rope_tail(x, rope, pos), rope, pos, inverse=True)
    np.testing.assert_allclose(back, x, atol=2e-6)


@given(st.integers(0, 100000))
def test_plain_rope_frequencies_follow_the_formula(pos: int) -> None:
    """docs/model.md step 7: theta_k = pos * base^(-2k/n_rot) on window-only layers."""
    k = np.arange(8)
    want = pos * 10000.0 ** (-2.0 * k / 16)
    np.testing.assert_allclose(ops.rope_thetas(PLAIN, pos), want, rtol=2e-6)


def yarn_thetas_f64(pos, n_rot, base, scale, orig_ctx, beta_fast, beta_slow):
    """YaRN 'NTK-by-parts' angles, written from the formula in float64."""
    def corr(beta):
        return n_rot * math.log(orig_ctx / (beta * 2 * math.pi)) / (2 * math.log(base))
    low = max(0.0, math.floor(corr(beta_fast)))
    high = min(n_rot - 1.0, math.ceil(corr(beta_slow)))
    k = np.arange(n_rot // 2)
    ramp = 1 - np.clip((k - low) / max(0.001, high - low), 0, 1)
    ext = pos * base ** (-2.0 * k / n_rot)
    return ext / scale * (1 - ramp) + ext * ramp, (low, high)


@given(st.integers(0, 100000), st.sampled_from([16, 32, 64]))
def test_yarn_frequencies_follow_the_formula(pos: int, n_rot: int) -> None:
    """docs/model.md step 7 on compressed layers: interpolation blended by the ramp."""
    rope = ops.make_rope(n_rot, compressed=True, freq_base=10000.0, compress_freq_base=160000.0,
                         scale_factor=16.0, orig_ctx=65536, beta_fast=32.0, beta_slow=1.0)
    want, dims = yarn_thetas_f64(pos, n_rot, 160000.0, 16.0, 65536, 32.0, 1.0)
    assert (rope.corr_low, rope.corr_high) == dims
    assert rope.freq_base == 160000.0 and rope.freq_scale == 1 / 16
    assert abs(rope.mscale - 1.0) < 1e-6
    np.testing.assert_allclose(ops.rope_thetas(rope, pos), want, rtol=4e-6)


def test_yarn_corr_dims_of_ds4_flash() -> None:
    """The DS4 Flash ramp runs from pair 15 to pair 25 (docs/model.md step 7)."""
    assert ops.yarn_corr_dims(64, 65536, 160000.0, 32.0, 1.0) == (15.0, 25.0)


# ---------------------------------------------------------------------------
# steps 8-10: FP8 / FP4 / Hadamard round trips


def e4m3_values_f64() -> np.ndarray:
    vals = []
    for code in range(127):
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return np.array(vals)


def nearest_even_code(values: np.ndarray, ax: float) -> float:
    d = np.abs(values - ax)
    best = np.flatnonzero(d == d.min())
    even = [i for i in best if i % 2 == 0]
    return float(values[even[0] if even else best[0]])


@given(seeds)
def test_e4m3_rounds_to_nearest_even_code(seed: int) -> None:
    rng = rng_of(seed)
    vals = e4m3_values_f64()
    mids = ((vals[1:] + vals[:-1]) / 2).astype(F32)  # exact ties are representable in float32
    x = np.concatenate([rng.standard_normal(200) * 10.0 ** rng.uniform(-3, 3, 200), mids, -mids,
                        [0.0, 448.0, 500.0, -1e6]]).astype(F32)
    got = ops.e4m3_round(x)
    want = [math.copysign(nearest_even_code(vals, min(abs(float(v)), 448.0)), float(v)) for v in x]
    np.testing.assert_array_equal(got, np.array(want, F32))


@given(seeds)
def test_e2m1_rounds_to_nearest_even_code(seed: int) -> None:
    rng = rng_of(seed)
    vals = ops.E2M1_VALUES.astype(np.float64)
    mids = ((vals[1:] + vals[:-1]) / 2).astype(F32)
    x = np.concatenate([rng.uniform(-8, 8, 100), mids, -mids]).astype(F32)
    want = [math.copysign(nearest_even_code(vals, min(abs(float(v)), 6.0)), float(v)) for v in x]
    np.testing.assert_array_equal(ops.e2m1_round(x), np.array(want, F32))


@given(seeds, st.sampled_from([(64, 16), (112, 16), (512, 64), (128, 32)]))
def test_fp8_kv_round_trip(seed: int, dims: tuple[int, int]) -> None:
    """docs/model.md step 8: the non-rotated dims become scaled E4M3 values; the tail is untouched."""
    head_dim, n_rot = dims
    rng = rng_of(seed)
    x = (rng.standard_normal((2, head_dim)) * rng.uniform(1e-3, 1e3)).astype(F32)
    out = ops.fp8_kv_round(x, n_rot)
    n_nope = head_dim - n_rot
    assert np.array_equal(out[:, n_nope:], x[:, n_nope:])
    vals = e4m3_values_f64()
    for row_in, row_out in zip(x, out):
        for a in range(0, n_nope, 64):
            b = min(a + 64, n_nope)  # a trailing partial block is its own block
            seg, got = row_in[a:b].astype(np.float64), row_out[a:b].astype(np.float64)
            scale = 2.0 ** math.ceil(math.log2(max(np.abs(seg).max(), 1e-4) / 448))
            want = [math.copysign(nearest_even_code(vals, min(abs(v) / scale, 448.0)), v) * scale for v in seg]
            np.testing.assert_allclose(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("n", [32, 64, 128])
def test_hadamard_is_the_sylvester_matrix(n: int) -> None:
    """docs/model.md step 9: orthonormal Walsh-Hadamard transform (Sylvester order)."""
    h = np.array([[1.0]])
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    x = rng_of(n).standard_normal((3, n)).astype(F32)
    np.testing.assert_allclose(ops.hadamard(x), x.astype(np.float64) @ h.T / math.sqrt(n), atol=2e-6)
    np.testing.assert_allclose(ops.hadamard(ops.hadamard(x)), x, atol=2e-6)


@given(seeds)
def test_indexer_qat_values_are_scaled_fp4(seed: int) -> None:
    """docs/model.md steps 9-10: after the rotation every value is an E2M1 value times its block scale."""
    x = (rng_of(seed).standard_normal((2, 64)) * 3).astype(F32)
    rot = ops.hadamard(x).astype(np.float64)
    out = ops.indexer_qat(x).astype(np.float64)
    for r_in, r_out in zip(rot, out):
        for a in range(0, 64, 32):
            scale = 2.0 ** math.ceil(math.log2(np.abs(r_in[a:a + 32]).max() / 6))
            q = np.abs(r_out[a:a + 32]) / scale
            assert np.isin(q, ops.E2M1_VALUES).all()
            assert np.abs(r_out[a:a + 32] - r_in[a:a + 32]).max() <= scale  # half the widest gap (2)


# ---------------------------------------------------------------------------
# step 11: attention with sinks


@given(seeds, st.integers(0, 12), st.booleans())
def test_attention_with_sinks_is_softmax_with_an_extra_logit(seed: int, n_rows: int, masked: bool) -> None:
    rng = rng_of(seed)
    q = rng.standard_normal((3, 16)).astype(F32) * 2
    rows = rng.standard_normal((n_rows, 16)).astype(F32)
    sinks = rng.standard_normal(3).astype(F32)
    visible = rng.random(n_rows) < 0.6 if masked else None
    got = ops.attention_with_sinks(q, rows, sinks, visible)
    keep = np.ones(n_rows, bool) if visible is None else visible
    r = rows[keep].astype(np.float64)
    logits = np.concatenate([sinks[:, None].astype(np.float64), q.astype(np.float64) @ r.T / 4.0], axis=1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = p[:, 1:] @ r  # the sink's probability carries no value
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# steps 9-10: compressor pooling, indexer scores


@given(seeds, st.sampled_from([2, 4, 16]), st.booleans(), st.integers(0, 3))
def test_compressor_pool_is_a_per_dim_softmax(seed: int, ratio: int, overlap: bool, n_empty: int) -> None:
    rng = rng_of(seed)
    d = 8
    rows, width = (2 * ratio, 2 * d) if overlap else (ratio, d)
    kv = rng.standard_normal((rows, width)).astype(F32)
    score = rng.standard_normal((rows, width)).astype(F32) * 3
    score[:min(n_empty, rows)] = ops.NEG_INF  # empty previous-window slots
    kv[:min(n_empty, rows)] = 0
    got = ops.compressor_pool(kv, score, d, ratio, overlap)
    if overlap:
        cand_s = np.concatenate([score[:ratio, :d], score[ratio:, d:]]).astype(np.float64)
        cand_v = np.concatenate([kv[:ratio, :d], kv[ratio:, d:]]).astype(np.float64)
    else:
        cand_s, cand_v = score.astype(np.float64), kv.astype(np.float64)
    live = cand_s > -1e29
    w = np.where(live, np.exp(np.where(live, cand_s, 0) - np.where(live, cand_s, -np.inf).max(0)), 0)
    want = np.where(live.any(0), (w * cand_v).sum(0) / np.maximum(w.sum(0), 1e-300), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_compressor_pool_of_an_empty_window_is_zero() -> None:
    kv = np.ones((8, 16), F32)
    score = np.full((8, 16), ops.NEG_INF, F32)
    assert np.array_equal(ops.compressor_pool(kv, score, 8, 4, True), np.zeros(8, F32))


@given(seeds, st.integers(1, 20))
def test_indexer_scores_and_top_k(seed: int, n_comp: int) -> None:
    """docs/model.md step 10c-d."""
    rng = rng_of(seed)
    q = rng.standard_normal((4, 32)).astype(F32)
    w = rng.standard_normal(4).astype(F32)
    rows = rng.standard_normal((n_comp, 32)).astype(F32)
    got = ops.indexer_scores(q, w, rows)
    want = [sum(max(0.0, float(rows[c].astype(np.float64) @ q[h])) * float(w[h]) for h in range(4))
            for c in range(n_comp)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    k = min(4, n_comp)
    top = ops.top_k_stable(got, k)
    assert sorted(got[top].tolist(), reverse=True) == sorted(got.tolist(), reverse=True)[:k]


def test_top_k_breaks_ties_towards_the_lower_index() -> None:
    s = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 3.0], F32)
    assert ops.top_k_stable(s, 4).tolist() == [1, 3, 5, 2]


# ---------------------------------------------------------------------------
# steps 16-18: router and SwiGLU


@given(seeds, st.booleans())
def test_router_weights(seed: int, with_bias: bool) -> None:
    """docs/model.md step 16: sqrt(softplus) affinities, biased choice, unbiased normalised weights."""
    rng = rng_of(seed)
    logits = (rng.standard_normal(16) * 8).astype(F32)
    p = ops.router_probs(logits)
    np.testing.assert_allclose(p, np.sqrt(np.log1p(np.exp(logits.astype(np.float64)))), rtol=1e-6)
    bias = rng.standard_normal(16).astype(F32) if with_bias else None
    sel = ops.select_experts_topk(p, bias, 4)
    score = p + (bias if with_bias else 0)
    assert set(sel.tolist()) == set(np.argsort(-score.astype(np.float64), kind="stable")[:4].tolist())
    w = ops.route_weights(p[sel], 1.5, True)
    np.testing.assert_allclose(w, p[sel] / p[sel].sum() * 1.5, rtol=1e-6)
    np.testing.assert_allclose(ops.route_weights(p[sel], 1.5, False), p[sel] * 1.5, rtol=1e-7)


def test_route_weights_floor_the_sum() -> None:
    tiny = np.array([1e-6, 2e-6], F32)
    np.testing.assert_allclose(ops.route_weights(tiny, 1.0, True), tiny / 6.103515625e-5, rtol=1e-6)


@given(seeds, st.sampled_from([0.0, 1e-7, 0.5, 10.0]))
def test_swiglu_clamp(seed: int, clamp: float) -> None:
    """docs/model.md steps 17-18: gate clamped above only, up clamped both sides."""
    rng = rng_of(seed)
    g = (rng.standard_normal(64) * 20).astype(np.float64)
    u = (rng.standard_normal(64) * 20).astype(np.float64)
    if clamp > 1e-6:
        gc, uc = np.minimum(g, clamp), np.clip(u, -clamp, clamp)
    else:
        gc, uc = g, u
    want = gc / (1 + np.exp(-gc)) * uc
    np.testing.assert_allclose(ops.swiglu_clamped(g.astype(F32), u.astype(F32), clamp), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# activation quantisation: the Q8_0 product


def q8_tensor(n_out: int, n_in: int, seed: int) -> TensorInfo:
    raw = random_blocks(Q.Q8_0, (n_out, n_in), rng_of(seed))
    return TensorInfo("w", None, None, Q.Q8_0, (n_out, n_in), raw.size, 0, raw)


@given(seeds, st.integers(1, 5))
@settings(max_examples=30)
def test_q8_0_product_is_the_block_formula(seed: int, n_tok: int) -> None:
    """sum_b (d_w d_x) * sum_k q_w q_x (ds4.c:2958-3018): the exact sum (rationals), rounded once."""
    n_out, n_in = 37, 96
    t = q8_tensor(n_out, n_in, seed)
    x = rng_of(seed + 1).standard_normal((n_tok, n_in)).astype(F32)
    got = Q8Matrix(t).matmul(x)
    blocks = t.data.view([("d", "<f2"), ("qs", "i1", (32,))]).reshape(n_out, n_in // 32)
    xq, xd = quantize_q8_0(x)
    for tok in range(n_tok):
        for o in range(n_out):
            acc = Fraction(0)
            for b in range(n_in // 32):
                dot = int(blocks["qs"][o, b].astype(np.int32) @ xq[tok, b * 32:(b + 1) * 32].astype(np.int32))
                acc += Fraction(float(blocks["d"][o, b])) * Fraction(float(xd[tok, b])) * dot
            assert got[tok, o] == F32(float(acc))
    w = t.data.view([("d", "<f2"), ("qs", "i1", (32,))])
    dense = (w["qs"].astype(np.float64) * w["d"].astype(np.float64)[:, None]).reshape(n_out, n_in)
    np.testing.assert_allclose(got, q8_0_round_trip(x).astype(np.float64) @ dense.T, rtol=1e-5, atol=1e-4)


def test_q8_0_product_is_batch_invariant() -> None:
    t = q8_tensor(50, 64, 7)
    x = rng_of(8).standard_normal((6, 64)).astype(F32)
    m = Q8Matrix(t)
    assert np.array_equal(m.matmul(x), np.concatenate([m.matmul(x[i:i + 1]) for i in range(6)]))
