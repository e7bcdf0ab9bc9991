"""Per-launcher timing of the CUDA engine on the tiny model (meant for NUMBA_ENABLE_CUDASIM=1).

    NUMBA_ENABLE_CUDASIM=1 python bench/sim_profile.py /tmp/t.gguf --prefill 0 --decode 1
    NUMBA_ENABLE_CUDASIM=1 python bench/sim_profile.py /tmp/t.gguf --prefill 45 --chunk 16 --decode 2

Wraps every launcher of ``engine.k`` (and the MoE triples) with a wall-clock
timer keyed by launcher name (+ weight shape for the Q8_0 products) and prints
a table per phase: calls, total seconds, seconds per call.  Each phase also
reports the process CPU time (every simulator thread of the process): on a
busy machine that is the better measure of what one free core would take.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np


def _key(name, args):
    if name in ("q8_matvec", "q8_matmul") and args:
        return f"{name} {args[0].shape[0]}x{args[0].shape[1]}"
    if name.startswith("moe") or name in ("f16_matvec",):
        w = args[0] if args else None
        shape = getattr(w, "shape", None)
        if shape is not None:
            return f"{name} {'x'.join(map(str, shape))}"
    return name


def instrument(engine, stats):
    k = engine.k

    def wrap(name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                s = stats[_key(name, args)]
                s[0] += 1
                s[1] += time.perf_counter() - t0
        return timed

    for name, fn in list(vars(k).items()):
        if name == "moe":
            k.moe = {q: tuple(wrap(f"moe.{q.name.lower()}.{kind}", f)
                              for kind, f in zip(("gate_up", "down_sum", "matvec"), fns))
                     for q, fns in fn.items()}
        elif callable(fn):
            setattr(k, name, wrap(name, fn))


def report(title, stats, wall, cpu):
    print(f"\n## {title}: {wall:.2f} s wall, {cpu:.2f} s process CPU")
    print(f"{'launcher':44s} {'calls':>6s} {'total s':>9s} {'s/call':>9s}")
    tot = 0.0
    for key, (n, t) in sorted(stats.items(), key=lambda kv: -kv[1][1]):
        print(f"{key:44s} {n:6d} {t:9.3f} {t / n:9.4f}")
        tot += t
    print(f"{'(sum of launchers)':44s} {'':6s} {tot:9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=0, help="prompt tokens before the decode steps")
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--decode", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--switch", type=float, default=None, help="sys.setswitchinterval (seconds) before the run")
    a = ap.parse_args()
    if a.switch:
        import sys

        sys.setswitchinterval(a.switch)

    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model

    model = load_model(a.model)
    t0 = time.perf_counter()
    eng = CudaEngine(model, chunk=a.chunk, ctx=256)
    print(f"setup {time.perf_counter() - t0:.2f} s")
    rng = np.random.default_rng(a.seed)
    vocab = model.config.n_vocab
    stats = defaultdict(lambda: [0, 0.0])
    instrument(eng, stats)
    if a.prefill:
        toks = rng.integers(0, vocab, a.prefill).tolist()
        t0, c0 = time.perf_counter(), time.process_time()
        logits = eng.prefill(toks)
        report(f"prefill {a.prefill} tokens (chunk {a.chunk})", stats, time.perf_counter() - t0,
               time.process_time() - c0)
        tok = int(np.argmax(logits))
    else:
        tok = int(rng.integers(0, vocab))
    for i in range(a.decode):
        stats.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        logits = eng.decode(tok)
        report(f"decode step {i} (pos {eng.pos - 1})", stats, time.perf_counter() - t0, time.process_time() - c0)
        tok = int(np.argmax(logits))


if __name__ == "__main__":
    main()
