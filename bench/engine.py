"""GPU engine check and benchmark (run on the device machine).

``python bench/engine.py check``: CUDA engine vs the numpy oracle on the
``tiny`` and ``small`` presets: greedy tokens after a prompt that crosses
the window and compression boundaries must be identical; prints the logits'
relative error per step.

``python bench/engine.py flash --layers N --out-dir DIR``: writes a
flash-shaped model (real per-layer shapes, N layers) with ``ds4nb synth``
(timed: GB/s), loads it with the ``full`` placement (timed: GiB/s), measures
prefill and decode tokens/s and the decode roofline ratio: the bytes one
token must read divided by the device-to-device copy bandwidth measured in
the same run.  Writes a CSV line per measurement to ``--csv``.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy, counting bytes read + written (GB/s)."""
    from numba import cuda

    a = cuda.device_array(nbytes // 4, np.float32)
    b = cuda.device_array(nbytes // 4, np.float32)
    b.copy_to_device(a)
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(reps):
        b.copy_to_device(a)
    stop.record()
    stop.synchronize()
    ms = cuda.event_elapsed_time(start, stop) / reps
    return 2 * nbytes / (ms * 1e-3) / 1e9


def token_bytes(model) -> int:
    """Weight bytes one decode token reads: everything but the unused routed experts and embedding rows."""
    cfg = model.config
    total = 0
    for t in model.catalog:
        if t.role is None:
            continue
        if t.role == "routed_expert":
            total += t.nbytes * cfg.n_expert_used // cfg.n_expert
        elif t.role == "token_embd":
            total += t.row_bytes
        elif t.name.endswith("tid2eid.weight"):
            total += t.row_bytes
        else:
            total += t.nbytes
    return total


def check(args: argparse.Namespace) -> int:
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic
    from ds4nb.reference.engine import CpuEngine

    ok = True
    rows = []
    for preset, n_prompt in (("tiny", 45), ("small", 300)):
        path = Path(args.out_dir) / f"{preset}.gguf"
        write_synthetic(path, preset, seed=args.seed)
        model = load_model(path)
        rng = np.random.default_rng(args.seed)
        prompt = rng.integers(0, model.config.n_vocab, n_prompt).tolist()
        gpu = CudaEngine(model, ctx=1024, chunk=32)
        cpu = CpuEngine(model)
        t0 = time.perf_counter()
        lg = gpu.prefill(prompt)
        t_prefill = time.perf_counter() - t0
        lc = cpu.prefill(prompt)
        errs, same = [float(np.linalg.norm(lg - lc) / np.linalg.norm(lc))], True
        gt, ct = int(lg.argmax()), int(lc.argmax())
        n_gen = args.tokens
        t_dec = 0.0
        for _ in range(n_gen):
            same &= gt == ct
            if not same:
                break
            t0 = time.perf_counter()
            lg = gpu.decode(gt)
            t_dec += time.perf_counter() - t0
            lc = cpu.decode(ct)
            errs.append(float(np.linalg.norm(lg - lc) / np.linalg.norm(lc)))
            gt, ct = int(lg.argmax()), int(lc.argmax())
        # state round trip: the GPU session restored into a fresh engine continues identically
        snap = gpu.snapshot()
        a = gpu.decode(gt)
        gpu2 = CudaEngine(model, ctx=1024, chunk=32)
        gpu2.restore(snap)
        b = gpu2.decode(gt)
        restore_err = float(np.abs(a - b).max())
        ok &= same and max(errs) < 1e-2 and restore_err == 0.0
        rows.append((preset, n_prompt, n_gen, same, max(errs), restore_err, n_prompt / t_prefill, n_gen / t_dec))
    print(f"{'preset':6} {'prompt':>6} {'gen':>4} {'tokens==oracle':>14} {'max rel err':>11} {'restore':>8} "
          f"{'prefill t/s':>11} {'decode t/s':>10}")
    for r in rows:
        print(f"{r[0]:6} {r[1]:6d} {r[2]:4d} {str(r[3]):>14} {r[4]:11.2e} {r[5]:8.1e} {r[6]:11.1f} {r[7]:10.2f}")
    return 0 if ok else 1


def flash(args: argparse.Namespace) -> int:
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic

    out = Path(args.out_dir) / f"flash-{args.layers}L.gguf"
    t0 = time.perf_counter()
    plan = write_synthetic(out, "flash", seed=args.seed, n_layer=args.layers, workers=args.workers)
    t_write = time.perf_counter() - t0
    write_gbs = plan.total_bytes / t_write / 1e9
    print(f"synth flash {args.layers} layers: {plan.total_bytes / 2**30:.2f} GiB in {t_write:.1f} s "
          f"({write_gbs:.2f} GB/s, {args.workers or os.cpu_count()} workers)", flush=True)
    model = load_model(out)
    bw = copy_bandwidth()
    t0 = time.perf_counter()
    eng = CudaEngine(model, ctx=args.ctx, chunk=args.chunk)
    t_load = time.perf_counter() - t0
    print(f"load: {eng.plan.device_bytes / 2**30:.2f} GiB in {t_load:.1f} s "
          f"({eng.plan.device_bytes / 2**30 / t_load:.2f} GiB/s); {eng.describe()}", flush=True)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, model.config.n_vocab, args.prompt).tolist()
    eng.prefill(prompt[:8])  # warm-up: compiles every kernel
    eng.reset()
    from numba import cuda

    cuda.synchronize()
    t0 = time.perf_counter()
    logits = eng.prefill(prompt)
    t_prefill = time.perf_counter() - t0
    tok = int(logits.argmax())
    from ds4nb.sampling import GREEDY

    t0 = time.perf_counter()
    for _ in range(args.gen):
        tok = eng.decode_sample(tok, GREEDY, rng)
    t_decode = time.perf_counter() - t0
    dec_tps = args.gen / t_decode
    per_tok = token_bytes(model)
    roofline_tps = bw * 1e9 / 2 / per_tok  # reading per_tok bytes at the copy's read rate (half of read+write)
    row = dict(device=eng.probe.name, layers=args.layers, model_gib=round(plan.total_bytes / 2**30, 2),
               synth_gbs=round(write_gbs, 2), load_gibs=round(eng.plan.device_bytes / 2**30 / t_load, 2),
               prompt_tokens=args.prompt, prefill_tps=round(args.prompt / t_prefill, 2), gen_tokens=args.gen,
               decode_tps=round(dec_tps, 2), bytes_per_token=per_tok, copy_gbs=round(bw, 1),
               roofline_tps=round(roofline_tps, 1), roofline_ratio=round(dec_tps / roofline_tps, 4))
    for k, v in row.items():
        print(f"{k:16} {v}")
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)
    if not args.keep:
        out.unlink()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("--out-dir", default="/tmp")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--tokens", type=int, default=32)
    c.set_defaults(func=check)
    f = sub.add_parser("flash")
    f.add_argument("--layers", type=int, default=20)
    f.add_argument("--out-dir", default="/dev/shm")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--workers", type=int, default=None)
    f.add_argument("--ctx", type=int, default=4096)
    f.add_argument("--chunk", type=int, default=64)
    f.add_argument("--prompt", type=int, default=512)
    f.add_argument("--gen", type=int, default=32)
    f.add_argument("--csv", default=None)
    f.add_argument("--keep", action="store_true")
    f.set_defaults(func=flash)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
