"""Hardware counters of the decode step's main kernels, one launch each (Nsight Compute), at DS4 flash shapes.

    ncu --clock-control none --csv --page raw --section SpeedOfLight --section LaunchStats --section Occupancy \
        --section WarpStateStats --log-file ncu.csv python bench/ncu_decode.py
    python bench/ncu_decode.py --summary ncu.csv      # one line per kernel launch

The driver builds bench/kernels.py's cases (the decode step's Q8_0 projections, the routed experts' gate/up and
down, hc.pre as a decode step runs it, hc.post, the compressor / router F16 matvecs, decode attention) and
launches each twice (the second on warm caches and compiled code is the one to read).  The summary gives, per
launch: time, SM and memory throughput (% of peak), achieved occupancy, registers, and the three stall reasons
that cost the most cycles per issued instruction.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _keep(op: str, impl: str, variant: str) -> bool:
    if op.startswith(("iq2_xxs.", "q2_k.")):
        return "(default)" in variant and op in ("iq2_xxs.moe_gate_up", "q2_k.moe_down_sum")
    if op == "attn.decode":
        return impl == "heads_mma" and variant.endswith("rows visible")
    if op == "hc.pre":
        return "mix out" in variant
    return op in ("q8_0.matvec", "hc.post", "hc.comb", "f16.matvec")


def drive() -> int:
    import numpy as np
    from numba import cuda

    import kernels as K

    rng = np.random.default_rng(0)
    stream = cuda.stream()
    cases = [c for c in K.build_cases(rng, stream, False, ["q8", "iq2", "q2_k", "decode"]) if _keep(c[0], c[1], c[2])]
    for op, impl, variant, shape, *_rest in cases:
        launch = _rest[2]
        print(f"case {op} [{impl}] {variant} {shape}", flush=True)
        for _ in range(2):
            launch(0)
        stream.synchronize()
    return 0


_STALLS = re.compile(r"issue_stalled_([a-z_]+?)_per_issue_active\.ratio$")


def _demangle(name: str) -> str:
    """A kernel's short name: ncu's demangled ``_kernels::finish_kernel[v71,...]`` without its template part, or
    the last components of an Itanium nested name (``_ZN6cudapy5ds4nb...``)."""
    if "::" in name:
        return name.split("[")[0].split("(")[0]
    if not name.startswith("_ZN"):
        return name[:60]
    parts, i = [], 3
    while i < len(name) and name[i].isdigit():
        j = i
        while name[j].isdigit():
            j += 1
        n = int(name[i:j])
        parts.append(name[j:j + n])
        i = j + n
    return ".".join(p for p in parts[-3:] if not p.startswith("_3c")) or name[:60]


def summary(path: Path) -> int:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    rows = list(csv.reader(lines[start:]))
    head, body = rows[0], [r for r in rows[1:] if len(r) == len(rows[0])]

    def col(row, name):
        return row[head.index(name)] if name in head else ""

    def num(v):
        try:
            return float(v.replace(",", ""))
        except ValueError:
            return 0.0

    body = [r for r in body if col(r, "ID").strip().isdigit()]          # not a units row
    stall_cols = [(m.group(1), i) for i, h in enumerate(head) if (m := _STALLS.search(h))]
    print("| # | kernel | us | SM % | mem % | DRAM % | occupancy % | regs | grid x block | top stalls (cycles/issue) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for row in body:
        name = col(row, "Kernel Name")
        short = _demangle(name)
        us = num(col(row, "gpu__time_duration.sum")) / 1e3
        stalls = sorted(((num(row[i]), n) for n, i in stall_cols), reverse=True)[:3]
        print(f"| {col(row, 'ID')} | {short} | {us:.2f} | "
              f"{num(col(row, 'sm__throughput.avg.pct_of_peak_sustained_elapsed')):.0f} | "
              f"{num(col(row, 'gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed')):.0f} | "
              f"{num(col(row, 'gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed')):.0f} | "
              f"{num(col(row, 'sm__warps_active.avg.pct_of_peak_sustained_active')):.0f} | "
              f"{col(row, 'launch__registers_per_thread')} | {col(row, 'launch__grid_size')} x "
              f"{col(row, 'launch__block_size')} | " + ", ".join(f"{n} {v:.1f}" for v, n in stalls) + " |")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--summary", type=Path, help="print the table of an ncu --csv --page raw log instead")
    args = ap.parse_args()
    raise SystemExit(summary(args.summary) if args.summary else drive())
