"""Where ``hc.pre``'s finish kernel spends its time, phase by phase (run on the device machine).

``python bench/hc_finish_phases.py``: builds a copy of ``ds4nb/kernels/hc.py``
whose finish kernel has thread 0 write ``%clock64`` at the end of each phase
(a source edit of this checkout's file, so it fails loudly when the kernel's
code moves), runs ``hc.pre`` at DS4 decode shapes (4 streams of 4096, F16
``fn``, the norm, x_norm's Q8_0 and Q8_K, the mix left to ``hc.comb``) and
prints the median cycles of 20 runs per phase; then times the stock
``hc.pre`` as CUDA graphs of 20 of its launch groups (with and without the
quantized outputs), its finish alone and its first two kernels alone.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ["start", "after wait", "stream loads issued", "mix values", "sync", "weights + sync", "x",
          "x's sum of squares", "x_norm stored", "Q8_0", "Q8_K", "end (sync)"]


def stamped_source() -> str:
    """hc.py with ``stamps[i] = clock64()`` (thread 0) after each phase of the finish."""
    src = (ROOT / "ds4nb/kernels/hc.py").read_text()

    def sub(old: str, new: str) -> None:
        nonlocal src
        if old not in src:
            raise SystemExit(f"hc.py changed: cannot find {old.strip()[:60]!r}")
        src = src.replace(old, new, 1)

    def st(i: int, indent: str) -> str:
        return f"\n{indent}if cuda.threadIdx.x == 0:\n{indent}    stamps[{i}] = clock64()\n"

    i8, i12 = " " * 8, " " * 12
    sub("has_q8_K, nw, vec):", "has_q8_K, nw, vec, stamps):")
    sub(f"{i8}mix_values(part_dot, t, n_split, mix, tid)\n{i8}cuda.syncthreads()\n",
        st(2, i8) + f"{i8}mix_values(part_dot, t, n_split, mix, tid)\n" + st(3, i8) + f"{i8}cuda.syncthreads()\n"
        + st(4, i8))
    sub(f"{i8}# x = sum_h w[h] * hc[h]", st(5, i8) + f"{i8}# x = sum_h w[h] * hc[h]")
    sub(f"{i8}if has_norm:  # uniform branch", st(6, i8) + f"{i8}if has_norm:  # uniform branch")
    sub(f"{i12}inv = _D1 / math.sqrt(tot / float64(n_embd) + rms_eps)\n",
        f"{i12}inv = _D1 / math.sqrt(tot / float64(n_embd) + rms_eps)\n" + st(7, i12))
    sub(f"{i12}if has_q8_0:\n", st(8, i12) + f"{i12}if has_q8_0:\n")
    sub(f"{i12}if has_q8_K:\n", st(9, i12) + f"{i12}if has_q8_K:\n")
    sub("d < n_embd)\n\n    @jit_kernel(launch_bounds=MIX_THREADS)", "d < n_embd)\n" + st(10, i8)
        + "\n    @jit_kernel(launch_bounds=MIX_THREADS)")
    sub("has_q8_K, vec):\n        nw = cuda.local.array(N_VALS, float32)",
        "has_q8_K, vec, stamps):\n" + st(0, i8) + "        nw = cuda.local.array(N_VALS, float32)")
    sub(f"{i8}wait_prior_grid()\n{i8}finish_token(", f"{i8}wait_prior_grid()\n" + st(1, i8) + f"{i8}finish_token(")
    sub("nw, vec)\n\n    return mix_kernel, finish_kernel",
        "nw, vec, stamps)\n        cuda.syncthreads()\n" + st(11, i8) + "\n    return mix_kernel, finish_kernel")
    sub("*outs, vec)", "*outs, vec, STAMPS)")
    return re.sub(r"^@implementation\(.*$", "", src, flags=re.M)      # no second registration of the ops


def main() -> int:
    from llvmlite import ir
    from numba import cuda
    from numba import types as nt
    from numba.core.extending import intrinsic

    from ds4nb.engine.graph import _core_device, capture, replay_us
    from ds4nb.kernels import _launch as L
    from ds4nb.kernels import hc as H
    from ds4nb.kernels.activation import alloc_q8_0, alloc_q8_K

    @intrinsic
    def clock64(typingctx):
        def codegen(context, builder, sig, args):
            fnty = ir.FunctionType(ir.IntType(64), [])
            return builder.call(ir.InlineAsm(fnty, "mov.u64 $0, %clock64;", "=l", side_effect=True), [])
        return nt.int64(), codegen

    mod = types.ModuleType("hc_stamped")
    mod.clock64 = clock64
    mod.STAMPS = cuda.to_device(np.zeros(16, np.int64))
    exec(compile(stamped_source(), "hc_stamped.py", "exec"), mod.__dict__)

    rng = np.random.default_rng(0)
    n_hc, e = 4, 4096
    n_mix = 2 * n_hc + n_hc * n_hc
    hc = cuda.to_device(rng.standard_normal(n_hc * e).astype(np.float32))
    fn = cuda.to_device((rng.standard_normal((n_mix, n_hc * e)) * 0.01).astype(np.float16))
    scale = cuda.to_device(np.array([0.5, 0.5, 0.5], np.float32))
    base = cuda.to_device(rng.standard_normal(n_mix).astype(np.float32))
    nw = cuda.to_device(rng.standard_normal(e).astype(np.float32))
    out = H.HcPreOut(cuda.device_array(e, np.float32), cuda.device_array(n_hc, np.float32), None,
                     cuda.device_array(e, np.float32), cuda.device_array(n_mix, np.float32), alloc_q8_0(1, e),
                     alloc_q8_K(1, e))
    scr = H.alloc_scratch(1, n_hc * e, n_mix)

    def stamped_run():
        mod._launch(hc, fn, scale, base, n_hc, n_mix, 20, 1e-6, 1e-6, out.x, out.post, None, nw, out.x_norm, scr, 0,
                    False, out.mix, out.x_q8_0, out.x_q8_K)
        cuda.synchronize()
        s = mod.STAMPS.copy_to_host()
        return s[:len(PHASES)] - s[0]

    stamped_run()
    cyc = np.median(np.array([stamped_run() for _ in range(20)]), axis=0)
    mhz = cuda.get_current_device().CLOCK_RATE / 1e3
    print(f"hc.pre finish phases, thread 0, SM clock {mhz:.0f} MHz (median of 20 runs)")
    print("| phase | cycles from start | phase ns |\n|---|---:|---:|")
    prev = 0.0
    for name, v in zip(PHASES, cyc):
        print(f"| {name} | {v:.0f} | {(v - prev) / mhz * 1e3:.0f} |")
        prev = v

    kw = dict(n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6, scratch=scr)
    stream = cuda.stream()
    core = _core_device().create_stream(stream)

    def graph_us(q8: bool, keep) -> float:
        rec = L.Recorder(early=L.early_launch_requested())
        o = out if q8 else out._replace(x_q8_0=None, x_q8_K=None)
        for _ in range(20):
            H.hc_pre(hc, fn, scale, base, nw, out=o, stream=rec, **kw)
        items = [x for x in rec.launches if keep(x.kernel.py_func.__name__)]
        items = [dataclasses.replace(x, early=x.early and i > 0) for i, x in enumerate(items)]
        g = capture(items)
        g.upload(core)
        return float(np.median([replay_us(g, core, stream, 10) for _ in range(5)])) / 20

    print("\n| graph of 20 hc.pre | us per hc.pre |\n|---|---:|")
    for name, q8, keep in (("ss, mix, finish (x_norm's Q8_0 and Q8_K)", True, lambda n: True),
                           ("ss, mix, finish (no quantized outputs)", False, lambda n: True),
                           ("finish alone", True, lambda n: "finish" in n),
                           ("ss and mix alone", True, lambda n: "finish" not in n)):
        print(f"| {name} | {graph_us(q8, keep):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
