"""What a kernel boundary costs in a replayed CUDA graph, with and without programmatic dependent launch.

A chain of CHAIN dependent launches (each reads the previous one's output at a shifted index, ping-pong
buffers: a launch that ran ahead of its predecessor would read stale values and fail the check), captured as
one ``cuda.core`` graph and replayed.  Variants per launch geometry:

- ``plain``: a kernel without griddepcontrol, ordinary launches (the engine today);
- ``pdl-kernel``: the kernel that starts with ``wait_prior_grid`` (wait, then let the next grid launch),
  ordinary launches (what the instructions cost when no launch is early);
- ``early``: the same kernel, every launch after the first early (``_launch.launch_early``).

Prints microseconds per launch; checks every variant's result against numpy.  Usage (device):
    python3 bench/launch_gap.py [--chain 256] [--reps 20]
"""

from __future__ import annotations

import argparse

import numpy as np
from numba import cuda

from ds4nb.kernels._launch import Launch
from ds4nb.kernels.intrinsics import float32, wait_prior_grid


@cuda.jit
def plain(src, dst, n):
    i = cuda.grid(1)
    if i < n:
        dst[i] = src[(i + 1) % n] * float32(0.5) + float32(1.0)


@cuda.jit
def pdl(src, dst, n):
    wait_prior_grid()
    i = cuda.grid(1)
    if i < n:
        dst[i] = src[(i + 1) % n] * float32(0.5) + float32(1.0)


def expected(a0: np.ndarray, steps: int) -> np.ndarray:
    a = a0.copy()
    for _ in range(steps):
        a = np.roll(a, -1) * np.float32(0.5) + np.float32(1.0)
    return a


def chain(kernel, geometries, bufs, n, n_chain, early):
    out = []
    for k in range(n_chain):
        grid, block = geometries[k % len(geometries)]
        src, dst = bufs[k % 2], bufs[(k + 1) % 2]
        out.append(Launch(kernel, grid, block, (src, dst, n), early=early and k > 0))
    return out


def main() -> None:
    from ds4nb.engine.graph import _core_device, capture

    ap = argparse.ArgumentParser()
    ap.add_argument("--chain", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    stream = cuda.stream()
    core = _core_device().create_stream(stream)
    rng = np.random.default_rng(0)
    shapes = {
        "1 x 1024": [(1, 1024)],
        "128 x 128": [(128, 128)],
        "1056 x 256": [(1056, 256)],
        "mixed": [(1, 1024), (128, 128), (1056, 256), (64, 256)],
    }
    variants = [("plain", plain, False), ("pdl-kernel", pdl, False), ("early", pdl, True)]
    print(f"{'geometry':>12} " + " ".join(f"{v[0]:>16}" for v in variants) + "   (us per launch)")
    for name, geoms in shapes.items():
        n = min(g * b for g, b in geoms)           # every launch of the chain covers all n values
        row = []
        for vname, kernel, early in variants:
            a0 = rng.standard_normal(n).astype(np.float32)
            bufs = [cuda.to_device(a0), cuda.device_array(n, np.float32)]
            launches = chain(kernel, geoms, bufs, n, a.chain, early)
            for x in launches:                      # eager run: compiles, and checks the chain
                x(stream)
            stream.synchronize()
            ok = np.array_equal(bufs[a.chain % 2].copy_to_host(), expected(a0, a.chain))
            bufs[0].copy_to_device(a0)
            graph = capture(launches)
            graph.upload(core)
            graph.launch(core)
            core.sync()
            ok = ok and np.array_equal(bufs[a.chain % 2].copy_to_host(), expected(a0, a.chain))
            start, stop = cuda.event(), cuda.event()
            start.record(stream)
            for _ in range(a.reps):
                graph.launch(core)
            stop.record(stream)
            stop.synchronize()
            us = 1000.0 * start.elapsed_time(stop) / (a.reps * a.chain)
            row.append(f"{us:13.2f}{'   ' if ok else ' !!'}")
        print(f"{name:>12} " + " ".join(f"{r:>16}" for r in row))
    print("!! = result differs from numpy's")


if __name__ == "__main__":
    main()
