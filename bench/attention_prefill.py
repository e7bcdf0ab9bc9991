"""Attention of one flash prefill chunk (``attn.decode``): ``split_heads8`` against the float64-MMA ``heads_mma``.

``python bench/attention_prefill.py [--tokens 512] [--pos0 1536] [--reps 10]``: the step a CSA layer of the flash
preset attends in when the engine prefills tokens ``pos0 .. pos0 + T - 1`` in one chunk: 64 heads x 512, the
window ring of ``128 + T - 1`` F16 rows, the compressed rows so far (F16; the indexer's random top 512 per token
once there are more), the step records ``ds4nb.engine.step`` fills, the inverse RoPE.  Each variant (both kernels
of the op: partials and merge) runs once (compile, warm-up), is compared with ``split_heads8`` bit for bit, then
timed with CUDA events over ``--reps`` launches.  Prints us per launch and per token, TFLOP/s (``4 n_head head_dim``
FLOPs per row a token reads: scores and weighted sum), the fraction of outputs whose float32 bits differ from
``split_heads8``'s (the contract allows ~1e-7 of them, one ulp each), and the MMA kernels' registers and local
memory.  The merge alone is timed too (its share of every variant).
"""

from __future__ import annotations

import argparse

import numpy as np

N_HEAD, HEAD_DIM, N_SWA, RATIO, TOP_K, N_ROT = 64, 512, 128, 4, 512, 64

#: heads_mma knobs to time (the first: the launcher's defaults)
VARIANTS = {
    "heads_mma": {},
    "heads_mma prefetch=False": dict(prefetch=False),
    "heads_mma chunk=8": dict(chunk=8),
    "heads_mma hpb=8 prefetch=False min_blocks=2": dict(hpb=8, prefetch=False, min_blocks=2),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--pos0", type=int, default=1536)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()

    from numba import cuda

    from ds4nb.kernels import attention as A
    from ds4nb.kernels import attention_mma as M
    from ds4nb.kernels.rope import make_test_rope
    from ds4nb.kernels.step import N_RAW, NF, ROWS, SELECT, VISIBLE, group_offset, records

    rng = np.random.default_rng(1234)
    n_tok = args.tokens
    ring = N_SWA + n_tok - 1
    grp = group_offset(1)                   # the CSA group; the HCA layers are group 2
    steps = records(args.pos0, n_tok, N_SWA, [(RATIO, TOP_K), (128, 0)], ring=ring).reshape(n_tok, NF)
    n_comp = max(int(steps[-1, grp + ROWS]), 1)
    sel = np.zeros((n_tok, TOP_K), np.int32)
    for t in np.flatnonzero(steps[:, grp + SELECT]):
        sel[t] = rng.choice(int(steps[t, grp + ROWS]), TOP_K, replace=False)
    rows = (steps[:, N_RAW] + steps[:, grp + VISIBLE]).astype(np.int64)
    flops = 4 * N_HEAD * HEAD_DIM * int(rows.sum())

    q = cuda.to_device(rng.standard_normal(n_tok * N_HEAD * HEAD_DIM).astype(np.float32))
    raw = cuda.to_device(rng.standard_normal((ring, HEAD_DIM)).astype(np.float16))
    comp = cuda.to_device(rng.standard_normal((n_comp, HEAD_DIM)).astype(np.float16))
    sinks = cuda.to_device((0.5 * rng.standard_normal(N_HEAD)).astype(np.float32))
    sel_d = cuda.to_device(sel) if steps[:, grp + SELECT].any() else None
    steps_d = cuda.to_device(steps.reshape(-1))
    scratch = A.alloc_attn_scratch(N_HEAD, HEAD_DIM, tokens=n_tok)
    kw = dict(steps=steps_d, grp=grp, max_rows=N_SWA + TOP_K, rope=make_test_rope(N_ROT, True), scratch=scratch)
    print(f"T={n_tok} at positions {args.pos0}..{args.pos0 + n_tok - 1}: {rows.min()}..{rows.max()} rows a token "
          f"({n_comp} compressed, indexer {'on' if sel_d is not None else 'off'}), {flops / n_tok / 1e6:.1f} "
          f"MFLOP a token")

    def split_heads8(out):
        A.attention_decode(q, raw, comp, sinks, sel_d, out=out, **kw)

    def merge_only(out):
        A.combine_splits(scratch, 1, sinks, out=out, n_tok=n_tok, head_dim=HEAD_DIM, rope=kw["rope"], steps=steps_d)

    variants = {"split_heads8": split_heads8}
    for name, knobs in VARIANTS.items():
        variants[name] = lambda out, knobs=knobs: M.attention_mma(q, raw, comp, sinks, sel_d, out=out, mma=True,
                                                                  **knobs, **kw)
    variants["merge only (n_split 1)"] = merge_only

    out = cuda.device_array(n_tok * N_HEAD * HEAD_DIM, np.float32)
    ref = None
    print(f"{'variant':46s} {'us':>9s} {'us/token':>9s} {'TFLOP/s':>8s} {'bits differ':>12s}")
    for name, fn in variants.items():
        fn(out)
        got = out.copy_to_host().view(np.uint32)
        if ref is None:
            ref = got.copy()
        start, stop = cuda.event(), cuda.event()
        start.record()
        for _ in range(args.reps):
            fn(out)
        stop.record()
        stop.synchronize()
        us = start.elapsed_time(stop) * 1e3 / args.reps
        merge = name.startswith("merge")
        print(f"{name:46s} {us:9.1f} {us / n_tok:9.2f} {'' if merge else f'{flops / us / 1e6:8.1f}':>8s} "
              f"{'' if merge else f'{np.mean(got != ref):12.2e}':>12s}")

    for name, knobs in VARIANTS.items():
        g = M.mma_geometry(N_HEAD, HEAD_DIM, kw["max_rows"], 2, n_tok, **knobs)
        kern = M._mma_kernel(g.hpb, HEAD_DIM, g.chunk, g.warps, "float16", g.prefetch, g.min_blocks)
        try:
            regs, local = kern.get_regs_per_thread(), kern.get_local_mem_per_thread()
            print(f"{name}: {g}, registers {list(regs.values())}, local memory {list(local.values())} B, shared "
                  f"{M.shared_bytes(g.hpb, HEAD_DIM, g.chunk, g.warps, 2)} B")
        except Exception as exc:  # noqa: BLE001 - depends on the driver
            print(f"{name}: {g}, no resource counts ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    main()
