"""Routed-expert kernels of a prefill chunk at flash shapes: per slot, grouped (dp4a) and tensor-core tiles.

``python bench/moe_tiles.py [--tokens 512] [--once NAME]``: random IQ2_XXS gate/up and Q2_K down experts
(256 x 2048 x 4096 / 256 x 4096 x 2048), router-like skewed picks of 6 experts a token; every variant is
checked bit for bit against the per-slot kernels, then timed (CUDA events, 20 launches).  Prints us per
launch, TOPS (2 x the slots' multiply-adds), the kernels' registers and local memory.  ``--once NAME``
launches one variant once after a warm-up (for a profiler).
"""

from __future__ import annotations

import argparse
import functools

import numpy as np


#: knobs of the tensor-core tiles to time
VARIANTS = [{"min_blocks": 0}, {"min_blocks": 4}]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--skew", type=float, default=1.0)
    ap.add_argument("--once", default="")
    args = ap.parse_args()

    from gguf.constants import GGMLQuantizationType as Q
    from numba import cuda

    from ds4nb.kernels import moe as M
    from ds4nb.kernels import moe_grouped as G
    from ds4nb.kernels import moe_mma as T
    from ds4nb.kernels.activation import alloc_q8_K, q8_K_to_device
    from ds4nb.plugins import get_registry
    from ds4nb.quants import random_blocks
    from ds4nb.quants.repack import repack

    rng = np.random.default_rng(1234)
    e, d, f, n_used = 256, 4096, 2048, 6
    gate, up = (repack(random_blocks(Q.IQ2_XXS, (e, f, d), rng, rms=0.02), Q.IQ2_XXS, (e, f, d)).to_device()
                for _ in range(2))
    down = repack(random_blocks(Q.Q2_K, (e, d, f), rng, rms=0.02), Q.Q2_K, (e, d, f)).to_device()
    n_tok = args.tokens
    sel = G.model_sel(rng, e, n_tok, n_used, args.skew)
    n = sel.size
    sel_d = cuda.to_device(sel)
    groups = G.alloc_slot_groups(n, e)
    G.group_slots(sel_d, out=groups)
    weights = cuda.to_device(rng.uniform(0.05, 1.0, n).astype(np.float32))
    x = M._x(rng, n_tok, d)
    xk, x_slots = q8_K_to_device(x), q8_K_to_device(np.repeat(x, n_used, axis=0))

    def out(rows):
        return cuda.to_device(np.full(n * rows, np.nan, np.float32))

    mid_ref, down_ref = out(f), out(d)
    M._moe_gate_up(Q.IQ2_XXS, gate, up, sel_d, weights, x_slots, 1.0, out=mid_ref)
    mk = alloc_q8_K(n, f)
    get_registry().select("act.quantize_q8_K")(mid_ref.reshape(n, f), out=mk)
    M._moe_matvec(Q.Q2_K, down, sel_d, mk, out=down_ref)
    ref = {"gate_up": mid_ref.copy_to_host().view(np.uint32), "down": down_ref.copy_to_host().view(np.uint32)}

    variants = {
        "gate_up per-slot": ("gate_up", lambda o: M._moe_gate_up(Q.IQ2_XXS, gate, up, sel_d, weights, x_slots, 1.0,
                                                                  out=o)),
        "gate_up grouped": ("gate_up", lambda o: G._moe_gate_up_grouped(Q.IQ2_XXS, gate, up, groups, weights, xk,
                                                                         1.0, out=o, min_blocks=3)),
        "down per-slot": ("down", lambda o: M._moe_matvec(Q.Q2_K, down, sel_d, mk, out=o)),
        "down grouped": ("down", lambda o: G._moe_matvec_grouped(Q.Q2_K, down, groups, mk, out=o)),
    }
    for knobs in VARIANTS:
        kw = dict(knobs)
        tag = " ".join(f"{k}={v}" for k, v in kw.items())
        variants[f"gate_up tiles {tag}"] = ("gate_up", functools.partial(
            lambda o, kw: T._moe_gate_up_tiles(Q.IQ2_XXS, gate, up, groups, weights, xk, 1.0, out=o, **kw), kw=kw))
        variants[f"down tiles {tag}"] = ("down", functools.partial(
            lambda o, kw: T._moe_matvec_tiles(Q.Q2_K, down, groups, mk, out=o, **kw), kw=kw))

    if args.once:
        kind, fn = variants[args.once]
        o = out(f if kind == "gate_up" else d)
        fn(o)
        cuda.synchronize()
        fn(o)
        cuda.synchronize()
        return

    flops = {"gate_up": 2 * 2 * n * f * d, "down": 2 * n * d * f}
    print(f"T={n_tok}: {n} slots, {len(np.unique(sel))} experts used, most slots on one expert "
          f"{np.bincount(sel).max()}")
    print(f"{'variant':48s} {'us':>9s} {'TOPS':>7s}  bits")
    for name, (kind, fn) in variants.items():
        o = out(f if kind == "gate_up" else d)
        fn(o)
        same = np.array_equal(o.copy_to_host().view(np.uint32), ref[kind])
        start, stop = cuda.event(), cuda.event()
        start.record()
        for _ in range(20):
            fn(o)
        stop.record()
        stop.synchronize()
        us = start.elapsed_time(stop) * 1e3 / 20
        print(f"{name:48s} {us:9.1f} {flops[kind] / us / 1e6:7.1f}  {'same' if same else 'DIFFERENT'}")
    for knobs in VARIANTS:
        kw = dict(knobs)
        for qtype, kind, nb in ((Q.IQ2_XXS, "gate_up", d // 256), (Q.Q2_K, "matvec", f // 256)):
            kern = T._make_tiles(qtype, kind, M.default_lanes_per_row(kind, nb), nb, True, kw["min_blocks"])
            regs, local = kern.get_regs_per_thread(), kern.get_local_mem_per_thread()
            shared = kern.get_shared_mem_per_block()
            try:
                sass = "\n".join(kern.inspect_sass().values())
            except Exception as exc:        # noqa: BLE001 - nvdisasm may be missing
                sass = f"no SASS: {exc}"
            print(f"tiles {kind} {kw}: regs {list(regs.values())}, local {list(local.values())} B, shared "
                  f"{list(shared.values())} B; SASS lines {sass.count(chr(10))}, IMMA {sass.count('IMMA')}, "
                  f"LDL {sass.count('LDL')}, STL {sass.count('STL')}")


if __name__ == "__main__":
    main()
