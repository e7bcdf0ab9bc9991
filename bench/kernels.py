"""Time ds4nb's decode kernels on the GPU: achieved GB/s against a measured copy.

    python bench/kernels.py --out bench/results          # on a GPU (the device tool)
    NUMBA_ENABLE_CUDASIM=1 python bench/kernels.py --tiny # smoke test of this script

Method (one process, one stream):

* copy ceiling: a 1 GiB device-to-device copy (cuMemcpyDtoD), bytes read +
  written over the median of 20 event-timed copies;
* every kernel case is launched once to compile (warm-up), then timed in
  rounds: a ~5 ms sleep kernel first (so the host can queue a round before the
  GPU reaches it; numba's per-launch host cost is tens of microseconds), then
  ``reps`` launches between two CUDA events; the round's time / ``reps`` is one
  sample and the median over rounds is reported (p10 / p90 beside it).  A
  round where the GPU finished the sleep before the host finished queueing is
  flagged ``host_bound`` (the GPU may have idled; its number is an upper bound);
* each launch takes the next of several weight / activation sets, cycled, whose
  total is well above the 50 MB L2, so weights come from HBM as in a decode step;
* GB/s counts the bytes a launch must move: the weights it reads (only the
  selected experts for MoE) plus activations in and results out;
* ``--only host``: the routed-expert kernels over experts in page-locked,
  device-mapped host memory (a partial or direct placement's host experts),
  read over the bus, and ``moe.stage_experts`` copying the selected ones to GPU
  memory (what a decode step does with them); "% host" is against a read-only
  kernel over host-mapped memory (``ds4nb.dispatch.device.measure_read_bandwidth``).

Results: ``kernels.csv`` (one row per case) and ``kernels.md`` (device,
command, date, table) in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda, uint8, uint64

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4nb.plugins import get_registry  # noqa: E402
from ds4nb.kernels import argmax as argmax_mod  # noqa: E402
from ds4nb.kernels import moe, q8_0  # noqa: E402
from ds4nb.kernels import router as router_mod  # noqa: E402
from ds4nb.kernels.activation import alloc_q8_0, alloc_q8_K, q8_0_to_device, q8_K_to_device  # noqa: E402
from ds4nb.kernels.intrinsics import SIMULATOR  # noqa: E402
from ds4nb.quants import random_blocks  # noqa: E402
from ds4nb.cache.residency import empty_packed  # noqa: E402
from ds4nb.quants.repack import PackedWeight, repack  # noqa: E402

Q = GGMLQuantizationType
L2_BYTES = 50 << 20
HOST_MAPPED = "host-mapped"     # a case whose weights are read over the bus: "% host" is against that ceiling


@cuda.jit
def _sleep(ms):
    if cuda.threadIdx.x == 0:
        for _ in range(ms):
            cuda.nanosleep(1000000)


@cuda.jit
def _fill(buf, seed):
    i = cuda.grid(1)
    if i < buf.size:
        h = (i * 2654435761 + seed) & 0xFFFFFFFF
        buf[i] = uint8((h >> 13) & 0xFF)


def fill_random(buf: Any, seed: int, stream: Any) -> None:
    """Non-zero pseudo-random bytes in a device array (a host copy in the simulator)."""
    flat = buf.view(np.uint8) if buf.dtype != np.uint8 else buf
    if SIMULATOR:
        flat.copy_to_device(np.random.default_rng(seed).integers(0, 256, flat.size, dtype=np.uint8))
    else:
        _fill[(flat.size + 255) // 256, 256, stream](flat, seed)


_UNROLL = 16  # independent 8-byte loads in flight per thread


@cuda.jit
def _read_stream(buf, out):
    """XOR of every uint64 word, 16 loads in flight per thread: a read-only ceiling."""
    t = cuda.grid(1)
    nt = cuda.gridsize(1)
    acc = buf[0] ^ buf[0]
    base = 0
    while base + _UNROLL * nt <= buf.size:
        for k in range(_UNROLL):
            acc ^= buf[uint64(base + t + k * nt)]
        base += _UNROLL * nt
    if acc == buf[0] + 1:  # keeps the loads alive; practically never true
        out[0] = acc


@cuda.jit
def _copy_stream(src, dst):
    """dst = src, 8 loads in flight per thread before the stores."""
    t = cuda.grid(1)
    nt = cuda.gridsize(1)
    base = 0
    while base + 8 * nt <= src.size:
        v0 = src[uint64(base + t)]
        v1 = src[uint64(base + t + nt)]
        v2 = src[uint64(base + t + 2 * nt)]
        v3 = src[uint64(base + t + 3 * nt)]
        v4 = src[uint64(base + t + 4 * nt)]
        v5 = src[uint64(base + t + 5 * nt)]
        v6 = src[uint64(base + t + 6 * nt)]
        v7 = src[uint64(base + t + 7 * nt)]
        dst[uint64(base + t)] = v0
        dst[uint64(base + t + nt)] = v1
        dst[uint64(base + t + 2 * nt)] = v2
        dst[uint64(base + t + 3 * nt)] = v3
        dst[uint64(base + t + 4 * nt)] = v4
        dst[uint64(base + t + 5 * nt)] = v5
        dst[uint64(base + t + 6 * nt)] = v6
        dst[uint64(base + t + 7 * nt)] = v7
        base += 8 * nt


def _timed(fn, stream, reps: int = 20) -> float:
    times = []
    for _ in range(reps + 2):
        e0, e1 = cuda.event(), cuda.event()
        e0.record(stream)
        fn()
        e1.record(stream)
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    return statistics.median(times[2:])


def stream_bandwidths(nbytes: int, stream: Any) -> tuple[float, float]:
    """(kernel copy GB/s counting read + write, kernel read-only GB/s) over ``nbytes`` buffers."""
    words = nbytes // 8
    src = cuda.device_array(words, np.uint64, stream=stream)
    dst = cuda.device_array(words, np.uint64, stream=stream)
    fill_random(src, 99, stream)
    out = cuda.device_array(1, np.uint64, stream=stream)
    blocks = cuda.get_current_device().MULTIPROCESSOR_COUNT * 8
    t_copy = _timed(lambda: _copy_stream[blocks, 256, stream](src, dst), stream)
    t_read = _timed(lambda: _read_stream[blocks, 256, stream](src, out), stream)
    return 2 * words * 8 / t_copy, words * 8 / t_read


@dataclass
class Result:
    op: str
    impl: str
    variant: str
    shape: str
    weight_bytes: int
    bytes_moved: int
    samples_us: list[float] = field(default_factory=list)
    host_us: float = 0.0
    host_bound: bool = False
    resources: dict = field(default_factory=dict)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def pct(self, q: float) -> float:
        s = sorted(self.samples_us)
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]

    def gbps(self) -> float:
        return self.bytes_moved / (self.median_us * 1e-6) / 1e9 if self.bytes_moved else 0.0


def time_rounds(launch: Callable[[int], Any], n_sets: int, reps: int, rounds: int, sleep_ms: int,
                stream: Any) -> tuple[list[float], float, bool]:
    samples, host = [], []
    host_bound = False
    for r in range(rounds):
        if not SIMULATOR:
            _sleep[1, 32, stream](sleep_ms)
        asleep = cuda.event() if SIMULATOR else cuda.event(timing=False)
        e0, e1 = cuda.event(), cuda.event()
        asleep.record(stream)
        e0.record(stream)
        t0 = time.perf_counter()
        for i in range(reps):
            launch((r * reps + i) % n_sets)
        host.append((time.perf_counter() - t0) / reps * 1e6)
        e1.record(stream)
        if not SIMULATOR and asleep.query():
            host_bound = True
        e1.synchronize()
        samples.append(e0.elapsed_time(e1) * 1e3 / reps)
    return samples, statistics.median(host), host_bound


def copy_bandwidth(nbytes: int, stream: Any, reps: int = 20) -> float:
    src = cuda.device_array(nbytes, np.uint8, stream=stream)
    dst = cuda.device_array(nbytes, np.uint8, stream=stream)
    fill_random(src, 12345, stream)
    times = []
    for _ in range(reps + 2):
        e0, e1 = cuda.event(), cuda.event()
        e0.record(stream)
        dst.copy_to_device(src, stream=stream)
        e1.record(stream)
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    return 2 * nbytes / statistics.median(times[2:])


#: SASS facts the kernels table records: key -> the text counted in the kernel's SASS
SASS_COUNTS = {"idp4a": "IDP.4A", "prmt": "PRMT", "lds": "LDS", "calls": " CALL", "ldg128": "LDG.E.128",
               "ldg64": "LDG.E.64"}


def resources(kernel: Any, counts: dict[str, str] | None = None) -> dict:
    """Registers, local and shared memory, and counts of SASS texts (``counts``: key -> text, default
    :data:`SASS_COUNTS`) of a compiled numba dispatcher (best effort: an ``*_error`` key says what failed)."""
    out: dict = {}
    try:
        for key, get in (("regs", kernel.get_regs_per_thread), ("local", kernel.get_local_mem_per_thread),
                         ("shared", kernel.get_shared_mem_per_block)):
            v = get()
            out[key] = max(v.values(), default=None) if isinstance(v, dict) else v
    except Exception as exc:  # pragma: no cover - depends on the driver
        out["regs_error"] = type(exc).__name__
    try:
        sass = kernel.inspect_sass()
        text = "\n".join(sass.values()) if isinstance(sass, dict) else str(sass)
        for key, pattern in (SASS_COUNTS if counts is None else counts).items():
            out[key] = text.count(pattern)
    except Exception as exc:  # noqa: BLE001 - nvdisasm may be missing
        out["sass_error"] = type(exc).__name__
    return out


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------


def _sets_for(bytes_per_set: int, lo: int = 2, hi: int = 8) -> int:
    """Enough rotating sets that one cycle is > 3x the L2."""
    return max(lo, min(hi, -(-3 * L2_BYTES // max(1, bytes_per_set))))


def q8_0_matvec_case(rng, name: str, n: int, k: int, tokens: int, stream, tiny: bool):
    raw_sets = _sets_for(n * k * 34 // 32)
    ws = [repack(random_blocks(Q.Q8_0, (n, k), rng, rms=0.02), Q.Q8_0, (n, k)).to_device(stream) for _ in
          range(raw_sets)]
    xs = [q8_0_to_device(rng.standard_normal((tokens, k)).astype(np.float32), stream) for _ in range(raw_sets)]
    outs = [cuda.device_array(tokens * n, np.float32, stream=stream) for _ in range(raw_sets)]
    if tokens == 1:
        impl = get_registry().get("q8_0.matvec", "warp8")
        kernel = q8_0.kernel_for("matvec", k // 32)
    else:
        impl = get_registry().get("q8_0.matmul", "warp8_t8")
        kernel = q8_0.kernel_for("matmul", k // 32)

    def launch(i):
        impl(ws[i], xs[i], out=outs[i], stream=stream)

    wbytes = ws[0].nbytes
    moved = wbytes + tokens * (k + k // 32 * 4) + tokens * n * 4
    return [(impl.op, impl.name, name, f"{n}x{k} t{tokens}", wbytes, moved, launch, raw_sets, kernel)]


def mapped_copy(w: PackedWeight) -> PackedWeight:
    """A host-layout tensor in page-locked, device-mapped host memory (as a placement's host-mapped experts)."""
    m = empty_packed(w.qtype, w.shape, mapped=True)
    for name in ("qs", "sc", "dm"):
        if getattr(w, name) is not None:
            getattr(m, name).copy_to_device(np.ascontiguousarray(getattr(w, name)).reshape(-1))
    return m


def moe_cases(rng, qtype, kind: str, e: int, n: int, k: int, n_used: int, lprs, stream, replicas=(None,),
              min_blocks=(None,), mapped: bool = False):
    """Routed-expert kernel cases; ``mapped``: every expert in host-mapped memory, read over the bus;
    ``min_blocks``: launch bounds (0: none, None: the launcher's default)."""
    q = qtype.name.lower()
    n_sets = max(2, e // n_used)

    def weights_of() -> PackedWeight:
        w = repack(random_blocks(qtype, (e, n, k), rng, rms=0.02), qtype, (e, n, k))
        return mapped_copy(w) if mapped else w.to_device(stream)

    w1 = weights_of()
    w2 = weights_of() if kind == "gate_up" else None
    perm = rng.permutation(e).astype(np.int32)
    ids = [cuda.to_device(perm[(i * n_used) % e:(i * n_used) % e + n_used].copy(), stream=stream)
           for i in range(n_sets)]
    weights = cuda.to_device(rng.uniform(0.1, 1, n_used).astype(np.float32), stream=stream)
    x_rows = 1 if kind == "gate_up" else n_used
    xs = [q8_K_to_device(rng.standard_normal((x_rows, k)).astype(np.float32), stream) for _ in range(n_sets)]
    out_size = n_used * n if kind in ("gate_up", "matvec") else n
    outs = [cuda.device_array(out_size, np.float32, stream=stream) for _ in range(n_sets)]
    per_expert = w1.nbytes // e
    wbytes = per_expert * n_used * (2 if kind == "gate_up" else 1)
    moved = wbytes + x_rows * (k + k // 256 * 36) + out_size * 4
    op = f"{q}.moe_{kind}"
    impl = get_registry().implementations(op)[0]
    cases = []
    for lpr, rep, mb in [(lp, rp, m) for lp in lprs for rp in replicas for m in min_blocks]:
        if kind == "gate_up":
            def launch(i, lpr=lpr, rep=rep, mb=mb):
                moe._moe_gate_up(qtype, w1, w2, ids[i], weights, xs[i], 10.0, out=outs[i], stream=stream, lpr=lpr,
                                 replicas=rep, min_blocks=mb or 0)
        elif kind == "down_sum":
            def launch(i, lpr=lpr, rep=rep, mb=mb):
                moe._moe_down_sum(qtype, w1, ids[i], xs[i], out=outs[i], stream=stream, lpr=lpr, replicas=rep,
                                  min_blocks=moe.DOWN_MIN_BLOCKS if mb is None else mb)
        else:
            def launch(i, lpr=lpr, rep=rep):
                moe._moe_matvec(qtype, w1, ids[i], xs[i], out=outs[i], stream=stream, lpr=lpr, replicas=rep)
        default = lpr == moe.default_lanes_per_row(k // 256) and (mb is None or (kind == "gate_up" and mb == 0)) and (
            rep is None or qtype != Q.IQ2_XXS or rep == moe.IQ2_REPLICAS[kind])
        variant = (f"lpr{lpr}" + (f" R{rep}" if rep is not None else "") + (f" lb{mb}" if mb is not None else "")
                   + (" (default)" if default else "") + (f" {HOST_MAPPED}" if mapped else ""))
        cases.append((op, impl.name, variant, f"{n_used}/{e} x {n}x{k}", wbytes, moved, launch, n_sets,
                      moe._kernel(kind, qtype, lpr, k // 256, rep, *(
                          (moe.DOWN_MIN_BLOCKS if mb is None else mb, 32 * n_used) if kind == "down_sum" else (mb or 0,)))))
    return cases


def stage_cases(rng, qtype, e: int, n: int, k: int, n_used: int, stream):
    """``moe.stage_experts``: the selected experts of a host-mapped tensor copied to GPU memory (a decode step's
    staging of a partial / direct placement's host experts)."""
    w = mapped_copy(repack(random_blocks(qtype, (e, n, k), rng, rms=0.02), qtype, (e, n, k)))
    n_sets = max(2, e // n_used)
    perm = rng.permutation(e).astype(np.int32)
    ids = [cuda.to_device(perm[(i * n_used) % e:(i * n_used) % e + n_used].copy(), stream=stream)
           for i in range(n_sets)]
    out = empty_packed(qtype, (n_used, n, k))
    impl = get_registry().implementations("moe.stage_experts")[0]
    wbytes = w.nbytes // e * n_used
    # GB/s counts the bus reads (the copies' writes go to GPU memory, which is not what limits them)
    return [(impl.op, impl.name, f"{qtype.name} {HOST_MAPPED}", f"{n_used}/{e} x {n}x{k}", wbytes, wbytes,
             lambda i: impl(w, ids[i], out=out, stream=stream), n_sets, None)]


def small_cases(rng, stream, tiny: bool):
    reg = get_registry()
    d, vocab = (256, 300) if tiny else (4096, 129280)
    cases = []
    x = cuda.to_device(rng.standard_normal((1, d)).astype(np.float32), stream=stream)
    q80 = alloc_q8_0(1, d, stream)
    impl = reg.get("act.quantize_q8_0", "warp")
    cases.append((impl.op, impl.name, "", f"1x{d}", 0, d * 4 + d + d // 32 * 4,
                  lambda i: impl(x, out=q80, stream=stream), 1, None))
    q8k = alloc_q8_K(1, d, stream)
    impl2 = reg.get("act.quantize_q8_K", "warp")
    cases.append((impl2.op, impl2.name, "", f"1x{d}", 0, d * 4 + d + d // 256 * 36,
                  lambda i: impl2(x, out=q8k, stream=stream), 1, None))
    w = cuda.to_device(rng.uniform(0.5, 1.5, d).astype(np.float32), stream=stream)
    y = cuda.device_array(d, np.float32, stream=stream)
    impl3 = reg.get("norm.rms", "block_per_row")
    cases.append((impl3.op, impl3.name, "", f"1x{d}", 0, 3 * d * 4,
                  lambda i: impl3(x, w, 1e-6, out=y, stream=stream), 1, None))
    logits = cuda.to_device(rng.standard_normal(vocab).astype(np.float32), stream=stream)
    idx = cuda.device_array(1, np.int32, stream=stream)
    impl4 = reg.get("sample.argmax", "multi_block")
    ws = argmax_mod.alloc_workspace(1, vocab, stream)
    cases.append((impl4.op, impl4.name, "", f"1x{vocab}", 0, vocab * 4,
                  lambda i: impl4(logits, out=idx, stream=stream, workspace=ws), 1, None))
    table = cuda.device_array(vocab * d, np.float16, stream=stream)
    fill_random(table, 7, stream)
    ids = cuda.to_device(np.array([vocab - 1], np.int32), stream=stream)
    emb = cuda.device_array(d, np.float32, stream=stream)
    impl5 = reg.get("embed.gather", "f16_rows")
    cases.append((impl5.op, impl5.name, "", f"{vocab}x{d} 1 tok", 0, d * 6,
                  lambda i: impl5(table, ids, d, out=emb, stream=stream), 1, None))
    return cases


def decode_cases(rng, stream, tiny: bool):
    """The decode step's latency-bound model kernels at DS4 flash shapes (tiny: small ones): the F16 matvecs
    (compressor kv + gate pair, router), decode attention over a CSA layer's 640 rows (window 128 + 512
    compressed, all visible or the indexer's selection) and over the 172 rows of a bench/placement.py step
    (row splits forced or not), ``hc.pre`` (with its 20 Sinkhorn rounds, and with 1 to show what they cost,
    and without them: the mix for ``hc.comb``), ``hc.comb``, ``hc.post`` and the router's top-6 of 256.
    Public launchers only."""
    from ds4nb.kernels import attention as attn_mod
    from ds4nb.kernels import hc as hc_mod
    from ds4nb.kernels.step import group_offset, records

    reg = get_registry()
    d, n_head, head_dim, n_swa, top = (256, 4, 64, 8, 16) if tiny else (4096, 64, 512, 128, 512)
    cases = []
    f16 = reg.get("f16.matvec", "warp_rows")
    for name, n_out, n_out2 in (("compressor kv+gate", d // 4, d // 4), ("router", d // 16, 0)):
        wbytes = (n_out + n_out2) * d * 2
        n_sets = _sets_for(wbytes)
        ws = [cuda.to_device((rng.standard_normal((n_out, d)) / 64).astype(np.float16), stream=stream)
              for _ in range(n_sets)]
        w2s = [cuda.to_device((rng.standard_normal((n_out2, d)) / 64).astype(np.float16), stream=stream)
               if n_out2 else None for _ in range(n_sets)]
        x = cuda.to_device(rng.standard_normal((1, d)).astype(np.float32), stream=stream)
        out = cuda.device_array(n_out, np.float32, stream=stream)
        out2 = cuda.device_array(max(n_out2, 1), np.float32, stream=stream)

        def launch(i, ws=ws, w2s=w2s, x=x, out=out, out2=out2):
            if w2s[i] is None:
                f16(ws[i], x, out=out, stream=stream)
            else:
                f16(ws[i], x, out=out, w2=w2s[i], out2=out2, stream=stream)

        cases.append((f16.op, f16.name, name, f"{n_out}+{n_out2}x{d}", wbytes, wbytes + d * 4, launch, n_sets, None))
    dec = reg.get("attn.decode", "split_heads8")
    mma = reg.get("attn.decode", "heads_mma")
    grp = group_offset(1)
    for name, pos in ((f"{n_swa + top} rows visible", 4 * top - 1), (f"{n_swa + top} rows selected", 8 * top)):
        steps = cuda.to_device(records(pos, 1, n_swa, [(4, top)], ring=n_swa), stream=stream)
        n_comp = pos // 4 + 1
        raw = cuda.to_device(rng.standard_normal((n_swa, head_dim)).astype(np.float16), stream=stream)
        comp = cuda.to_device(rng.standard_normal((n_comp, head_dim)).astype(np.float16), stream=stream)
        sel = cuda.to_device(np.sort(rng.choice(n_comp, top, replace=False)).astype(np.int32).reshape(1, top),
                             stream=stream)
        q = cuda.to_device(rng.standard_normal((1, n_head, head_dim)).astype(np.float32), stream=stream)
        sinks = cuda.to_device(rng.standard_normal(n_head).astype(np.float32), stream=stream)
        out = cuda.device_array(n_head * head_dim, np.float32, stream=stream)
        scratch = attn_mod.alloc_attn_scratch(n_head, head_dim, stream)

        moved = (n_swa + top) * head_dim * 2 + 2 * n_head * head_dim * 4
        for impl, geom in ((dec, {}), (dec, {"hpb": 4}), (mma, {"mma": True}), (mma, {"mma": True, "splits": 16}),
                           (mma, {"mma": True, "hpb": 8})):
            def launch(i, steps=steps, raw=raw, comp=comp, sel=sel, q=q, sinks=sinks, out=out, scratch=scratch,
                       geom=geom, impl=impl):
                impl(q, raw, comp, sinks, sel, out=out, steps=steps, grp=grp, max_rows=n_swa + top, scratch=scratch,
                     stream=stream, **geom)

            label = name + "".join(f" {k} {v}" for k, v in geom.items() if k != "mma")
            cases.append((impl.op, impl.name, label, f"1x{n_head}x{head_dim}", 0, moved, launch, 1, None))
    # a decode step of the 20-layer bench (bench/placement.py: ~176 positions): window 128 + 44 compressed rows
    n_comp = 44
    steps = cuda.to_device(records(4 * n_comp - 1, 1, n_swa, [(4, n_comp)], ring=n_swa), stream=stream)
    raw = cuda.to_device(rng.standard_normal((n_swa, head_dim)).astype(np.float16), stream=stream)
    comp = cuda.to_device(rng.standard_normal((n_comp, head_dim)).astype(np.float16), stream=stream)
    for geom in ({}, {"splits": 2}, {"splits": 4}, {"splits": 6}):
        def launch(i, steps=steps, raw=raw, comp=comp, q=q, sinks=sinks, out=out, scratch=scratch, geom=geom):
            mma(q, raw, comp, sinks, None, out=out, steps=steps, grp=grp, max_rows=n_swa + n_comp, scratch=scratch,
                stream=stream, mma=True, **geom)

        label = f"{n_swa + n_comp} rows visible" + "".join(f" {k} {v}" for k, v in geom.items())
        cases.append((mma.op, mma.name, label, f"1x{n_head}x{head_dim}", 0,
                      (n_swa + n_comp) * head_dim * 2 + 2 * n_head * head_dim * 4, launch, 1, None))
    n_hc = 4
    hc = cuda.to_device(rng.standard_normal((1, n_hc, d)).astype(np.float32), stream=stream)
    fn = cuda.to_device((rng.standard_normal((24, n_hc * d)) / 128).astype(np.float16), stream=stream)
    scale = cuda.to_device(np.array([0.5, 0.5, 0.5], np.float32), stream=stream)
    base = cuda.to_device((0.1 * rng.standard_normal(24)).astype(np.float32), stream=stream)
    nw = cuda.to_device(np.ones(d, np.float32), stream=stream)
    pre = reg.get("hc.pre", "split_mix")
    out = hc_mod.alloc_pre(1, n_hc, d, True, stream)
    scr = hc_mod.alloc_scratch(1, n_hc * d, 24, stream)
    mix = cuda.device_array(24, np.float32, stream=stream)
    for label, iters, o in (("20 Sinkhorn rounds", 20, out), ("1 Sinkhorn round", 1, out),
                            ("no Sinkhorn (mix out)", 20, out._replace(comb=None, mix=mix)),
                            ("mix out, x_norm Q8_0 + Q8_K", 20,
                             out._replace(comb=None, mix=mix, x_q8_0=alloc_q8_0(1, d, stream),
                                          x_q8_K=alloc_q8_K(1, d, stream)))):
        def launch(i, iters=iters, o=o):
            pre(hc, fn, scale, base, nw, out=o, n_hc=n_hc, iters=iters, hc_eps=1e-6, rms_eps=1e-6, scratch=scr,
                stream=stream)

        cases.append((pre.op, pre.name, label, f"1x{n_hc}x{d}", 24 * n_hc * d * 2, 24 * n_hc * d * 2 + 2 * n_hc * d * 4,
                      launch, 1, None))
    comb_op = reg.get("hc.comb", "warp_sinkhorn")
    cases.append((comb_op.op, comb_op.name, "20 Sinkhorn rounds", f"1x{n_hc}x{n_hc}", 0, 24 * 4 + 16 * 4,
                  lambda i: comb_op(mix, scale, base, out=out.comb, n_hc=n_hc, iters=20, hc_eps=1e-6, stream=stream),
                  1, None))
    post = reg.get("hc.post", "elementwise")
    y = cuda.to_device(rng.standard_normal((1, d)).astype(np.float32), stream=stream)
    pw = cuda.to_device(rng.uniform(0, 2, (1, n_hc)).astype(np.float32), stream=stream)
    comb = cuda.to_device(rng.uniform(0, 1, (1, n_hc, n_hc)).astype(np.float32), stream=stream)
    new = cuda.device_array(n_hc * d, np.float32, stream=stream)
    cases.append((post.op, post.name, "", f"1x{n_hc}x{d}", 0, 2 * n_hc * d * 4 + d * 4,
                  lambda i: post(y, hc, pw, comb, out=new, n_hc=n_hc, stream=stream), 1, None))
    route = reg.get("router.select", "block_topk")
    n_expert = 16 if tiny else 256
    rlogits = cuda.to_device(rng.standard_normal((1, n_expert)).astype(np.float32), stream=stream)
    rbias = cuda.to_device((0.1 * rng.standard_normal(n_expert)).astype(np.float32), stream=stream)
    rout = router_mod.alloc_route(1, 6, stream)
    cases.append((route.op, route.name, "6 selected", f"1x{n_expert}", 0, n_expert * 8,
                  lambda i: route(rlogits, rbias, out=rout, k=6, scale=2.5, stream=stream), 1, None))
    return cases


def build_cases(rng, stream, tiny: bool, only: list[str]):
    cases = []

    def want(key: str) -> bool:
        return not only or any(o in key for o in only)

    if tiny:
        cases += q8_0_matvec_case(rng, "tiny", 40, 1024, 1, stream, tiny)
        cases += moe_cases(rng, Q.IQ2_XXS, "gate_up", 4, 16, 512, 2, (4,), stream)
        cases += moe_cases(rng, Q.Q2_K, "down_sum", 4, 16, 512, 2, (4,), stream, mapped=True)
        cases += moe_cases(rng, Q.Q2_K, "down_sum", 4, 16, 512, 2, (4,), stream)
        cases += stage_cases(rng, Q.Q2_K, 4, 16, 512, 2, stream)
        cases += small_cases(rng, stream, tiny)
        cases += decode_cases(rng, stream, tiny)
        return cases
    if want("q8"):          # a decode step's Q8_0 projections
        for name, n, k in (("attn_q_a+kv", 1536, 4096), ("attn_q_b", 32768, 1024), ("attn_output_a", 8192, 4096),
                           ("attn_output_b", 4096, 8192), ("shared gate+up", 4096, 4096)):
            cases += q8_0_matvec_case(rng, name, n, k, 1, stream, tiny)
    if want("q_b"):
        cases += q8_0_matvec_case(rng, "attn_q_b", 32768, 1024, 1, stream, tiny)
    if want("output"):
        cases += q8_0_matvec_case(rng, "output head", 129280, 4096, 1, stream, tiny)
    if want("matmul"):
        cases += q8_0_matvec_case(rng, "4096x4096 batch 8", 4096, 4096, 8, stream, tiny)
        cases += q8_0_matvec_case(rng, "4096x4096 batch 32", 4096, 4096, 32, stream, tiny)
    if want("iq2"):
        cases += moe_cases(rng, Q.IQ2_XXS, "gate_up", 48, 2048, 4096, 6, (16, 8), stream, replicas=(1,),
                           min_blocks=(0, 4))
        cases += moe_cases(rng, Q.IQ2_XXS, "matvec", 48, 2048, 4096, 6, (16,), stream, replicas=(1,))
        cases += moe_cases(rng, Q.IQ2_XXS, "down_sum", 48, 4096, 2048, 6, (8, 4), stream, replicas=(1,),
                           min_blocks=(None, 0))
    if want("q2_k"):
        cases += moe_cases(rng, Q.Q2_K, "down_sum", 48, 4096, 2048, 6, (8, 4), stream, min_blocks=(None, 0, 3))
        cases += moe_cases(rng, Q.Q2_K, "matvec", 48, 4096, 2048, 6, (4,), stream)
    if want("q4_k"):
        cases += moe_cases(rng, Q.Q4_K, "gate_up", 24, 2048, 4096, 6, (16,), stream)
        cases += moe_cases(rng, Q.Q4_K, "down_sum", 24, 4096, 2048, 6, (8, 4), stream, min_blocks=(None, 0))
    if want("small"):
        cases += small_cases(rng, stream, tiny)
    if want("decode"):
        cases += decode_cases(rng, stream, tiny)
    if want("host"):        # the experts a partial / direct placement leaves in host memory
        cases += moe_cases(rng, Q.IQ2_XXS, "gate_up", 48, 2048, 4096, 6, (16,), stream, replicas=(1,), mapped=True)
        cases += moe_cases(rng, Q.Q2_K, "down_sum", 48, 4096, 2048, 6, (8,), stream, mapped=True)
        cases += moe_cases(rng, Q.Q2_K, "matvec", 48, 4096, 2048, 6, (4,), stream, mapped=True)
        cases += stage_cases(rng, Q.IQ2_XXS, 48, 2048, 4096, 6, stream)
        cases += stage_cases(rng, Q.Q2_K, 48, 4096, 2048, 6, stream)
    return cases


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")))
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tiny", action="store_true", help="small shapes (simulator smoke test)")
    ap.add_argument("--sass", action="store_true", help="write the SASS of the main MoE kernels to --out")
    ap.add_argument("--only", nargs="*", default=[],
                    help="case name filters (q8 q_b output matmul iq2 q2_k q4_k small decode host)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.reps, args.rounds = 2, 2
    rng = np.random.default_rng(int(time.time()))
    stream = cuda.stream()
    dev = "cudasim" if SIMULATOR else cuda.get_current_device()
    name = dev if SIMULATOR else (dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name))
    cc = "" if SIMULATOR else "%d.%d" % dev.compute_capability
    size = (1 << 20) if args.tiny else (1 << 30)
    copy_bandwidth(size, stream, reps=3)  # warm the clocks first
    memcpy_bw = copy_bandwidth(size, stream)
    kcopy_bw, read_bw = stream_bandwidths(size, stream) if not SIMULATOR else (memcpy_bw, memcpy_bw)
    copy_bw = max(memcpy_bw, kcopy_bw)
    print(f"device {name} cc {cc}: device-to-device copy {memcpy_bw / 1e9:.0f} GB/s (cuMemcpyDtoD), "
          f"{kcopy_bw / 1e9:.0f} GB/s (copy kernel), read + write bytes; read-only kernel {read_bw / 1e9:.0f} GB/s",
          flush=True)

    t_build = time.perf_counter()
    cases = build_cases(rng, stream, args.tiny, args.only)
    host_bw = 0.0
    if any(HOST_MAPPED in c[2] for c in cases):
        from ds4nb.dispatch.device import measure_read_bandwidth

        host_bw = 1.0 if SIMULATOR else measure_read_bandwidth(device_bytes=8 << 20, host_bytes=256 << 20).host
        print(f"host-mapped read-only kernel {host_bw / 1e9:.1f} GB/s (\"% host\")", flush=True)
    stream.synchronize()
    print(f"built {len(cases)} cases in {time.perf_counter() - t_build:.1f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for op, impl, variant, shape, wbytes, moved, launch, n_sets, kernel in cases:
        t0 = time.perf_counter()
        try:
            for i in range(n_sets):  # compile + touch every set once
                launch(i)
            stream.synchronize()
        except Exception as exc:  # a variant that does not build must not cost the other numbers
            print(f"{op} {variant}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        compile_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(3):                        # the host's cost of queueing a launch, compiled
            launch(i % n_sets)
        stream.synchronize()
        host_ms = (time.perf_counter() - t1) * 1e3 / 3
        sleep_ms = max(5, int(2 * args.reps * host_ms) + 2)   # head start: twice the round's queueing time
        samples, host_us, host_bound = time_rounds(launch, n_sets, args.reps, args.rounds, sleep_ms, stream)
        res = Result(op, impl, variant, shape, wbytes, moved, samples, host_us, host_bound)
        if kernel is not None and not SIMULATOR:
            res.resources = resources(kernel)
            if args.sass and ("(default)" in variant) and op in ("iq2_xxs.moe_gate_up", "q2_k.moe_down_sum"):
                try:
                    sass = kernel.inspect_sass()
                    text = "\n".join(sass.values()) if isinstance(sass, dict) else str(sass)
                    (args.out / f"sass_{op.replace('.', '_')}.txt").write_text(text)
                except Exception as exc:
                    print(f"no SASS for {op}: {exc!r}")
        results.append(res)
        print(f"{op:22s} {impl:14s} {variant:16s} {shape:24s} {res.median_us:9.2f} us "
              f"{res.gbps():7.0f} GB/s {100 * res.gbps() / copy_bw * 1e9:5.1f}% copy  host {host_us:5.1f} us"
              f"{'  HOST-BOUND' if host_bound else ''}  (first launch {compile_s:.1f} s) {res.resources}",
              flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    cols = ["op", "impl", "variant", "shape", "weight_MB", "moved_MB", "median_us", "p10_us", "p90_us", "GBps",
            "pct_copy", "pct_read", "pct_host", "host_us_per_launch", "host_bound", "regs", "local_bytes", "idp4a",
            "calls"]

    def pct_host(r: Result) -> str:
        return f"{100 * r.gbps() * 1e9 / host_bw:.1f}" if HOST_MAPPED in r.variant else ""

    with open(args.out / "kernels.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([r.op, r.impl, r.variant, r.shape, f"{r.weight_bytes / 1e6:.2f}", f"{r.bytes_moved / 1e6:.3f}",
                        f"{r.median_us:.2f}", f"{r.pct(0.1):.2f}", f"{r.pct(0.9):.2f}", f"{r.gbps():.0f}",
                        f"{100 * r.gbps() * 1e9 / copy_bw:.1f}", f"{100 * r.gbps() * 1e9 / read_bw:.1f}",
                        pct_host(r), f"{r.host_us:.1f}", int(r.host_bound),
                        r.resources.get("regs", ""), r.resources.get("local", ""), r.resources.get("idp4a", ""),
                        r.resources.get("calls", "")])
    cmd = "python bench/kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# ds4nb kernel benchmark",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {name} (cc {cc}); host {platform.node()}",
        f"- command: `{cmd.strip()}`",
        f"- copy ceiling: {copy_bw / 1e9:.0f} GB/s = the better of a 1 GiB cuMemcpyDtoD "
        f"({memcpy_bw / 1e9:.0f} GB/s) and a copy kernel ({kcopy_bw / 1e9:.0f} GB/s), read + write bytes; "
        f"read-only kernel: {read_bw / 1e9:.0f} GB/s (\"% read\")"
        + (f"; host-mapped read-only kernel: {host_bw / 1e9:.1f} GB/s (\"% host\", {HOST_MAPPED} cases)"
           if host_bw else ""),
        f"- method: median of {args.rounds} rounds x {args.reps} launches (CUDA events, sleep-kernel head start), "
        "weights rotated over sets > 3x L2",
        "",
        "| op | impl | variant | shape | weights MB | median us | GB/s | % copy | % read | % host |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r.op} | {r.impl} | {r.variant} | {r.shape} | {r.weight_bytes / 1e6:.1f} | "
                     f"{r.median_us:.2f} | {r.gbps():.0f} | {100 * r.gbps() * 1e9 / copy_bw:.1f} | "
                     f"{100 * r.gbps() * 1e9 / read_bw:.1f} | {pct_host(r)} |")
    (args.out / "kernels.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'kernels.csv'} and {args.out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
