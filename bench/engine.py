"""GPU engine check and benchmark (run on the device machine).

``python bench/engine.py flash [--layers N] [--model F] --out DIR``: one
model load, every number of the decode issue: writes (or reuses) a
flash-shaped model in /dev/shm (synth GB/s), measures the device's copy and
read-only bandwidth, loads it with the ``full`` placement (GiB/s), runs the
``ds4nb bench`` frontier sweep (prefill and generation t/s per frontier,
CUDA graphs), then at the last frontier: graph vs eager decode, wall and GPU
time per token (CUDA events around each step), launches per token, GPU time
per op family, and the decode roofline (bytes a token must read / read-only
bandwidth).  Writes ``flash_bench.csv``, ``flash_families.csv`` and
``flash_summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 10) -> float:
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
    ms = start.elapsed_time(stop) / reps
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


def flash(args: argparse.Namespace) -> int:
    from ds4nb.bench import FILLER, BenchRow, run_bench
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic
    from ds4nb.sampling import GREEDY
    from ds4nb.tokenizer import Tokenizer

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts: dict[str, object] = {}
    path = Path(args.model) if args.model else Path(args.synth_dir) / f"flash-{args.layers or 43}L.gguf"
    if not path.exists():
        t0 = time.perf_counter()
        plan = write_synthetic(path, "flash", seed=args.seed, n_layer=args.layers, workers=args.workers)
        dt = time.perf_counter() - t0
        facts["synth"] = f"{plan.total_bytes / 2**30:.2f} GiB in {dt:.1f} s ({plan.total_bytes / dt / 1e9:.2f} GB/s)"
        print("synth:", facts["synth"], flush=True)
    model = load_model(path)
    from numba import config

    from ds4nb.dispatch.device import measure_read_bandwidth

    if config.ENABLE_CUDASIM:
        copy_bw = read_bw = 1.0
    else:
        copy_bw = copy_bandwidth(args.bw_bytes)
        read_bw = measure_read_bandwidth(device_bytes=args.bw_bytes, host_bytes=64 << 20).device / 1e9
    facts["bandwidth"] = f"copy {copy_bw:.0f} GB/s (read + write), read-only {read_bw:.0f} GB/s"
    print("bandwidth:", facts["bandwidth"], flush=True)
    ctx = args.ctx_max + args.gen + 1
    t0 = time.perf_counter()
    eng = CudaEngine(model, ctx=ctx, chunk=args.chunk)
    t_load = time.perf_counter() - t0
    gib = eng.plan.device_bytes / 2**30
    facts["load"] = f"{gib:.2f} GiB in {t_load:.1f} s ({gib / t_load:.2f} GiB/s)"
    facts["engine"] = eng.describe()
    print("load:", facts["load"], "|", facts["engine"], flush=True)
    tok = Tokenizer.from_gguf(model)
    unit = tok.encode_ordinary(FILLER)
    tokens = (unit * (args.ctx_max // len(unit) + 1))[:args.ctx_max]
    rows = []
    for row in run_bench(eng, tokens, ctx_start=args.ctx_start, ctx_max=args.ctx_max, step_incr=args.step_incr,
                         gen_tokens=args.gen, eos_id=tok.eos_id):
        rows.append(row)
        print(f"ctx {row.ctx_tokens}: prefill {row.prefill_tps:.1f} t/s, gen {row.gen_tps:.2f} t/s "
              f"(steady {row.gen_tps_ss:.2f}), first {row.first_token_sec * 1e3:.1f} ms", flush=True)
    with open(out_dir / "flash_bench.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(BenchRow.header())
        for r in rows:
            w.writerow([f"{v:.3f}" if isinstance(v, float) else v for v in r.values()])
    # at the last frontier (the sweep leaves the session there): timed decode with CUDA graphs, then eager
    snap = eng.snapshot()
    rng = np.random.default_rng(args.seed)
    first = int(np.argmax(eng.decode(tokens[-1])))

    def timed_decode(n: int) -> tuple[float, float]:
        """(wall, GPU) seconds a token, chained as ``generate`` decodes."""
        eng.restore(snap)
        eng.step_events = []
        t0 = time.perf_counter()
        for _ in eng.decode_chain(first, GREEDY, rng, n):
            pass
        wall = (time.perf_counter() - t0) / n
        gpu = sum(a.elapsed_time(b) for a, b in eng.step_events) / 1e3 / n
        eng.step_events = None
        return wall, gpu

    timed_decode(2)                                        # capture
    wall_g, gpu_g = timed_decode(args.gen)
    launches = eng.launches_per_token()
    if eng.early_launch:        # early (programmatic dependent) launches off and on, alternating: A B A B
        runs: dict[bool, list[float]] = {False: [], True: []}
        for on in (False, True, False, True):
            eng.set_early_launch(on)
            timed_decode(2)
            runs[on].append(timed_decode(args.gen)[0])
        facts["early launch"] = (
            "graph decode t/s with early launches " + ", ".join(f"{1 / w:.2f}" for w in runs[True])
            + "; without " + ", ".join(f"{1 / w:.2f}" for w in runs[False])
            + f" (mean ratio {np.mean(runs[False]) / np.mean(runs[True]):.3f})")
        print("early launch:", facts["early launch"], flush=True)
    eng.set_graphs(False)
    timed_decode(2)
    wall_e, gpu_e = timed_decode(min(args.gen, 16))
    eng.set_graphs(True)
    eng.restore(snap)
    families = [] if eng.probe.simulator else eng.profile_step([first])
    kernels = [] if eng.probe.simulator else eng.profile_step([first], by="kernel")
    per_tok = token_bytes(model)
    roof = read_bw * 1e9 / per_tok
    facts["decode"] = (f"graph {1 / wall_g:.2f} t/s (wall {wall_g * 1e3:.2f} ms, GPU {gpu_g * 1e3:.2f} ms per token, "
                       f"wall/GPU {wall_g / gpu_g:.3f}); eager {1 / wall_e:.2f} t/s (wall {wall_e * 1e3:.1f} ms, "
                       f"GPU busy {gpu_e * 1e3:.2f} ms); {launches} launches per token")
    facts["roofline"] = (f"{per_tok / 1e9:.3f} GB per token / {read_bw:.0f} GB/s = {roof:.0f} t/s; "
                         f"graph decode at {(1 / wall_g) / roof:.3f} of it")
    print("decode:", facts["decode"], "\nroofline:", facts["roofline"], flush=True)
    tables = []
    for name, groups in (("family", families), ("kernel", kernels)):
        total = sum(g.gpu_us for g in groups) or 1.0
        with open(out_dir / f"flash_{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([name, "launches", "gpu_us_per_token", "share"])
            for g in groups:
                w.writerow([g.group, g.launches, f"{g.gpu_us:.1f}", f"{g.gpu_us / total:.3f}"])
        tables += ["", f"GPU time per token by op {name} (each replayed alone as a graph; sum {total / 1e3:.2f} ms):",
                   "", f"| {name} | launches | GPU us | share |", "|---|---:|---:|---:|"]
        tables += [f"| {g.group} | {g.launches} | {g.gpu_us:.0f} | {100 * g.gpu_us / total:.1f}% |"
                   for g in groups[:25 if name == "kernel" else None]]
    summary = "\n".join([f"# flash decode, {eng.probe.name}", ""] + [f"- {k}: {v}" for k, v in facts.items()] + [
        "", "| ctx | prefill t/s | gen t/s | gen t/s (steady) | first token ms |", "|---:|---:|---:|---:|---:|"] + [
        f"| {r.ctx_tokens} | {r.prefill_tps:.1f} | {r.gen_tps:.2f} | {r.gen_tps_ss:.2f} | {r.first_token_sec * 1e3:.1f} |"
        for r in rows] + tables)
    (out_dir / "flash_summary.md").write_text(summary + "\n")
    print(summary)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flash")
    f.add_argument("--layers", type=int, default=None, help="flash-shaped model with N layers (default: all 43)")
    f.add_argument("--model", default=None, help="an existing DS4 GGUF instead of a synthetic one")
    f.add_argument("--synth-dir", default="/dev/shm")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--workers", type=int, default=None)
    f.add_argument("--chunk", type=int, default=64)
    f.add_argument("--ctx-start", type=int, default=512)
    f.add_argument("--ctx-max", type=int, default=2048)
    f.add_argument("--step-incr", type=int, default=512)
    f.add_argument("--gen", type=int, default=32)
    f.add_argument("--out", default="/tmp/out")
    f.add_argument("--bw-bytes", type=int, default=4 << 30, help="buffer size of the bandwidth probes")
    f.set_defaults(func=flash)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
