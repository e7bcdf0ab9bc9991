"""Decode speed per placement policy against each plan's roofline (run on the device machine).

``python bench/placement.py [--layers N] --out DIR``: writes (or reuses) a
flash-shaped model in /dev/shm, measures the read bandwidth of GPU memory and
of host-mapped memory (``ds4nb.dispatch.device``), records a usage profile on
one text (``ds4nb profile``'s engine path), then for each placement (``full``;
``partial`` under a 24 GB and a 70 GB card's share of the full 80.76 GiB
model, scaled to this model's size; ``partial`` under the 24 GB share with the
usage profile; ``direct``): loads, prefills another text, decodes greedy
tokens with CUDA graphs, chained as ``generate`` decodes them, and divides
the decode t/s by the plan's roofline (bytes a token reads from GPU memory /
GPU read bandwidth + bytes from host memory / host-mapped read bandwidth);
the same tokens step by step and without early launches beside it.  Writes
``placement.csv`` and ``placement.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import sys
import time
from pathlib import Path

import numpy as np

FULL_FLASH_BYTES = 80.76 * 2**30           # the published q2 file, which the 24 GB / 70 GB budgets refer to
TEXT_A = ("The ferryman counts the boats on the river each morning and writes their names in a ledger that his "
          "grandfather started, while the town wakes up around the market square. ")
TEXT_B = ("Quantum error correction protects fragile qubits by spreading one logical bit over many physical ones; "
          "syndromes are measured, decoded, and corrections applied faster than errors accumulate. ")


def _tokens(tok, text: str, n: int) -> list[int]:
    unit = tok.encode_ordinary(text)
    return (unit * (n // len(unit) + 1))[:n]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--synth-dir", default="/dev/shm")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--profile-tokens", type=int, default=256)
    p.add_argument("--gen", type=int, default=32)
    p.add_argument("--out", default="/tmp/out")
    p.add_argument("--model", default=None, help="an existing DS4 GGUF instead of a synthetic flash-shaped one")
    p.add_argument("--bw-bytes", type=int, default=1 << 30, help="buffer size of the bandwidth probes")
    p.add_argument("--only", default="", help="comma-separated placements to run (substrings of their names)")
    args = p.parse_args(argv)

    from ds4nb.cache.options import GpuBudget, PlacementOptions
    from ds4nb.cache.plan import engine_tensors
    from ds4nb.cache.roofline import roofline
    from ds4nb.cache.usage import ExpertUsage
    from ds4nb.dispatch.device import measure_read_bandwidth
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic
    from ds4nb.sampling import GREEDY
    from ds4nb.tokenizer import Tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.model) if args.model else Path(args.synth_dir) / f"flash-{args.layers}L.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        write_synthetic(path, "flash", seed=1, n_layer=args.layers)
        print(f"synth {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    model = load_model(path)
    cfg = model.config
    tensors = engine_tensors(model)
    size = sum(t.nbytes for t in tensors)
    bw = measure_read_bandwidth(device_bytes=args.bw_bytes, host_bytes=args.bw_bytes // 4)
    print(f"model {size / 2**30:.2f} GiB; read bandwidth {bw.describe()}", flush=True)
    tok = Tokenizer.from_gguf(model)

    # a usage profile on text A
    eng = CudaEngine(model, ctx=args.profile_tokens + 8, count_experts=True)
    eng.prefill(_tokens(tok, TEXT_A, args.profile_tokens))
    usage = ExpertUsage(model.name, tuple(tuple(int(c) for c in row) for row in eng.expert_counts()))
    usage.save(out / "usage.json")
    del eng
    gc.collect()

    def share(gb: float) -> GpuBudget:
        return GpuBudget.parse(str(int(size * gb * 2**30 / FULL_FLASH_BYTES)))

    configs = [("full", PlacementOptions("full")),
               ("partial, 24 GB share", PlacementOptions("partial", gpu_budget=share(24))),
               ("partial, 24 GB share + usage profile", PlacementOptions("partial", gpu_budget=share(24),
                                                                          expert_usage=usage)),
               ("partial, 70 GB share", PlacementOptions("partial", gpu_budget=share(70))),
               ("direct", PlacementOptions("direct"))]
    if args.only:
        configs = [c for c in configs if any(o.strip() in c[0] for o in args.only.split(","))]
    prompt = _tokens(tok, TEXT_B, args.prompt)
    rows = []
    for name, options in configs:
        t0 = time.perf_counter()
        eng = CudaEngine(model, ctx=args.prompt + 3 * args.gen + 16, placement=options)
        t_load = time.perf_counter() - t0
        logits = eng.prefill(prompt)
        first = int(np.argmax(logits))
        start = eng.snapshot()
        for t in eng.decode_chain(first, GREEDY, np.random.default_rng(0), 3):   # compile and capture
            pass

        def chained() -> float:
            """t/s of what ``generate`` runs: each step enqueued before the previous token reaches the host."""
            eng.restore(start)
            t0 = time.perf_counter()
            for _ in eng.decode_chain(first, GREEDY, np.random.default_rng(0), args.gen):
                pass
            return args.gen / (time.perf_counter() - t0)

        def step_by_step() -> float:
            """t/s of one ``decode_sample`` a token (the host waits for each token before the next step)."""
            eng.restore(start)
            t, t0 = first, time.perf_counter()
            for _ in range(args.gen):
                t = eng.decode_sample(t, GREEDY, np.random.default_rng(0))
            return args.gen / (time.perf_counter() - t0)

        tps = chained()
        tps_step = step_by_step()
        eng.set_early_launch(False)                 # early (programmatic dependent) launches off: chained again
        for t in eng.decode_chain(first, GREEDY, np.random.default_rng(0), 3):   # the new steps' capture
            pass
        tps_late = chained() if eng.use_graphs else tps
        eng.set_early_launch(True)
        roof = roofline(eng.plan, tensors, cfg.n_expert_used, device_bw=bw.device, host_bw=bw.host,
                        usage=options.expert_usage)
        row = dict(placement=name, gpu_gib=eng.plan.device_bytes / 2**30, host_gib=eng.plan.mapped_bytes / 2**30,
                   load_s=t_load, decode_tps=tps, gpu_gb_per_token=roof.per_token.device / 1e9,
                   host_gb_per_token=roof.per_token.host / 1e9, roofline_tps=roof.tokens_per_second,
                   ratio=tps / roof.tokens_per_second, step_by_step_tps=tps_step, no_early_launch_tps=tps_late,
                   prefetched_layers=len(eng.prefetched_layers), mode=eng.decode_mode)
        rows.append(row)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
        del eng
        gc.collect()
    with open(out / "placement.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()})
    lines = [f"# placement, {model.name} ({args.layers} layers, {size / 2**30:.2f} GiB)", "",
             f"- read bandwidth: {bw.describe()}",
             f"- usage profile: {args.profile_tokens} tokens of text A; decode measured after {args.prompt} tokens of "
             f"text B, {args.gen} greedy tokens (chained: ``decode_chain``, as ``generate``); the same tokens "
             "one ``decode_sample`` at a time, and chained without early launches, in the same engine", "",
             "| placement | GPU GiB | host GiB | load s | decode t/s | GPU GB/token | host GB/token | roofline t/s | "
             "ratio | step by step t/s | no early launch t/s | prefetched layers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['placement']} | {r['gpu_gib']:.2f} | {r['host_gib']:.2f} | {r['load_s']:.1f} | "
              f"{r['decode_tps']:.2f} | {r['gpu_gb_per_token']:.3f} | {r['host_gb_per_token']:.3f} | "
              f"{r['roofline_tps']:.1f} | {r['ratio']:.2f} | {r['step_by_step_tps']:.2f} | "
              f"{r['no_early_launch_tps']:.2f} | {r['prefetched_layers']} |" for r in rows]
    (out / "placement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
