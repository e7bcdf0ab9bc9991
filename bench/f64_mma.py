"""The float64 products of a prefill chunk at flash shapes: scalar FP64 kernels against the FP64 tensor cores.

``python bench/f64_mma.py [--tokens 512] [--reps 20]``: for each F16 projection of a flash layer (router,
compressor kv + gate of a CSA and an HCA layer, the indexer's compressor, query and weight projections) and
the HC mix of ``hc.pre``, the scalar kernel (``mma=False``) and the GEMM on the FP64 tensor cores
(``ds4nb.kernels.gemm_f64``, ``mma=True``) on the same random inputs: the fraction of float32 outputs whose
bits differ between the two (the contract allows ~1e-7, one ulp), us per launch (CUDA events), TFLOP/s, and
the FP64 tensor-core peak measured by CuPy's DGEMM in the same run.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from kernels import resources                   # bench/ is the script's directory
from prefill import _events_ms, cublas_peaks


def _events_us(fn, reps: int) -> float:
    return 1e3 * _events_ms(fn, reps)


#: (name, rows, second matrix rows, n_in) of a flash layer's F16 products (ds4nb/model/presets.py shapes)
PROJECTIONS = [
    ("router ffn_gate_inp", 256, 0, 4096),
    ("compressor kv+gate (CSA)", 1024, 1024, 4096),
    ("compressor kv+gate (HCA)", 512, 512, 4096),
    ("indexer compressor kv+gate", 256, 256, 4096),
    ("indexer attn_q_b", 8192, 0, 1024),
    ("indexer proj", 64, 0, 4096),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from numba import cuda

    from ds4nb.kernels import f16_matvec as F
    from ds4nb.kernels import hc as H
    from ds4nb.kernels.parity import contract_error

    rng = np.random.default_rng(7)
    T = args.tokens
    peak = cublas_peaks().get("cublas_f64", 0.0)
    print(f"cuBLAS DGEMM 8192^3: {peak:.1f} TFLOP/s")
    rows = []

    def report(name, flops, times, diff):
        (t0, t1) = times
        print(f"{name:28s} scalar {t0:9.1f} us {flops / t0 / 1e6:6.1f} TF/s | mma {t1:9.1f} us "
              f"{flops / t1 / 1e6:6.1f} TF/s ({flops / t1 / 1e6 / peak if peak else 0:.2f} of DGEMM) | "
              f"x{t0 / t1:5.1f} | bits differ {diff:.1e}", flush=True)
        rows.append((name, T, flops, t0, t1, flops / t0 / 1e6, flops / t1 / 1e6, peak, diff))

    for name, n_out, n_out2, n_in in PROJECTIONS:
        w = cuda.to_device((rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float16))
        w2 = cuda.to_device((rng.standard_normal((max(n_out2, 1), n_in)) / np.sqrt(n_in)).astype(np.float16))
        b2 = cuda.to_device(rng.standard_normal(max(n_out2, 1)).astype(np.float16))
        x = cuda.to_device(rng.standard_normal((T, n_in)).astype(np.float32))
        outs = {m: (cuda.device_array(T * n_out, np.float32), cuda.device_array(T * max(n_out2, 1), np.float32))
                for m in (False, True)}

        def run(m, w=w, w2=w2, b2=b2, x=x, n_out2=n_out2):
            kw = dict(w2=w2, bias2=b2, out2=outs[m][1]) if n_out2 else {}
            F.f16_matvec(w, x, out=outs[m][0], mma=m, **kw)

        times = tuple(_events_us(lambda m=m: run(m), args.reps) for m in (False, True))
        diff = max(contract_error(outs[True][i].copy_to_host(), outs[False][i].copy_to_host().astype(np.float64))
                   for i in range(2 if n_out2 else 1))
        report(name, 2.0 * T * (n_out + n_out2) * n_in, times, diff)

    n_hc, n_embd = 4, 4096
    hc_dim, n_mix = n_hc * n_embd, 2 * n_hc + n_hc * n_hc
    hc = cuda.to_device(rng.standard_normal((T, n_hc, n_embd)).astype(np.float32))
    fn = cuda.to_device((rng.standard_normal((n_mix, hc_dim)) / np.sqrt(hc_dim)).astype(np.float32))
    scale = cuda.to_device(np.array([0.5, 0.4, 3.0], np.float32))
    base = cuda.to_device((0.5 * rng.standard_normal(n_mix)).astype(np.float32))
    norm_w = cuda.to_device(rng.uniform(0.5, 1.5, n_embd).astype(np.float32))
    scratch = H.alloc_scratch(T, hc_dim, n_mix)
    pres = {m: H.alloc_pre(T, n_hc, n_embd) for m in (False, True)}

    def run_hc(m):
        H.hc_pre(hc, fn, scale, base, norm_w, out=pres[m], n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6,
                 scratch=scratch, mma=m)

    times = tuple(_events_us(lambda m=m: run_hc(m), args.reps) for m in (False, True))
    diff = max(contract_error(getattr(pres[True], f).copy_to_host(),
                              getattr(pres[False], f).copy_to_host().astype(np.float64))
               for f in ("x", "post", "comb", "x_norm"))
    report("hc.pre (mix 24 x 16384, all)", 2.0 * T * n_mix * hc_dim, times, diff)

    from ds4nb.kernels import gemm_f64 as G
    for scaled in (False, True):
        kern = G._make_gemm(scaled)
        res = resources(kern, {k: k for k in ("DMMA", "LDS", "STS", "CALL", "BAR")})
        print(f"gemm scaled={scaled}: " + ", ".join(f"{k} {v}" for k, v in res.items()))
    if args.out:
        path = Path(args.out) / "f64_mma.csv"
        with open(path, "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["product", "tokens", "flops", "scalar_us", "mma_us", "scalar_tflops", "mma_tflops",
                         "dgemm_peak_tflops", "bits_differ"])
            wr.writerows(rows)


if __name__ == "__main__":
    main()
