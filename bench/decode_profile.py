"""Where a decode step's GPU time goes, in place (run on the device machine).

``python bench/decode_profile.py [--layers N] [--placement full|70G] --out DIR``:
loads a flash-shaped model (written to /dev/shm if missing), prefills, and
captures the decode step (CUDA graph, early launches, branches as
``generate`` runs it).  Then, per op family and per (family, kernel):

* ``alone``: the group's launches captured alone and replayed
  (``ds4nb.engine.graph.time_groups``): its own time, boundaries included;
* ``knockout``: the whole step captured *without* the group and replayed;
  step time minus that is what the group costs the step where it is (less
  than ``alone`` where it overlaps a branch or hides behind a copy).

The knocked-out step computes garbage (the state is restored after), but
every kernel's work and geometry are fixed by the step record, not by the
values, so its time is the step's without those launches.  Whole-step
times are re-measured between groups (drift shows as their spread).
Writes ``decode_profile.csv`` and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL_FLASH_BYTES = 80.76 * 2**30


def without(launches, drop) -> list:
    """The step's list without the launches ``drop`` selects; a launch left first on its lane (or after a
    join) is made ordinary, as the recorder would have made it."""
    from ds4nb.kernels._launch import Join

    out, follows = [], {}
    for item in launches:
        if isinstance(item, Join):
            out.append(item)
            follows[""] = False
            continue
        if drop(item):
            continue
        if item.early and not follows.get(item.lane, False):
            item = dataclasses.replace(item, early=False)
        follows[item.lane] = True
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--synth-dir", default="/dev/shm")
    p.add_argument("--placement", default="full", help="full, or a share of the 80.76 GiB file like 70G")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--by", default="family,kernel")
    p.add_argument("--out", default="/tmp/out")
    args = p.parse_args(argv)

    from ds4nb.cache.options import GpuBudget, PlacementOptions
    from ds4nb.cache.plan import engine_tensors
    from ds4nb.engine.graph import _core_device, capture, kernel_name, replay_us, time_groups
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic
    from ds4nb.sampling import GREEDY

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(args.synth_dir) / f"flash-{args.layers}L.gguf"
    if not path.exists():
        write_synthetic(path, "flash", seed=1, n_layer=args.layers)
    model = load_model(path)
    if args.placement == "full":
        options = PlacementOptions("full")
    else:
        size = sum(t.nbytes for t in engine_tensors(model))
        gb = float(args.placement.rstrip("G"))
        budget = GpuBudget.parse(str(int(size * gb * 2**30 / FULL_FLASH_BYTES)))
        options = PlacementOptions("partial", gpu_budget=budget)
    eng = CudaEngine(model, ctx=args.prompt + 64, placement=options)
    rng = np.random.default_rng(0)
    first = int(np.argmax(eng.prefill(list(rng.integers(0, model.config.n_vocab, args.prompt)))))
    state = eng.snapshot()
    for _ in eng.decode_chain(first, GREEDY, rng, 3):          # compile, capture
        pass
    launches = eng._runner(1, True).launches
    stream = eng.stream
    core = _core_device().create_stream(stream)

    def step_us(items) -> float:
        g = capture(items)
        g.upload(core)
        return replay_us(g, core, stream, args.reps)

    whole = [step_us(launches)]
    rows = []
    for by in args.by.split(","):
        keyf = (lambda x: x.family or "other") if by == "family" else (
            lambda x: f"{x.family or 'other'}: {kernel_name(x.kernel)}")
        alone = {g.group: g for g in time_groups(launches, stream, by=by, reps=args.reps)}
        for key, g in alone.items():
            t = step_us(without(launches, lambda x, key=key: keyf(x) == key))
            whole.append(step_us(launches))
            rows.append(dict(by=by, group=key, launches=g.launches, alone_us=g.gpu_us, step_without_us=t,
                             step_us=whole[-1]))
    eng.restore(state)
    med = statistics.median(whole)
    for r in rows:
        r["knockout_us"] = med - r["step_without_us"]
    with open(out / "decode_profile.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: f"{v:.2f}" if isinstance(v, float) else v for k, v in r.items()})
    n_launch = sum(1 for x in launches if hasattr(x, "kernel"))
    print(f"placement {args.placement}: {args.layers} layers, {n_launch} launches; whole step median {med:.1f} us "
          f"(min {min(whole):.1f}, max {max(whole):.1f}, {len(whole)} measurements)")
    for by in args.by.split(","):
        print(f"| {by} | launches | alone us | knockout us |")
        for r in sorted((r for r in rows if r["by"] == by), key=lambda r: -r["knockout_us"]):
            print(f"| {r['group']} | {r['launches']} | {r['alone_us']:.1f} | {r['knockout_us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
