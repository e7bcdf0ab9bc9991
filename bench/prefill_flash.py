"""The prefill issue's measurement on the full flash preset, in one process (kernels compile once).

``python bench/prefill_flash.py --out DIR``: writes (or reuses) the 43-layer
flash file in /dev/shm, then runs the CLI exactly as a user would,
``DS4_CUDA_PREFILL_PATH=<s> ds4nb bench -m FILE --ctx-start 2048 --ctx-max
2048 --gen-tokens 32 --csv DIR/bench_flash_<s>.csv`` for each strategy
(``ds4nb.cli.main`` in this process, so Numba compiles each kernel once for
all of them), then ``ds4nb dispatch -m FILE`` (the measured table ``auto``
uses) and the Q8_0 matmul kernels against cuBLAS's measured peak
(``bench/prefill.py kernels``).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="/dev/shm/flash-43L.gguf")
    p.add_argument("--strategies", type=lambda s: s.split(","), default=["cublas", "mmq", "warp8"])
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--no-tables", action="store_true", help="skip the dispatcher's table and the matmul kernels")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from numba import cuda

    from ds4nb.cli import main as ds4nb

    model = Path(args.model)
    if not model.exists():
        from ds4nb.model.synth import write_synthetic

        t0 = time.perf_counter()
        write_synthetic(model, "flash", seed=1)
        print(f"synth: {time.perf_counter() - t0:.1f} s", flush=True)
    for s in args.strategies:
        os.environ["DS4_CUDA_PREFILL_PATH"] = s
        t0 = time.perf_counter()
        rc = ds4nb(["bench", "-m", str(model), "--ctx-start", "2048", "--ctx-max", "2048", "--gen-tokens", "32",
                    "--csv", str(out / f"bench_flash_{s}.csv")])
        print(f"DS4_CUDA_PREFILL_PATH={s} ds4nb bench: rc {rc}, {time.perf_counter() - t0:.1f} s", flush=True)
        print((out / f"bench_flash_{s}.csv").read_text(), flush=True)
        gc.collect()                                  # the engine's GPU memory back before the next one loads
        cuda.current_context().deallocations.clear()
    os.environ.pop("DS4_CUDA_PREFILL_PATH", None)
    if args.no_tables:
        return 0
    ds4nb(["dispatch", "-m", str(model)])
    sys.path.insert(0, str(Path(__file__).parent))
    import prefill

    return prefill.main(["kernels", "--tokens", "512", "2048", "--reps", "5", "--out", str(out)])


if __name__ == "__main__":
    sys.exit(main())
