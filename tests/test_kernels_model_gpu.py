"""The model kernels at DS4 Flash shapes on a real GPU (``@pytest.mark.gpu``; skipped elsewhere).

Shapes: n_embd 4096, n_hc 4 (hc_dim 16384, 24 mix values), 64 heads x 512
with n_rot 64, a 128-row window plus up to 512 selected compressed rows (and an
HCA layer's 8192 rows), indexer 64 heads x 128 over up to 262144 rows, 256
experts top-6, vocabulary 129280.  Outputs are poisoned before every launch;
errors are printed (``pytest -s``) and bounded by each op's documented tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from ds4nb.kernels import attention as A
from ds4nb.kernels import compressor as C
from ds4nb.kernels import f16_matvec as F
from ds4nb.kernels import hc as H
from ds4nb.kernels import indexer as I
from ds4nb.kernels import rope as R
from ds4nb.kernels import router as RT
from ds4nb.kernels import sample as S
from ds4nb.kernels.attention_mma import attention_mma
from ds4nb.kernels.parity import CONTRACT_RATE, check_case, contract_error
from ds4nb.kernels.registry import KernelRegistry
from ds4nb.kernels.step import group_offset, one_record
from ds4nb.reference import ops

pytestmark = pytest.mark.gpu

MODULES = (A, C, F, H, I, R, RT, S)
REG = KernelRegistry()
for _m in MODULES:
    REG.add_module(_m)
OPS = [(op, impl.name) for op in REG.ops() for impl in REG.implementations(op)]


@pytest.mark.parametrize(("op", "impl"), OPS, ids=[f"{o}[{i}]" for o, i in OPS])
def test_model_shape_parity(op, impl, kernel_rng):
    spec = REG.op(op)
    for _ in range(3 if op in ("compressor.step", "sample.draw", "rope.tail") else 1):
        res = check_case(REG.get(op, impl), spec.make_case(kernel_rng, "model"), spec.tolerance)
        print(res)
        assert res.ok, str(res)


def _poison(shape, dtype=np.float32):
    return cuda.to_device(np.full(shape, np.nan if np.dtype(dtype).kind == "f" else -7, dtype))


@pytest.mark.parametrize(("n_comp", "top", "geom"), [
    (2048, 512, dict()), (2048, 512, dict(hpb=16)), (2048, 512, dict(chunk=64)),
    (8192, None, dict()),          # an HCA layer at 1M tokens: every compressed row visible
    (0, None, dict()),             # a sliding-window layer
    (2048, 512, dict(mma=True)), (8192, None, dict(mma=True)), (0, None, dict(mma=True)),   # heads_mma (decode)
])
def test_attention_decode_flash(kernel_rng, n_comp, top, geom):
    rng = kernel_rng
    n_head, hd, n_raw = 64, 512, 128
    raw = ops.f16_round(rng.standard_normal((n_raw, hd)))
    comp = ops.f16_round(rng.standard_normal((max(n_comp, 1), hd)))
    q = (rng.standard_normal((n_head, hd)) * 2).astype(np.float32)
    sinks = (0.5 * rng.standard_normal(n_head)).astype(np.float32)
    sel = None if top is None else rng.choice(n_comp, top, replace=False).astype(np.int32)
    rows = np.concatenate([raw, comp[:n_comp] if sel is None else comp[np.sort(sel)]])
    ref = ops.attention_with_sinks(q, rows, sinks)
    out = _poison(q.size)
    n_vis = n_comp if sel is None else top
    rec = one_record(0, n_raw=n_raw, visible=n_vis, select=0 if sel is None else top)
    launcher = attention_mma if geom.get("mma") else A.attention_decode
    launcher(cuda.to_device(q), cuda.to_device(raw.astype(np.float16)),
                       cuda.to_device(comp.astype(np.float16)) if n_comp else None, cuda.to_device(sinks),
                       None if sel is None else cuda.to_device(sel), out=out, steps=cuda.to_device(rec),
                       grp=group_offset(1), max_rows=n_raw + n_vis, **geom)
    got = out.copy_to_host().reshape(ref.shape)
    err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    print(f"attn.decode n_comp={n_comp} top={top} {geom}: {err:.3g}")
    assert np.isfinite(got).all() and err < REG.op("attn.decode").tolerance


@pytest.mark.parametrize("n", [2048, 262144])
def test_indexer_scores_topk_flash(kernel_rng, n):
    rng = kernel_rng
    n_ih, d, k = 64, 128, 512
    q = ops.indexer_qat(rng.standard_normal((n_ih, d)).astype(np.float32))
    rows = ops.f16_round(ops.indexer_qat(rng.standard_normal((n, d)).astype(np.float32)))
    w = rng.standard_normal(n_ih).astype(np.float32)
    ws = I.indexer_w_scale(d, n_ih)
    ref = ops.indexer_scores(q, w, rows, ws)
    sc = _poison(n)
    rec = cuda.to_device(one_record(0, rows=n, visible=k, select=k))
    I.indexer_scores(cuda.to_device(q), cuda.to_device(w), cuda.to_device(rows.astype(np.float16)), out=sc,
                     w_scale=ws, steps=rec, grp=group_offset(1), max_rows=n)
    got = sc.copy_to_host()
    err = contract_error(got, ref)
    print(f"indexer.scores n={n}: {err:.3g} of the scores differ (by one ulp)")
    assert err <= CONTRACT_RATE
    sel = _poison(k, np.int32)
    I.topk(sc, n, k, out=sel)
    assert np.array_equal(sel.copy_to_host(), ops.top_k_stable(got, k))   # exact on the device's scores


def test_sampling_full_vocab_many_draws(kernel_rng):
    from ds4nb.sampling import SamplingParams, sample

    rng = kernel_rng
    x = S.random_logits(rng, 129280)
    x_d = cuda.to_device(x)
    scratch = S.alloc_scratch(x.size)
    out = cuda.device_array(2, np.int32)
    n = 0
    for params in (SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.7, top_k=40),
                   SamplingParams(temperature=1.0, top_k=1024, top_p=0.9, min_p=0.0),
                   SamplingParams(temperature=1.3, top_p=0.95, min_p=0.1)):
        for u in rng.random(20):
            S.sample_device(x_d, out=out, params=params, u=float(u), scratch=scratch)
            tok, status = out.copy_to_host()
            assert status == 0
            assert tok == sample(x, params, S.FixedDraw(float(u))), (params, u)
            n += 1
    # min_p = 0 without top-k: every finite logit is a candidate -> host fallback, same token
    p = SamplingParams(temperature=1.0, top_p=0.5, min_p=0.0)
    assert S.sample_token(x_d, p, np.random.default_rng(5)) == sample(x, p, np.random.default_rng(5))
    print(f"sample.draw: {n} draws identical to the twin")
