"""Where the CUDA simulator spends its time in one engine step (for keeping CI's simulator tests cheap).

    NUMBA_ENABLE_CUDASIM=1 python bench/sim_profile.py /tmp/tiny.gguf [--prefill 20] [--tokens 1] [--chunk 4]

Prefills ``--prefill`` tokens, then runs the launch list of one step of
``--tokens`` tokens launch by launch, timing each, and prints the kernels by
total time (calls, seconds).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--prefill", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=4)
    args = ap.parse_args(argv)

    from ds4nb.engine.graph import kernel_name
    from ds4nb.engine.model import build_step
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model

    model = load_model(args.model)
    eng = CudaEngine(model, ctx=args.prefill + args.tokens + 8, chunk=max(args.chunk, args.tokens))
    tokens = np.random.default_rng(0).integers(0, model.config.n_vocab, args.prefill + args.tokens).tolist()
    if args.prefill:
        eng.prefill(tokens[:args.prefill])
    eng.inputs.write(tokens[args.prefill:], eng.position)
    eng.inputs.upload(0)
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter = Counter()
    launches = build_step(eng._step, args.tokens, sample=False)
    cpu0 = time.process_time()
    for launch in launches:
        t0 = time.perf_counter()
        launch(0)
        name = kernel_name(launch.kernel)
        seconds[name] += time.perf_counter() - t0
        calls[name] += 1
    total = sum(seconds.values())
    print(f"{len(launches)} launches, {total:.2f} s wall, {time.process_time() - cpu0:.2f} s cpu")
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{s:8.3f} s {calls[name]:5d}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
