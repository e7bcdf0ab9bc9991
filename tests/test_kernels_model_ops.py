"""The model kernels (HC, RoPE, attention, compressor, indexer, router, F16 matvec, sampling)
against their numpy twins, beyond the generic per-op parity cases of test_kernels_parity.

Simulator (tiny shapes of the ``tiny`` preset) or GPU: fresh random data per
run (DS4NB_TEST_SEED pins it), every output poisoned with NaN (or a byte
pattern) before the launch and checked to be written, relative error
``||out - ref|| / ||ref||`` against the tolerance of the op's OpSpec.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels import attention as A
from ds4nb.kernels import compressor as C
from ds4nb.kernels import f16_matvec as F
from ds4nb.kernels import hc as H
from ds4nb.kernels import indexer as I
from ds4nb.kernels import rope as R
from ds4nb.kernels import router as RT
from ds4nb.kernels import sample as S
from ds4nb.kernels.parity import rel_error
from ds4nb.kernels.step import NF, group_offset, one_record, records
from ds4nb.reference import ops

MODULES = (A, C, F, H, I, R, RT, S)
SPECS = {spec.name: spec for m in MODULES for spec in m.OPS}


def tol(op: str) -> float:
    return SPECS[op].tolerance


def poisoned(shape, dtype=np.float32):
    a = np.full(shape, np.nan, dtype) if np.dtype(dtype).kind == "f" else np.full(shape, -7, dtype)
    return cuda.to_device(a)


def check(got, ref, op: str, what: str = "") -> float:
    got = np.asarray(got, np.float64).reshape(np.shape(ref))
    err = rel_error(got, ref)
    print(f"{op} {what}: rel error {err:.3g} (tol {tol(op):g})")
    assert np.isfinite(got).all(), f"{op} {what}: unwritten (NaN) outputs"
    assert err <= tol(op), f"{op} {what}: error {err:.3g} > {tol(op):g}"
    return err


# ---------------------------------------------------------------------------
# f16.matvec
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("wpr, n_tok, n_in, wdtype", [
    (1, 2, 200, np.float16),    # a step of two tokens
    (8, 1, 200, np.float16),    # one token: F16 rows read as 4-value words
    (2, 1, 198, np.float16),    # one token, rows not whole words: read value by value
    (4, 1, 200, np.float32),    # F32 weights: value by value
])
def test_f16_matvec_pair_bias_and_split(kernel_rng, wpr, n_tok, n_in, wdtype):
    rng = kernel_rng
    n0, n1 = 8 if wpr == 1 else 4, 4    # n_in: not a multiple of the stride
    w = (rng.standard_normal((n0, n_in)) / 10).astype(np.float16).astype(wdtype)
    w2 = (rng.standard_normal((n1, n_in)) / 10).astype(np.float32)
    b = rng.standard_normal(n0).astype(np.float32)
    b2 = rng.standard_normal(n1).astype(np.float16)
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    out, out2 = poisoned(n_tok * n0), poisoned(n_tok * n1)
    w2d = cuda.to_device(w2.astype(np.float16).astype(wdtype))
    assert (F._as_words(w2d, n_in) is not None) == (wdtype == np.float16 and n_in % 4 == 0)
    F.f16_matvec(cuda.to_device(w), cuda.to_device(x), cuda.to_device(b), out=out, w2=w2d,
                 bias2=cuda.to_device(b2), out2=out2, wpr=wpr)
    # docs/model.md "one rounding per value": float64 from the exact inputs (+ bias), rounded once
    from ds4nb.kernels.parity import CONTRACT_RATE, contract_error

    x64 = x.astype(np.float64)
    ref = (x64 @ w.astype(np.float64).T + b.astype(np.float64)).astype(np.float32)
    ref2 = (x64 @ w2.astype(np.float16).astype(np.float64).T + b2.astype(np.float64)).astype(np.float32)
    for got, r, what in ((out, ref, "w"), (out2, ref2, "w2")):
        got = got.copy_to_host().reshape(r.shape)
        assert np.isfinite(got).all(), f"f16.matvec {what} wpr={wpr}: unwritten (NaN) outputs"
        err = contract_error(got, r)
        print(f"f16.matvec {what} wpr={wpr}: {err:.3g} of the values differ (by one ulp)")
        assert err <= CONTRACT_RATE, f"f16.matvec {what} wpr={wpr}: {err:.3g} differ (> {CONTRACT_RATE:g} or > 1 ulp)"


def test_gemm_f64_float64_outputs(kernel_rng) -> None:
    """The FP64 tensor-core GEMM over several block tiles, rows and tokens past the last tile and a partial
    last k tile; F32 weights, a bias, float64 outputs (the sums themselves, within float64 rounding)."""
    from ds4nb.kernels import gemm_f64

    n_tok, n_out, n_in = 37, 45, 72
    w = kernel_rng.standard_normal((n_out, n_in)).astype(np.float32)
    b = kernel_rng.standard_normal(n_out).astype(np.float32)
    x = kernel_rng.standard_normal((n_tok, n_in)).astype(np.float32)
    out = cuda.to_device(np.full(n_tok * n_out, np.nan))
    gemm_f64.matmul(cuda.to_device(w), cuda.to_device(x), n_tok, out=out, bias=cuda.to_device(b))
    want = x.astype(np.float64) @ w.astype(np.float64).T + b
    err = np.abs(out.copy_to_host().reshape(n_tok, n_out) - want)
    bound = 4 * n_in * np.finfo(np.float64).eps * (np.abs(x) @ np.abs(w).T + np.abs(b))
    assert (err <= bound).all(), f"max error {err.max():.3g}"


# ---------------------------------------------------------------------------
# hc
# ---------------------------------------------------------------------------


# None: the geometry's own splits; 3: the GPU's multi-split path; mma: the mix on the FP64 tensor cores (3 K splits)
@pytest.mark.parametrize(("n_split", "mma"), [(None, False), (3, False), (3, True)], ids=["own", "split3", "mma"])
def test_hc_pre_without_norm_and_sinkhorn_order(kernel_rng, monkeypatch, n_split, mma):
    rng = kernel_rng
    if n_split is not None:
        monkeypatch.setattr(H, "n_splits", lambda hc_dim: n_split)
    n_tok, n_hc, n_embd = 2, 4, 128
    hc_dim, n_mix = n_hc * n_embd, 24
    hc = rng.standard_normal((n_tok, n_hc, n_embd)).astype(np.float32)
    fn = (rng.standard_normal((n_mix, hc_dim)) / np.sqrt(hc_dim)).astype(np.float32)   # an F32 fn
    sc = np.array([0.5, 0.4, 3.0], np.float32)      # a large comb scale: Sinkhorn does real work
    bs = (0.5 * rng.standard_normal(n_mix)).astype(np.float32)
    # docs/model.md "one rounding per value": flat and mix rounded once each, Sinkhorn in float64
    split = ops.hc_split_sinkhorn(H.mix_reference(hc, fn, 1e-6), sc, bs, n_hc, 20, 1e-6)
    out = H.HcPreOut(poisoned(n_tok * n_embd), poisoned(n_tok * n_hc), poisoned(n_tok * n_hc * n_hc))
    H.hc_pre(cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), None, out=out,
             n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6, mma=mma)
    check_bits(out.x.copy_to_host(), ops.hc_weighted_sum(hc, split.pre), "hc.pre", "x")
    check_bits(out.post.copy_to_host(), split.post, "hc.pre", "post")
    check_bits(out.comb.copy_to_host(), split.comb, "hc.pre", "comb")


def _hc_pre_inputs(rng, hc):
    """hc.pre's weights for streams hc (F16 fn, a comb scale that makes the Sinkhorn work, a norm weight) and
    the oracle's mix and split of them."""
    n_hc, n_embd = hc.shape[1:]
    n_mix = 2 * n_hc + n_hc * n_hc
    fn = (rng.standard_normal((n_mix, n_hc * n_embd)) / np.sqrt(n_hc * n_embd)).astype(np.float16)
    sc = np.array([0.5, 0.4, 3.0], np.float32)
    bs = (0.5 * rng.standard_normal(n_mix)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
    mix = H.mix_reference(hc, fn, 1e-6)
    return fn, sc, bs, nw, mix, ops.hc_split_sinkhorn(mix, sc, bs, n_hc, 20, 1e-6)


def test_hc_pre_leaves_comb_to_hc_comb(kernel_rng):
    """Without a comb output hc.pre writes the mix (rounded once) and skips the Sinkhorn; hc.comb of that mix is
    the oracle's comb, and x, post, x_norm are what hc.pre computes with comb."""
    n_tok, n_hc, n_embd, n_mix = 2, 4, 128, 24
    hc = kernel_rng.standard_normal((n_tok, n_hc, n_embd)).astype(np.float32)
    fn, sc, bs, nw, mix, split = _hc_pre_inputs(kernel_rng, hc)
    args = (cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), cuda.to_device(nw))
    kw = dict(n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6)
    both = H.hc_pre(*args, out=H.alloc_pre(n_tok, n_hc, n_embd), **kw)
    out = H.HcPreOut(poisoned(n_tok * n_embd), poisoned(n_tok * n_hc), None, poisoned(n_tok * n_embd),
                     poisoned(n_tok * n_mix))
    H.hc_pre(*args, out=out, **kw)
    check_bits(out.mix.copy_to_host(), mix.reshape(-1), "hc.pre", "mix")
    for name in ("x", "post", "x_norm"):
        assert np.array_equal(getattr(out, name).copy_to_host(), getattr(both, name).copy_to_host()), name
    comb = poisoned(n_tok * n_hc * n_hc)
    H.hc_comb(out.mix, args[2], args[3], out=comb, n_hc=n_hc, iters=20, hc_eps=1e-6)
    check_bits(comb.copy_to_host(), split.comb.reshape(-1), "hc.comb", "comb")
    with pytest.raises(ValueError, match="out.comb, or out.mix"):
        H.hc_pre(*args, out=out._replace(mix=None), **kw)


def test_hc_pre_quantizes_x_norm_for_the_sublayer(kernel_rng):
    """hc.pre's x_norm as Q8_0 and Q8_K (a decode step's matmul activations, formed in its finish): the numpy
    quantizers' blocks of the x_norm it writes, which is the oracle's."""
    from ds4nb.kernels.activation import alloc_q8_0, alloc_q8_K
    from ds4nb.quants import quantize_q8_0, quantize_q8_K
    from ds4nb.quants.repack import pack_q8_0_activation, pack_q8_K_activation

    n_tok, n_hc, n_embd, n_mix = 2, 4, 512, 24
    hc = H._random_hc(kernel_rng, n_tok, n_hc, n_embd)
    hc[1, :, 256:288] = 0                               # an all-zero Q8_0 block of x_norm
    fn, sc, bs, nw, mix, split = _hc_pre_inputs(kernel_rng, hc)
    x_norm = ops.rms_norm(ops.hc_weighted_sum(hc, split.pre), nw, 1e-6)
    q0, qk = alloc_q8_0(n_tok, n_embd), alloc_q8_K(n_tok, n_embd)
    for a in (*q0, *qk):
        a.copy_to_device(np.full(a.size, 0x55, a.dtype))
    out = H.HcPreOut(poisoned(n_tok * n_embd), poisoned(n_tok * n_hc), None, poisoned(n_tok * n_embd),
                     poisoned(n_tok * n_mix), q0, qk)
    H.hc_pre(cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), cuda.to_device(nw),
             out=out, n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6)
    got = out.x_norm.copy_to_host().reshape(n_tok, n_embd)
    check_bits(got, x_norm, "hc.pre", "x_norm")
    for dev, want in ((q0, pack_q8_0_activation(*quantize_q8_0(got))),
                      (qk, pack_q8_K_activation(*quantize_q8_K(got)))):
        for a, w in zip(dev, want, strict=True):
            assert np.array_equal(a.copy_to_host(), w.reshape(-1))
    with pytest.raises(ValueError, match="needs a norm"):
        H.hc_pre(cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), None,
                 out=out._replace(x_norm=None), n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6)


@pytest.mark.parametrize("rows, n, weighted", [(3, 96, True), (2, 2080, False)])
def test_rms_writes_the_q8_0_blocks_of_its_output(rows, n, weighted, kernel_rng):
    """norm.rms with a Q8_0 output (the next Q8_0 matvec's activation, one launch less): the same float32 row as
    without it, the oracle's, and the numpy quantizer's blocks of it (an all-zero block included; 2080 values:
    a second round of 8-value lanes on the GPU)."""
    from ds4nb.kernels import norm as N
    from ds4nb.kernels.activation import alloc_q8_0
    from ds4nb.quants import quantize_q8_0
    from ds4nb.quants.repack import pack_q8_0_activation

    x = (kernel_rng.standard_normal((rows, n)) * kernel_rng.uniform(0.01, 30, (rows, 1))).astype(np.float32)
    x[-1, 32:64] = 0
    w = kernel_rng.uniform(0.5, 1.5, n).astype(np.float32) if weighted else None
    w_dev = None if w is None else cuda.to_device(w)
    plain = poisoned(rows * n)
    N.rms_norm(cuda.to_device(x), w_dev, 1e-6, out=plain)
    out, q8 = poisoned(rows * n), alloc_q8_0(rows, n)
    for a in q8:
        a.copy_to_device(np.full(a.size, 0x55, a.dtype))
    N.rms_norm(cuda.to_device(x), w_dev, 1e-6, out=out, q8_0=q8)
    got = out.copy_to_host().reshape(rows, n)
    assert np.array_equal(got, plain.copy_to_host().reshape(rows, n))
    assert rel_error(got, ops.rms_norm(x, w, 1e-6)) <= 1e-6
    for a, want in zip(q8, pack_q8_0_activation(*quantize_q8_0(got)), strict=True):
        assert np.array_equal(a.copy_to_host(), want.reshape(-1))
    with pytest.raises(ValueError, match="whole 32-value blocks"):
        N.rms_norm(cuda.to_device(x[:, :n - 8].copy()), None, 1e-6, out=out, q8_0=q8)


def test_hc_pre_unaligned_views(kernel_rng):
    """Streams and outputs at an offset of one float (not 16-byte aligned: the finish's scalar loads and stores
    instead of its 16-byte ones) give the aligned arrays' values bit for bit."""
    n_tok, n_hc, n_embd = 1, 4, 256
    hc = H._random_hc(kernel_rng, n_tok, n_hc, n_embd)
    fn, sc, bs, nw, _, _ = _hc_pre_inputs(kernel_rng, hc)
    weights = (cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), cuda.to_device(nw))
    kw = dict(n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6)

    def shifted(n):
        return poisoned(n + 1)[1:]

    hc_off = shifted(hc.size)
    hc_off.copy_to_device(hc.reshape(-1))
    assert not L.aligned(hc_off, 16)
    off = H.hc_pre(hc_off, *weights, out=H.HcPreOut(shifted(n_embd), shifted(n_hc), shifted(n_hc * n_hc),
                                                     shifted(n_embd)), **kw)
    ref = H.hc_pre(cuda.to_device(hc), *weights, out=H.alloc_pre(n_tok, n_hc, n_embd), **kw)
    for name in ("x", "post", "comb", "x_norm"):
        assert np.array_equal(getattr(off, name).copy_to_host(), getattr(ref, name).copy_to_host()), name


def test_hc_post_sums_of_squares_feed_hc_pre(kernel_rng):
    """hc.post's ss_out: each block's float64 sum of squares of the streams it wrote (numpy's, to summation
    order); hc.pre given them (n_ss) writes what it writes when it sums the squares itself."""
    n_tok, n_hc = 2, 4
    n_embd = H.POST_BLOCK_VALUES // 2          # a token is two hc.post blocks
    hc_dim, n_mix = n_hc * n_embd, 24
    parts = H.post_ss_parts(hc_dim)
    assert parts == 2
    y = kernel_rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    hc = H._random_hc(kernel_rng, n_tok, n_hc, n_embd)
    post = kernel_rng.uniform(0, 2, (n_tok, n_hc)).astype(np.float32)
    comb = kernel_rng.uniform(0, 1, (n_tok, n_hc, n_hc)).astype(np.float32)
    scratch = H.alloc_scratch(n_tok, hc_dim, n_mix)
    new = poisoned(n_tok * hc_dim)
    H.hc_post(cuda.to_device(y), cuda.to_device(hc), cuda.to_device(post), cuda.to_device(comb), out=new,
              n_hc=n_hc, ss_out=scratch.part_ss)
    got = new.copy_to_host()
    check_bits(got, ops.hc_post(y, hc, post, comb), "hc.post")
    want = (got.astype(np.float64) ** 2).reshape(n_tok * parts, -1).sum(axis=1)
    np.testing.assert_allclose(scratch.part_ss.copy_to_host()[:n_tok * parts], want, rtol=1e-13)
    fn, sc, bs, nw, _, _ = _hc_pre_inputs(kernel_rng, got.reshape(n_tok, n_hc, n_embd))
    args = (new, cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), cuda.to_device(nw))
    kw = dict(n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6)
    given = H.hc_pre(*args, out=H.alloc_pre(n_tok, n_hc, n_embd), scratch=scratch, n_ss=parts, **kw)
    own = H.hc_pre(*args, out=H.alloc_pre(n_tok, n_hc, n_embd), **kw)
    for name in ("x", "post", "comb", "x_norm"):
        assert np.array_equal(getattr(given, name).copy_to_host(), getattr(own, name).copy_to_host()), name
    with pytest.raises(ValueError, match="whole blocks"):
        H.hc_post(cuda.to_device(np.ascontiguousarray(y[:, :-32])),
                  cuda.to_device(np.ascontiguousarray(hc[:, :, :-32])), cuda.to_device(post), cuda.to_device(comb),
                  out=new, n_hc=n_hc, ss_out=scratch.part_ss)


def test_hc_head_and_post(kernel_rng):
    """hc.head (step 20) and hc.post (steps 14/19) against the oracle's functions, bit for bit."""
    rng = kernel_rng
    n_tok, n_hc, n_embd = 2, 4, 96
    hc_dim = n_hc * n_embd
    hc = (rng.standard_normal((n_tok, n_hc, n_embd)) * 4).astype(np.float32)
    fn = (rng.standard_normal((n_hc, hc_dim)) / np.sqrt(hc_dim)).astype(np.float16)
    sc, bs = np.array([0.7], np.float32), (0.3 * rng.standard_normal(n_hc)).astype(np.float32)
    x = poisoned(n_tok * n_embd)
    H.hc_head(cuda.to_device(hc), cuda.to_device(fn), cuda.to_device(sc), cuda.to_device(bs), out=x, n_hc=n_hc,
              hc_eps=1e-6, rms_eps=1e-6)
    w = ops.hc_head_weights(H.mix_reference(hc, fn, 1e-6), sc[0], bs, 1e-6)
    check_bits(x.copy_to_host(), ops.hc_weighted_sum(hc, w), "hc.head", "x")
    y = rng.standard_normal((n_tok, n_embd)).astype(np.float32)
    post = rng.uniform(0, 2, (n_tok, n_hc)).astype(np.float32)
    comb = rng.uniform(0, 1, (n_tok, n_hc, n_hc)).astype(np.float32)
    new = poisoned(n_tok * n_hc * n_embd)
    H.hc_post(cuda.to_device(y), cuda.to_device(hc), cuda.to_device(post), cuda.to_device(comb), out=new, n_hc=n_hc)
    check_bits(new.copy_to_host(), ops.hc_post(y, hc, post, comb), "hc.post", "new")


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------


def check_bits(got, ref, op: str, what: str = "") -> float:
    """docs/model.md "one rounding per value": bit-identical to the twin but for rare one-ulp differences."""
    from ds4nb.kernels.parity import CONTRACT_RATE, contract_error

    got = np.asarray(got).astype(np.float32).reshape(np.shape(ref))
    assert np.isfinite(got).all(), f"{op} {what}: unwritten (NaN) outputs"
    err = contract_error(got, np.asarray(ref, np.float32))
    print(f"{op} {what}: {err:.3g} of the values differ (by one ulp)")
    assert err <= CONTRACT_RATE, f"{op} {what}: {err:.3g} differ (> {CONTRACT_RATE:g} or > 1 ulp)"
    return err



def _attn_inputs(rng, n_head=4, head_dim=64, n_raw=8, n_comp=12, dtype=np.float16):
    raw = ops.f16_round(rng.standard_normal((n_raw, head_dim)))
    comp = ops.f16_round(rng.standard_normal((max(n_comp, 1), head_dim)))
    q = (rng.standard_normal((n_head, head_dim)) * 2).astype(np.float32)
    sinks = (0.5 * rng.standard_normal(n_head)).astype(np.float32)
    return q, raw.astype(dtype), comp.astype(dtype), sinks


@pytest.mark.parametrize("case", ["all_comp_f32_multisplit", "selected_chunked", "window_only", "empty"])
def test_attention_decode_variants(kernel_rng, case):
    rng = kernel_rng
    dtype = np.float32 if "f32" in case else np.float16
    n_raw, n_comp = (8, 12) if case != "empty" else (0, 0)
    q, raw, comp, sinks = _attn_inputs(rng, n_raw=max(n_raw, 1), n_comp=n_comp, dtype=dtype)
    raw = raw[:n_raw] if n_raw else raw
    kw = {}
    sel = None
    visible = None
    rows = np.concatenate([raw[:n_raw], comp[:n_comp]]).astype(np.float32)
    if case == "all_comp_f32_multisplit":
        kw = dict(chunk=4, splits=3)                  # 5 chunks over 3 splits: loops and merges
    elif case == "selected_chunked":
        sel = np.array([11, 2, 7, 5], np.int32)       # any order
        visible = np.concatenate([np.ones(n_raw, bool), np.isin(np.arange(n_comp), sel)])
        kw = dict(chunk=4, splits=1)
    elif case == "window_only":
        n_comp = 0
        rows = raw.astype(np.float32)
    if case == "selected_chunked":
        ref = ops.attention_with_sinks(q, rows, sinks, visible)
    elif case == "empty":
        ref = ops.attention_with_sinks(q, np.zeros((0, q.shape[1]), np.float32), sinks)
    else:
        ref = ops.attention_with_sinks(q, rows[:n_raw + n_comp], sinks)
    out = poisoned(q.size)
    raw_d = cuda.to_device(raw if n_raw else np.zeros((1, q.shape[1]), dtype))
    n_vis = len(sel) if sel is not None else n_comp
    rec = one_record(0, n_raw=n_raw, visible=n_vis, select=0 if sel is None else n_vis)
    A.attention_decode(cuda.to_device(q), raw_d, cuda.to_device(comp) if n_comp else None, cuda.to_device(sinks),
                       None if sel is None else cuda.to_device(sel), out=out, steps=cuda.to_device(rec),
                       grp=group_offset(1), max_rows=n_raw + n_comp, **kw)
    got = out.copy_to_host()
    if case == "empty":
        assert np.array_equal(got, np.zeros_like(got))
    else:
        check_bits(got, ref, "attn.decode", case)


def test_attention_decode_writes_the_q8_0_blocks_of_its_heads(kernel_rng):
    """attn.decode with a Q8_0 output (the grouped output projection's activation, rows of a group's heads):
    the same heads as without it (the oracle's), and the numpy quantizer's blocks of them."""
    from ds4nb.kernels.activation import alloc_q8_0
    from ds4nb.quants import quantize_q8_0
    from ds4nb.quants.repack import pack_q8_0_activation

    q, raw, comp, sinks = _attn_inputs(kernel_rng, n_raw=8, n_comp=12)
    rec = cuda.to_device(one_record(0, n_raw=8, visible=12, select=0))
    args = (cuda.to_device(q), cuda.to_device(raw), cuda.to_device(comp), cuda.to_device(sinks), None)
    kw = dict(steps=rec, grp=group_offset(1), max_rows=20, chunk=4, splits=3)
    plain = poisoned(q.size)
    A.attention_decode(*args, out=plain, **kw)
    n_row = 2 * q.shape[1]                            # a group = two heads: rows of 128 values
    out, q8 = poisoned(q.size), alloc_q8_0(q.size // n_row, n_row)
    for a in q8:
        a.copy_to_device(np.full(a.size, 0x55, a.dtype))
    A.attention_decode(*args, out=out, q8_0=q8, q8_0_row=n_row, **kw)
    got = out.copy_to_host()
    assert np.array_equal(got, plain.copy_to_host())
    check_bits(got, ops.attention_with_sinks(q, np.concatenate([raw, comp]).astype(np.float32), sinks),
               "attn.decode", "with Q8_0")
    for a, want in zip(q8, pack_q8_0_activation(*quantize_q8_0(got.reshape(-1, n_row))), strict=True):
        assert np.array_equal(a.copy_to_host(), want.reshape(-1))
    with pytest.raises(ValueError, match="whole 32-value blocks"):
        A.attention_decode(*args, out=out, q8_0=q8, q8_0_row=48, **kw)


def test_kv_store_ring_row_f16_cache(kernel_rng):
    rng = kernel_rng
    cap, head_dim, n_rot = 8, 64, 16
    rope = R.make_test_rope(n_rot, False)
    kv = (rng.standard_normal((1, head_dim)) * 30).astype(np.float32)
    kv[0, :8] *= 1e-7                                  # a block with tiny values (amax floor)
    w = (1 + 0.1 * rng.standard_normal(head_dim)).astype(np.float32)
    cache = cuda.to_device(np.full((cap, head_dim), np.float16(1.5), np.float16))
    cache[5].copy_to_device(np.full(head_dim, np.nan, np.float16))
    pos = 21                                          # ring slot 21 % 8 = 5
    A.kv_store(cuda.to_device(kv), cuda.to_device(w), out=cache, rope=rope, eps=1e-6,
               steps=cuda.to_device(records(pos, 1, n_swa=cap)))
    got = cache.copy_to_host().astype(np.float32)
    ref = A.kv_store_reference(kv, w, rope, pos, 1e-6, n_rot)[0]
    check_bits(got[5], ref, "attn.kv_store", "ring slot")
    assert np.all(np.delete(got, 5, axis=0) == 1.5), "other cache rows touched"


# ---------------------------------------------------------------------------
# compressor: a token sequence through project + step against the oracle's step 9
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "d", "overlap", "finish"),
                         [(4, 64, True, "fp8"), (4, 32, True, "qat"), (8, 64, False, "fp8")],
                         ids=["csa_attn", "csa_indexer", "hca"])
def test_compressor_sequence(kernel_rng, ratio, d, overlap, finish):
    from ds4nb.reference.state import CompressorState

    rng = kernel_rng
    n_embd, n_rot = 64, 16
    width = 2 * d if overlap else d
    wkv = (rng.standard_normal((width, n_embd)) / 8).astype(np.float16)
    wg = (rng.standard_normal((width, n_embd)) / 8).astype(np.float16)
    ape = rng.standard_normal((ratio, width)).astype(np.float16)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    rope = R.make_test_rope(n_rot, True)
    pos0 = 3 * ratio - 2                 # start mid-window: emit after 2 tokens, then one into the next window
    n_steps = 3
    st = CompressorState.empty(2 * ratio if overlap else ratio, width)
    dev = C.alloc_state(ratio, d, overlap)
    # the oracle's window as the device starts it: rows written earlier in this window
    for slot in range((ratio if overlap else 0), (ratio if overlap else 0) + ratio - 2):
        st.kv[slot] = rng.standard_normal(width)
        st.score[slot] = rng.standard_normal(width)
    if overlap:
        st.kv[:ratio] = rng.standard_normal((ratio, width))
        st.score[:ratio] = rng.standard_normal((ratio, width))
    dev.kv.copy_to_device(st.kv)
    dev.score.copy_to_device(st.score)
    cache = poisoned((4, d))
    refs = {}
    x = rng.standard_normal((n_steps, n_embd)).astype(np.float32)
    new_kv, new_sc = C.project_reference(x, wkv, wg)
    for t, pos in enumerate(range(pos0, pos0 + n_steps)):
        st.kv, st.score = C.store_reference(st.kv, st.score, new_kv[t], new_sc[t], ape, pos, ratio, overlap)
        if (pos + 1) % ratio == 0:
            refs[(pos + 1) // ratio - 1], st.kv, st.score = C.emit_reference(st.kv, st.score, nw, pos, ratio, overlap,
                                                                             rope, 1e-6, finish, n_rot)
    proj = C.alloc_projection(n_steps, width)
    C.compressor_project(cuda.to_device(x), cuda.to_device(wkv), cuda.to_device(wg), out=proj)   # all tokens at once
    check_bits(proj.kv.copy_to_host(), new_kv.reshape(-1), "compressor.project", "kv")
    steps = cuda.to_device(records(pos0, n_steps, groups=[(ratio, 0)]))
    ape_d, nw_d = cuda.to_device(ape), cuda.to_device(nw)
    for t in range(n_steps):                                                         # then token by token
        C.compressor_step(proj, t, ape_d, nw_d, out=cache, state=dev, ratio=ratio, overlap=overlap, rope=rope,
                          eps=1e-6, finish=finish, steps=steps, rec=t * NF, grp=group_offset(1))
    check_bits(dev.kv.copy_to_host(), st.kv, "compressor.step", "kv")
    sc_dev = dev.score.copy_to_host()
    assert np.array_equal(sc_dev <= ops.NEG_INF, st.score <= ops.NEG_INF), "empty slots differ"
    check_bits(sc_dev, st.score, "compressor.step", "score")
    assert len(refs) >= 1
    got = cache.copy_to_host()
    for row, ref in refs.items():
        check_bits(got[row], ref, "compressor.step", f"row {row}")
    assert np.isnan(np.delete(got, list(refs), axis=0)).all(), "rows no token emitted were written"


# ---------------------------------------------------------------------------
# indexer and top-k
# ---------------------------------------------------------------------------


def test_topk_ties_full_and_device_cap(kernel_rng):
    rng = kernel_rng
    v = np.round(rng.standard_normal(50), 1).astype(np.float32)     # many exact ties
    v[7] = np.inf
    v[8] = np.nan
    finite = np.where(np.isfinite(v), v, -np.inf)
    for k in (1, 6, 48):
        out = poisoned(k, np.int32)
        I.topk(cuda.to_device(v), v.size, k, out=out)
        assert np.array_equal(out.copy_to_host(), ops.top_k_stable(finite, k)), k
    out = poisoned(10, np.int32)
    I.topk(cuda.to_device(v), v.size, 10, out=out, k_from=(cuda.to_device(np.array([7, 3], np.int32)), 1))
    got = out.copy_to_host()
    assert np.array_equal(got[:3], ops.top_k_stable(finite, 3)) and np.all(got[3:] == -7)


def test_topk_signed_zero_ties():
    """-0.0 == +0.0: they tie, so the lower index comes first (a +0.0 after a -0.0 must not win)."""
    v = np.array([1.0, -0.0, 0.5, 0.0, -0.0, 0.0, -1.0, 0.0], np.float32)
    for k in (3, 5, 8):
        out = poisoned(k, np.int32)
        I.topk(cuda.to_device(v), v.size, k, out=out)
        assert out.copy_to_host().tolist() == ops.top_k_stable(v, k).tolist(), k
    logits = np.array([-0.0, 0.0, -3.0], np.float32)          # greedy: the first of the tied maxima
    out = cuda.to_device(np.zeros(2, np.int32))
    S.sample_device(cuda.to_device(logits), out=out, params=_greedy_params(), u=0.5)
    assert out.copy_to_host().tolist() == [0, 0]


def _greedy_params():
    from ds4nb.sampling import SamplingParams

    return SamplingParams(temperature=0.0)


def test_indexer_pipeline(kernel_rng):
    """q_prep -> scores -> top-k as Reference.indexer_visible does it."""
    rng = kernel_rng
    n_ih, d, n_comp, top_k, n_rot = 4, 32, 24, 4, 16
    rope = R.make_test_rope(n_rot, True)
    pos = int(rng.integers(100, 5000))
    q = rng.standard_normal((n_ih, d)).astype(np.float32)
    w = rng.standard_normal(n_ih).astype(np.float32)
    rows = ops.f16_round(ops.indexer_qat(rng.standard_normal((n_comp, d)).astype(np.float32)))
    qr = ops.indexer_qat(ops.apply_rope_tail(q, rope, pos))
    ws = ops.indexer_weight_scale(d, n_ih)          # a float64, as the engine passes it
    scores = ops.indexer_scores(qr, w, rows, ws)
    q_d = cuda.to_device(q)
    I.q_prep(q_d, out=q_d, n_head=n_ih, head_dim=d, rope=rope, steps=cuda.to_device(records(pos, 1)))  # in place
    check_bits(q_d.copy_to_host(), qr, "indexer.q_prep")
    sc = poisoned(n_comp)
    rec = cuda.to_device(one_record(pos, rows=n_comp, visible=top_k, select=top_k))
    I.indexer_scores(q_d, cuda.to_device(w), cuda.to_device(rows), out=sc, w_scale=ws, steps=rec, grp=group_offset(1),
                     max_rows=n_comp)
    check_bits(sc.copy_to_host(), scores, "indexer.scores")
    sel = poisoned(top_k, np.int32)
    I.topk(sc, n_comp, top_k, out=sel)
    assert set(sel.copy_to_host().tolist()) == set(ops.top_k_stable(scores, top_k).tolist())


# ---------------------------------------------------------------------------
# router
# ---------------------------------------------------------------------------


def test_router_unnormalised_no_bias(kernel_rng):
    rng = kernel_rng
    n_tok, n_e, k = 2, 40, 3                # more experts than a warp
    logits = (3 * rng.standard_normal((n_tok, n_e))).astype(np.float32)
    out = RT.RouteOut(poisoned((n_tok, k), np.int32), poisoned((n_tok, k)))
    RT.router_select(cuda.to_device(logits), None, out=out, k=k, scale=2.0, normalise=False)
    probs = ops.router_probs(logits)
    sel = np.stack([ops.select_experts_topk(probs[t], None, k) for t in range(n_tok)])
    assert np.array_equal(out.selected.copy_to_host(), sel)
    ref_w = np.stack([ops.route_weights(probs[t][sel[t]], 2.0, False) for t in range(n_tok)])
    check_bits(out.weights.copy_to_host(), ref_w, "router.select", "weights")


@pytest.mark.parametrize("geometry", ["own", "per_expert"])   # not "gpu": that keyword marks GPU-only tests
def test_router_float64_keys_and_ties(kernel_rng, monkeypatch, geometry):
    """The selection key p + bias is a float64 sum: a bias too small to move the float32 sum still orders
    two equal p's; equal keys go to the lower id; NaN comes last, +inf first (the oracle's stable argsort).
    ``per_expert``: the GPU launch geometry (one thread per expert, 32-lane shuffles), in the simulator too."""
    if geometry == "per_expert":
        monkeypatch.setattr(RT, "SIMULATOR", False)
        monkeypatch.setattr(RT, "LANES", 32)
        monkeypatch.setattr(RT, "EXPERTS_PER_THREAD", 1)
    rng = kernel_rng
    n_tok, n_e, k = 3, 40, 4
    logits = rng.uniform(-4, 2, (n_tok, n_e)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n_e)).astype(np.float32)
    logits[0, 3] = logits[0, 9] = 8.0
    bias[3], bias[9] = 0.0, 1e-12            # float32: p + 1e-12 == p; float64: expert 9 first
    logits[1, 5] = logits[1, 2] = 7.0
    bias[5] = bias[2]                        # an exact tie: expert 2 first
    logits[2, :] = np.nan                    # NaN everywhere but two: k = 4 takes the two lowest NaN ids
    logits[2, 30], logits[2, 11] = np.inf, 0.5
    out = RT.RouteOut(poisoned((n_tok, k), np.int32), poisoned((n_tok, k)))
    RT.router_select(cuda.to_device(logits), cuda.to_device(bias), out=out, k=k, scale=1.5)
    probs = ops.router_probs(logits)
    sel = np.stack([ops.select_experts_topk(probs[t], bias, k) for t in range(n_tok)])
    got = out.selected.copy_to_host()
    assert got[0, :2].tolist() == [9, 3] and got[1, :2].tolist() == [2, 5] and got[2].tolist() == [30, 11, 0, 1]
    assert np.array_equal(got, sel), (got, sel)
    ref_w = np.stack([ops.route_weights(probs[t][sel[t]], 1.5, True) for t in range(2)])
    check_bits(out.weights.copy_to_host()[:2], ref_w, "router.select", "weights")


# ---------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------


def _sample_twin(x, params, u):
    from ds4nb.sampling import sample

    return sample(x, params, S.FixedDraw(u))


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.05),
    dict(temperature=0.8, top_k=7, top_p=0.8, min_p=0.0),
    dict(temperature=1.5, top_k=0, top_p=0.5, min_p=0.1),
], ids=["greedy", "minp", "topk_topp", "topp_minp"])
def test_sample_matches_twin(kernel_rng, params):
    from ds4nb.sampling import SamplingParams

    rng = kernel_rng
    p = SamplingParams(**params)
    x = S.random_logits(rng, 200)
    x_d = cuda.to_device(x)
    scratch = S.alloc_scratch(x.size)
    for u in (0.0, float(rng.random()), 0.999999):
        out = poisoned(2, np.int32)
        S.sample_device(x_d, out=out, params=p, u=u, scratch=scratch)
        tok, status = out.copy_to_host()
        assert status == 0 and tok == _sample_twin(x, p, u), (params, u)


def test_sample_no_finite_logit_and_token_helper(kernel_rng):
    from ds4nb.sampling import SamplingParams

    x = np.full(50, -np.inf, np.float32)
    x[3] = np.nan
    p = SamplingParams(temperature=1.0, top_k=5)
    assert S.sample_token(cuda.to_device(x), p, np.random.default_rng(0)) == _sample_twin(x, p, 0.5)


def test_sinkhorn_warp_equals_one_thread(kernel_rng):
    """hc.pre's Sinkhorn with one entry per lane (the GPU path) gives one thread's float64 values bit for bit."""
    n_hc = 4
    serial, warp = H.sinkhorn_fns(n_hc)

    @cuda.jit
    def both(mix, scale, base, iters, eps, out_serial, out_warp):
        lane = cuda.threadIdx.x
        if lane == 0:
            serial(mix, scale, base, iters, eps, out_serial, 0)
        warp(mix, scale, base, iters, eps, out_warp, 0, lane)

    rng = kernel_rng
    n_mix = 2 * n_hc + n_hc * n_hc
    mix = (rng.standard_normal(n_mix) * 3).astype(np.float32)
    scale = rng.uniform(0.5, 2, 3).astype(np.float32)
    base = rng.standard_normal(n_mix).astype(np.float32)
    a, b = poisoned(n_hc * n_hc), poisoned(n_hc * n_hc)
    both[1, 32](cuda.to_device(mix), cuda.to_device(scale), cuda.to_device(base), 20, np.float64(np.float32(1e-6)),
                a, b)
    got_a, got_b = a.copy_to_host(), b.copy_to_host()
    assert np.isfinite(got_a).all() and np.array_equal(got_a, got_b)
    split = ops.hc_split_sinkhorn(mix[None, :], scale, base, n_hc, 20, 1e-6)   # and both are the oracle's
    check_bits(got_a, split.comb.reshape(-1), "hc.pre", "sinkhorn")


def test_topk_rows_of_a_step(kernel_rng: np.random.Generator) -> None:
    """topk.select over the rows of a prefill step: each row's n and k from its own token's record."""
    from ds4nb.kernels.indexer import topk
    from ds4nb.kernels.step import ROWS, SELECT
    from ds4nb.reference import ops

    n_rows, n, k = 3, 40, 6
    g = group_offset(1)
    values = kernel_rng.standard_normal((n_rows, n)).astype(np.float32)
    steps = records(0, n_rows).reshape(n_rows, NF)
    counts = [(int(kernel_rng.integers(k, n + 1)), int(kernel_rng.integers(0, k + 1))) for _ in range(n_rows)]
    for t, (rows, sel) in enumerate(counts):
        steps[t, g + ROWS], steps[t, g + SELECT] = rows, sel
    out = cuda.to_device(np.full(n_rows * k, -1, np.int32))
    topk(cuda.to_device(values), n, k, out=out, n_from=(cuda.to_device(steps.reshape(-1)), g + ROWS),
         k_from=(cuda.to_device(steps.reshape(-1)), g + SELECT), n_rows=n_rows)
    got = out.copy_to_host().reshape(n_rows, k)
    for t, (rows, sel) in enumerate(counts):
        np.testing.assert_array_equal(got[t, :sel], ops.top_k_stable(values[t, :rows], sel) if sel else [])
        assert (got[t, sel:] == -1).all()


@pytest.mark.parametrize(("ratio", "d", "overlap", "finish", "n_tok"),
                         [(4, 64, True, "fp8", 13), (16, 64, False, "fp8", 37), (4, 32, True, "qat", 6),
                          (16, 64, False, "fp8", 5)],
                         ids=["csa", "hca", "indexer", "hca-no-emission"])
def test_compressor_chunk_equals_token_by_token(ratio, d, overlap, finish, n_tok, kernel_rng) -> None:
    """compressor.chunk: the rows and the final window state of n_tok token-by-token steps, from a random
    mid-window position and state."""
    from ds4nb.kernels.parity import contract_error, poison

    case, kv_end, sc_end = C.make_chunk_case(kernel_rng, ratio, d, 16, overlap, finish, n_tok)
    poison(case.out)                                    # rows the step does not emit must stay unwritten
    C.compressor_chunk(*case.inputs, out=case.out, **case.kwargs)
    got = case.out.copy_to_host()
    assert contract_error(got, case.expected[0]) <= 1e-3, case.info
    state = case.kwargs["state"]
    np.testing.assert_array_equal(state.kv.copy_to_host(), kv_end)
    np.testing.assert_array_equal(state.score.copy_to_host(), sc_end)


@pytest.mark.parametrize("mma", [False, True], ids=["dfma", "mma"])
@pytest.mark.parametrize(("n_tok", "n_out", "n_out2", "n_in"), [(11, 37, 16, 300), (17, 5, 0, 544)])
def test_f16_matvec_prefill_tiles(n_tok, n_out, n_out2, n_in, mma, kernel_rng) -> None:
    """The prefill kernels where nothing divides: rows past a block's 32, tokens past a pass of 8 (or a 32 x 32
    MMA tile), columns past a 256-column tile (or a 32-value k tile); a second matrix with a bias: the float64
    numpy twin rounded once, bit for bit (``mma``: the FP64 tensor-core GEMM, through the simulator's MMA)."""
    w = (kernel_rng.standard_normal((n_out, n_in)) / 16).astype(np.float16)
    x = kernel_rng.standard_normal((n_tok, n_in)).astype(np.float32)
    out = cuda.device_array(n_tok * n_out, np.float32)
    kw = {}
    if n_out2:
        w2 = (kernel_rng.standard_normal((n_out2, n_in)) / 16).astype(np.float16)
        b2 = kernel_rng.standard_normal(n_out2).astype(np.float16)
        out2 = cuda.device_array(n_tok * n_out2, np.float32)
        kw = dict(w2=cuda.to_device(w2), bias2=cuda.to_device(b2), out2=out2)
    F.f16_matvec(cuda.to_device(w), cuda.to_device(x), out=out, mma=mma, **kw)
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(out.copy_to_host().reshape(n_tok, n_out), (x64 @ w.astype(np.float64).T).astype(np.float32))
    if n_out2:
        want2 = (x64 @ w2.astype(np.float64).T + b2.astype(np.float64)).astype(np.float32)
        np.testing.assert_array_equal(out2.copy_to_host().reshape(n_tok, n_out2), want2)
