"""Routed-expert kernels of a prefill chunk at flash shapes: per slot, grouped (dp4a) and tensor-core tiles.

``python bench/moe_tiles.py [--tokens 1024] [--skew 1] [--once NAME]``: random IQ2_XXS gate/up and Q2_K down
experts (256 x 2048 x 4096 / 256 x 4096 x 2048), router-like skewed picks of 6 experts a token (``--skew 0``:
uniform popularity); every variant is checked bit for bit against the per-slot kernels, then timed (CUDA events,
20 launches).  Prints us per launch, TOPS (2 x the slots' multiply-adds), the tiles' registers and local memory,
and which IQ2_XXS gate/up kernel the registry should prefer (``moe_mma.PRIORITY``, ``IQ2_SIGNS``,
``MIN_BLOCKS``).  ``--once NAME`` launches one variant once after a warm-up (for a profiler).
"""

from __future__ import annotations

import argparse
import functools

import numpy as np
from kernels import resources      # bench/ is the script's directory


#: knobs of the tensor-core tiles to time: IQ2_XXS gate/up with both sign selectors, Q2_K down
GATE_UP_TILES = [{"min_blocks": mb, "iq2_signs": signs} for signs in ("table", "alu") for mb in (0, 4)]
DOWN_TILES = [{"min_blocks": 0}, {"min_blocks": 4}]
#: the grouped dp4a gate/up (``expert_blocks``) at its measured best: 3 blocks an SM
GROUPED_GATE_UP = {"min_blocks": 3}


def _tag(kw: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in kw.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)   # the engine's prefill chunk on a large GPU
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

    grouped_gate_up = f"gate_up grouped {_tag(GROUPED_GATE_UP)}"
    variants = {
        "gate_up per-slot": ("gate_up", lambda o: M._moe_gate_up(Q.IQ2_XXS, gate, up, sel_d, weights, x_slots, 1.0,
                                                                  out=o)),
        grouped_gate_up: ("gate_up", lambda o: G._moe_gate_up_grouped(Q.IQ2_XXS, gate, up, groups, weights, xk,
                                                                       1.0, out=o, **GROUPED_GATE_UP)),
        "down per-slot": ("down", lambda o: M._moe_matvec(Q.Q2_K, down, sel_d, mk, out=o)),
        "down grouped": ("down", lambda o: G._moe_matvec_grouped(Q.Q2_K, down, groups, mk, out=o)),
    }
    for kw in GATE_UP_TILES:
        variants[f"gate_up tiles {_tag(kw)}"] = ("gate_up", functools.partial(
            lambda o, kw: T._moe_gate_up_tiles(Q.IQ2_XXS, gate, up, groups, weights, xk, 1.0, out=o, **kw), kw=kw))
    for kw in DOWN_TILES:
        variants[f"down tiles {_tag(kw)}"] = ("down", functools.partial(
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
    times, same = {}, {}
    for name, (kind, fn) in variants.items():
        o = out(f if kind == "gate_up" else d)
        fn(o)
        same[name] = np.array_equal(o.copy_to_host().view(np.uint32), ref[kind])
        start, stop = cuda.event(), cuda.event()
        start.record()
        for _ in range(20):
            fn(o)
        stop.record()
        stop.synchronize()
        times[name] = us = start.elapsed_time(stop) * 1e3 / 20
        print(f"{name:48s} {us:9.1f} {flops[kind] / us / 1e6:7.1f}  {'same' if same[name] else 'DIFFERENT'}")

    kernels = [(Q.IQ2_XXS, "gate_up", d // 256, kw) for kw in GATE_UP_TILES]
    kernels += [(Q.Q2_K, "matvec", f // 256, kw) for kw in DOWN_TILES]
    for qtype, kind, nb, kw in kernels:
        kern = T._make_tiles(qtype, kind, M.default_lanes_per_row(nb), nb, True, kw["min_blocks"],
                             kw.get("iq2_signs", "table"))
        res = resources(kern, {k: k for k in ("IMMA", "LDS", "POPC", "LDL", "STL")})
        print(f"tiles {qtype.name} {kind} {_tag(kw)}: " + ", ".join(f"{k} {v}" for k, v in res.items()))

    # what the registry should prefer for IQ2_XXS gate/up (moe_mma.PRIORITY against expert_blocks' 10)
    tiles = [(times[f"gate_up tiles {_tag(kw)}"], kw) for kw in GATE_UP_TILES if same[f"gate_up tiles {_tag(kw)}"]]
    if not tiles or not same[grouped_gate_up]:
        print("IQ2_XXS gate/up: a variant gave DIFFERENT bits: no verdict")
        return
    best_us, best = min(tiles, key=lambda t: t[0])
    grouped_us = times[grouped_gate_up]
    print(f"IQ2_XXS gate/up: fastest tiles {_tag(best)} {best_us:.1f} us, expert_blocks {grouped_us:.1f} us: "
          + (f"tiles first: moe_mma.PRIORITY[IQ2_XXS] = 20, IQ2_SIGNS = {best['iq2_signs']!r}, "
             f"MIN_BLOCKS[IQ2_XXS] = {best['min_blocks']}" if best_us < grouped_us
             else "expert_blocks first: moe_mma.PRIORITY[IQ2_XXS] stays below 10"))


if __name__ == "__main__":
    main()
