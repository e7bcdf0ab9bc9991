"""Time ds4nb's model kernels (HC, RoPE, attention, compressor, indexer, router, F16 matvec,
sampling) at DS4 Flash decode shapes.

    python bench/model_kernels.py --out bench/results      # on a GPU (the device tool)
    NUMBA_ENABLE_CUDASIM=1 python bench/model_kernels.py --smoke   # this script's logic, tiny

Method (one process, one stream):

* a 1 GiB device-to-device copy gives the bandwidth ceiling (bytes read + written);
* each case is checked once against the numpy oracle on the GPU (relative
  error printed in the table), launched to compile, then timed in rounds: a
  sleep kernel first (so the host queues the round's launches before the GPU
  reaches them: numba's host cost per launch is tens of microseconds, more
  than most of these kernels take), ``reps`` launches between two CUDA events,
  round time / reps is one sample; median (and p10/p90) over rounds;
* inputs rotate over several copies whose total is > 3x the 50 MB L2 where
  one copy is large enough to matter, so weights and KV rows come from HBM as
  in a decode step (small per-token state stays cached, as it would);
* GB/s counts the bytes a launch must move (weights/rows read once, activations in, results out).

Output: ``model_kernels.csv`` and ``model_kernels.md`` (device, command, date, table) in ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds4nb.kernels import attention as A  # noqa: E402
from ds4nb.kernels import compressor as C  # noqa: E402
from ds4nb.kernels import f16_matvec as F  # noqa: E402
from ds4nb.kernels import hc as H  # noqa: E402
from ds4nb.kernels import indexer as I  # noqa: E402
from ds4nb.kernels import rope as R  # noqa: E402
from ds4nb.kernels import router as RT  # noqa: E402
from ds4nb.kernels import sample as S  # noqa: E402
from ds4nb.kernels.intrinsics import SIMULATOR  # noqa: E402
from ds4nb.kernels.step import group_offset, one_record, records  # noqa: E402
from ds4nb.reference import ops  # noqa: E402
from ds4nb.sampling import SamplingParams  # noqa: E402

L2_BYTES = 50 << 20


@cuda.jit
def _sleep(us):
    if cuda.threadIdx.x == 0:
        for _ in range(us):
            cuda.nanosleep(1000)


@dataclass
class Case:
    name: str
    op: str
    shape: str
    bytes_moved: int
    launch: Callable[[int], Any]
    n_sets: int
    error: float = float("nan")
    samples_us: list = field(default_factory=list)
    host_us: float = 0.0
    host_bound: bool = False

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us) if self.samples_us else float("nan")

    def pct(self, q: float) -> float:
        s = sorted(self.samples_us)
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def n_sets(bytes_per_set: int, hi: int = 64) -> int:
    return max(1, min(hi, -(-3 * L2_BYTES // max(1, bytes_per_set))))


def rel(got, ref) -> float:
    got = np.asarray(got, np.float64).reshape(np.shape(ref))
    if not np.isfinite(got).all():
        return float("inf")
    return float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-300))


def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


# ---------------------------------------------------------------------------
# cases (each returns a Case with its error already measured)
# ---------------------------------------------------------------------------


def f16_case(rng, name, n_out, n_in, n_out2=0, wpr=None) -> Case:
    ns = n_sets((n_out + n_out2) * n_in * 2)
    ws = [dev((rng.standard_normal((n_out, n_in)) / math.sqrt(n_in)).astype(np.float16)) for _ in range(ns)]
    w2s = [dev((rng.standard_normal((n_out2, n_in)) / math.sqrt(n_in)).astype(np.float16)) for _ in range(ns)] \
        if n_out2 else [None] * ns
    x = rng.standard_normal(n_in).astype(np.float32)
    xd = dev(x)
    out, out2 = cuda.device_array(n_out, np.float32), cuda.device_array(max(n_out2, 1), np.float32)

    def launch(i):
        F.f16_matvec(ws[i], xd, None, out=out, w2=w2s[i], out2=out2 if n_out2 else None, wpr=wpr)

    launch(0)
    ref = ws[0].copy_to_host().astype(np.float64) @ x
    err = rel(out.copy_to_host(), ref)
    if n_out2:
        err = max(err, rel(out2.copy_to_host(), w2s[0].copy_to_host().astype(np.float64) @ x))
    moved = (n_out + n_out2) * n_in * 2 + n_in * 4 + (n_out + n_out2) * 4
    shape = f"{n_out}{'+' + str(n_out2) if n_out2 else ''}x{n_in} f16"
    return Case(name, "f16.matvec", shape, moved, launch, ns, err)


def hc_pre_case(rng, n_hc=4, n_embd=4096) -> Case:
    hc_dim, n_mix = n_hc * n_embd, 2 * n_hc + n_hc * n_hc
    ns = n_sets(n_mix * hc_dim * 2 + hc_dim * 4)
    fns = [dev((rng.standard_normal((n_mix, hc_dim)) / math.sqrt(hc_dim)).astype(np.float16)) for _ in range(ns)]
    hcs = [dev(rng.standard_normal((1, n_hc, n_embd)).astype(np.float32)) for _ in range(ns)]
    sc = (0.5 + 0.1 * rng.standard_normal(3)).astype(np.float32)
    bs = (0.1 * rng.standard_normal(n_mix)).astype(np.float32)
    nw = (1 + 0.1 * rng.standard_normal(n_embd)).astype(np.float32)
    scd, bsd, nwd = dev(sc), dev(bs), dev(nw)
    out = H.alloc_pre(1, n_hc, n_embd, True)
    scratch = H.alloc_scratch(1, hc_dim, n_mix)

    def launch(i):
        H.hc_pre(hcs[i], fns[i], scd, bsd, nwd, out=out, n_hc=n_hc, iters=20, hc_eps=1e-6, rms_eps=1e-6,
                 scratch=scratch)

    launch(0)
    hc = hcs[0].copy_to_host()
    fn = fns[0].copy_to_host().astype(np.float32)
    split = ops.hc_split_sinkhorn(ops.rms_norm(hc.reshape(1, hc_dim), None, 1e-6) @ fn.T, sc, bs, n_hc, 20, 1e-6)
    x = ops.hc_weighted_sum(hc, split.pre)
    err = max(rel(out.x.copy_to_host(), x), rel(out.comb.copy_to_host(), split.comb),
              rel(out.x_norm.copy_to_host(), ops.rms_norm(x, nw, 1e-6)))
    moved = n_mix * hc_dim * 2 + hc_dim * 4 * 2 + n_embd * 8
    return Case("hc.pre (+attn_norm)", "hc.pre", f"{n_hc}x{n_embd}, fn {n_mix}x{hc_dim} f16", moved, launch, ns,
                err)


def hc_post_case(rng, n_hc=4, n_embd=4096) -> Case:
    y, hc = rng.standard_normal((1, n_embd)).astype(np.float32), rng.standard_normal((1, n_hc, n_embd)).astype(
        np.float32)
    post, comb = rng.uniform(0, 2, (1, n_hc)).astype(np.float32), rng.uniform(0, 1, (1, n_hc, n_hc)).astype(
        np.float32)
    yd, hcd, pd, cd = dev(y), dev(hc), dev(post), dev(comb)
    out = cuda.device_array(n_hc * n_embd, np.float32)

    def launch(i):
        H.hc_post(yd, hcd, pd, cd, out=out, n_hc=n_hc)

    launch(0)
    err = rel(out.copy_to_host(), ops.hc_post(y, hc, post, comb))
    return Case("hc.post", "hc.post", f"{n_hc}x{n_embd}", n_embd * 4 * (1 + 2 * n_hc), launch, 1, err)


def hc_head_case(rng, n_hc=4, n_embd=4096) -> Case:
    hc_dim = n_hc * n_embd
    fn = (rng.standard_normal((n_hc, hc_dim)) / math.sqrt(hc_dim)).astype(np.float16)
    hc = rng.standard_normal((1, n_hc, n_embd)).astype(np.float32)
    sc, bs = np.array([0.5], np.float32), (0.1 * rng.standard_normal(n_hc)).astype(np.float32)
    fnd, hcd, scd, bsd = dev(fn), dev(hc), dev(sc), dev(bs)
    out = cuda.device_array(n_embd, np.float32)
    scratch = H.alloc_scratch(1, hc_dim, n_hc)

    def launch(i):
        H.hc_head(hcd, fnd, scd, bsd, out=out, n_hc=n_hc, hc_eps=1e-6, rms_eps=1e-6, scratch=scratch)

    launch(0)
    pre = ops.rms_norm(hc.reshape(1, hc_dim), None, 1e-6) @ fn.astype(np.float32).T
    ref = ops.hc_weighted_sum(hc, ops.sigmoid(pre * sc[0] + bs) + np.float32(1e-6))
    return Case("hc.head", "hc.head", f"{n_hc}x{n_embd}", fn.nbytes + hc.nbytes + n_embd * 4, launch, 1,
                rel(out.copy_to_host(), ref))


def q_norm_rope_case(rng, n_head=64, hd=512, n_rot=64) -> Case:
    rope = R.make_test_rope(n_rot, True)
    q = rng.standard_normal((1, n_head * hd)).astype(np.float32)
    qd = dev(q)
    out = cuda.device_array(q.size, np.float32)
    pos = 123457
    steps = dev(records(pos, 1))

    def launch(i):
        A.q_norm_rope(qd, out=out, n_head=n_head, head_dim=hd, eps=1e-6, rope=rope, steps=steps)

    launch(0)
    ref = ops.apply_rope_tail(ops.head_rms_norm(q[0], n_head, hd, 1e-6).reshape(n_head, hd), rope, pos)
    return Case("q head-norm + rope", "attn.q_norm_rope", f"{n_head}x{hd}", q.nbytes * 2, launch, 1,
                rel(out.copy_to_host(), ref))


def rope_case(rng, n_head=64, hd=512, n_rot=64) -> Case:
    rope = R.make_test_rope(n_rot, True)
    x = rng.standard_normal((1, n_head * hd)).astype(np.float32)
    xd = dev(x)
    out = cuda.device_array(x.size, np.float32)
    pos = 654321

    def launch(i):
        R.rope_tail(xd, out=out, rope=rope, pos=pos, head_dim=hd, inverse=True)

    launch(0)
    ref = ops.apply_rope_tail(x.reshape(n_head, hd), rope, pos, inverse=True)
    return Case("rope inverse (copy)", "rope.tail", f"{n_head}x{hd} n_rot {n_rot}", x.nbytes * 2, launch, 1,
                rel(out.copy_to_host(), ref))


def kv_store_case(rng, hd=512, n_rot=64) -> Case:
    rope = R.make_test_rope(n_rot, True)
    kv = (rng.standard_normal((1, hd)) * 5).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(hd)).astype(np.float32)
    kvd, wd = dev(kv), dev(w)
    cache = cuda.device_array((128, hd), np.float16)
    pos = 1000
    steps = dev(records(pos, 1, n_swa=128))

    def launch(i):
        A.kv_store(kvd, wd, out=cache, rope=rope, eps=1e-6, steps=steps)

    launch(0)
    ref = A.kv_store_reference(kv, w, rope, pos, 1e-6, n_rot)[0]
    return Case("kv norm+rope+fp8+f16 store", "attn.kv_store", f"{hd}", hd * 10, launch, 1,
                rel(cache.copy_to_host()[pos % 128].astype(np.float32), ref))


def attn_case(rng, name, n_comp, top, n_head=64, hd=512, n_raw=128, geom=None) -> Case:
    geom = geom or {}
    rows_bytes = (n_raw + (top or n_comp)) * hd * 2
    ns = n_sets((n_raw + n_comp) * hd * 2, hi=16)
    raws = [dev(ops.f16_round(rng.standard_normal((n_raw, hd))).astype(np.float16)) for _ in range(ns)]
    comps = [dev(ops.f16_round(rng.standard_normal((max(n_comp, 1), hd))).astype(np.float16)) for _ in range(ns)]
    q = (rng.standard_normal((n_head, hd)) * 2).astype(np.float32)
    sinks = (0.5 * rng.standard_normal(n_head)).astype(np.float32)
    sel = None if top is None else rng.choice(n_comp, top, replace=False).astype(np.int32)
    qd, sd, seld = dev(q), dev(sinks), None if sel is None else dev(sel)
    out = cuda.device_array(q.size, np.float32)
    scratch = A.alloc_attn_scratch(n_head, hd)
    rope = R.make_test_rope(64, True)
    pos = 99999
    steps = dev(one_record(pos, n_raw=n_raw, visible=top or n_comp, select=top or 0))

    def launch(i):
        A.attention_decode(qd, raws[i], comps[i] if n_comp else None, sd, seld, out=out, steps=steps,
                           grp=group_offset(1), max_rows=n_raw + (top or n_comp), rope=rope, scratch=scratch, **geom)

    launch(0)
    raw = raws[0].copy_to_host().astype(np.float32)
    comp = comps[0].copy_to_host().astype(np.float32)
    rows = np.concatenate([raw, comp[:n_comp] if sel is None else comp[np.sort(sel)]])
    ref = ops.apply_rope_tail(ops.attention_with_sinks(q, rows, sinks), rope, pos, inverse=True)
    g = ",".join(f"{k}={v}" for k, v in geom.items())
    return Case(name + (f" [{g}]" if g else ""), "attn.decode",
                f"{n_head}x{hd}, {n_raw}+{top or n_comp} rows f16", rows_bytes + q.nbytes * 2, launch, ns,
                rel(out.copy_to_host(), ref))


def emit_case(rng, name, ratio, d, overlap, finish, n_rot=64) -> Case:
    rope = R.make_test_rope(n_rot, True)
    width = 2 * d if overlap else d
    kv, sc = C.random_state(rng, ratio, d, overlap, filled=ratio - 1)
    new_kv = rng.standard_normal(width).astype(np.float32)
    new_sc = rng.standard_normal(width)
    ape = rng.standard_normal((ratio, width)).astype(np.float16)
    nw = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    pos = ratio * 77 - 1
    kv2, sc2 = C.store_reference(kv, sc, new_kv, new_sc, ape, pos, ratio, overlap)
    row, _, _ = C.emit_reference(kv2, sc2, nw, pos, ratio, overlap, rope, 1e-6, finish, n_rot)
    proj = C.CompressorProjection(dev(new_kv), dev(new_sc))
    state = C.CompressorStateDev(dev(kv), dev(sc))
    kvd0, scd0 = dev(kv), dev(sc)   # pristine copies: the step slides the window
    apd, nwd = dev(ape), dev(nw)
    cache = cuda.device_array((4, d), np.float16)
    steps = dev(one_record(pos, emit=1, rows=2))

    def launch(i):
        C.compressor_step(proj, 0, apd, nwd, out=cache, state=state, ratio=ratio, overlap=overlap, rope=rope,
                          eps=1e-6, finish=finish, steps=steps, grp=group_offset(1))

    launch(0)
    err = rel(cache.copy_to_host()[1].astype(np.float32), row)
    state.kv.copy_to_device(kvd0)
    state.score.copy_to_device(scd0)
    return Case(name, "compressor.step", f"ratio {ratio}, d {d}, {finish}", kv.nbytes * 4 + d * 2, launch, 1, err)


def update_case(rng, width=1024, n_embd=4096) -> Case:
    ns = n_sets(2 * width * n_embd * 2)
    wk = [dev((rng.standard_normal((width, n_embd)) / 64).astype(np.float16)) for _ in range(ns)]
    wg = [dev((rng.standard_normal((width, n_embd)) / 64).astype(np.float16)) for _ in range(ns)]
    x = rng.standard_normal(n_embd).astype(np.float32)
    xd = dev(x)
    out = C.alloc_projection(1, width)

    def launch(i):
        C.compressor_project(xd, wk[i], wg[i], out=out)

    launch(0)
    err = max(rel(out.score.copy_to_host(), wg[0].copy_to_host().astype(np.float64) @ x),
              rel(out.kv.copy_to_host(), wk[0].copy_to_host().astype(np.float64) @ x))
    return Case("compressor.project (CSA kv+gate)", "compressor.project", f"2x{width}x{n_embd} f16",
                2 * width * n_embd * 2 + width * 12, launch, ns, err)


def q_prep_case(rng, n_ih=64, d=128) -> Case:
    rope = R.make_test_rope(64, True)
    q = rng.standard_normal((1, n_ih * d)).astype(np.float32)
    qd = dev(q)
    out = cuda.device_array(q.size, np.float32)

    steps = dev(records(4321, 1))

    def launch(i):
        I.q_prep(qd, out=out, n_head=n_ih, head_dim=d, rope=rope, steps=steps)

    launch(0)
    ref = ops.indexer_qat(ops.apply_rope_tail(q.reshape(n_ih, d), rope, 4321))
    return Case("indexer q rope+hadamard+fp4", "indexer.q_prep", f"{n_ih}x{d}", q.nbytes * 2, launch, 1,
                rel(out.copy_to_host(), ref))


def scores_case(rng, n, n_ih=64, d=128) -> Case:
    ns = n_sets(n * d * 2, hi=8)
    q = ops.indexer_qat(rng.standard_normal((n_ih, d)).astype(np.float32))
    rowsets = [dev(ops.f16_round(rng.standard_normal((n, d))).astype(np.float16)) for _ in range(ns)]
    w = rng.standard_normal(n_ih).astype(np.float32)
    qd, wd = dev(q), dev(w)
    out = cuda.device_array(n, np.float32)
    ws = I.indexer_w_scale(d, n_ih)

    steps = dev(one_record(0, rows=n, visible=512, select=512))

    def launch(i):
        I.indexer_scores(qd, wd, rowsets[i], out=out, w_scale=ws, steps=steps, grp=group_offset(1), max_rows=n)

    launch(0)
    ref = ops.indexer_scores(q, w, rowsets[0].copy_to_host().astype(np.float32), ws)
    flops = 2 * n * n_ih * d
    c = Case("indexer scores", "indexer.scores", f"{n_ih}x{d} x {n} rows f16", n * d * 2 + n * 4, launch, ns,
             rel(out.copy_to_host(), ref))
    c.flops = flops  # type: ignore[attr-defined]
    return c


def topk_case(rng, n, k=512) -> Case:
    v = rng.standard_normal(n).astype(np.float32)
    vd = dev(v)
    out = cuda.device_array(k, np.int32)

    def launch(i):
        I.topk(vd, n, k, out=out)

    launch(0)
    err = 0.0 if np.array_equal(out.copy_to_host(), ops.top_k_stable(v, k)) else 1.0
    return Case("top-k", "topk.select", f"{k} of {n}", n * 4, launch, 1, err)


def router_case(rng, hashed=False, n_e=256, k=6) -> Case:
    logits = (3 * rng.standard_normal((1, n_e))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(n_e)).astype(np.float32)
    table = np.stack([rng.choice(n_e, k, replace=False) for _ in range(1000)]).astype(np.int32)
    tok = np.array([417], np.int32)
    ld, bd, td, tokd = dev(logits), dev(bias), dev(table), dev(tok)
    out = RT.alloc_route(1, k)

    def launch(i):
        if hashed:
            RT.router_hash(ld, td, tokd, out=out, k=k, scale=1.5)
        else:
            RT.router_select(ld, bd, out=out, k=k, scale=1.5)

    launch(0)
    p = ops.router_probs(logits[0])
    sel = table[417] if hashed else ops.select_experts_topk(p, bias, k)
    w = ops.route_weights(p[sel], 1.5, True)
    ok = np.array_equal(out.selected.copy_to_host()[0], sel)
    err = rel(out.weights.copy_to_host()[0], w) if ok else 1.0
    return Case("router hash" if hashed else "router top-6", "router.hash" if hashed else "router.select",
                f"{n_e} experts", n_e * 4, launch, 1, err)


def sample_case(rng, name, params, n=129280) -> Case:
    from ds4nb.sampling import sample

    x = S.random_logits(rng, n)
    xd = dev(x)
    out = cuda.device_array(2, np.int32)
    scratch = S.alloc_scratch(n)
    us = rng.random(64)
    miss = 0
    for u in us[:16]:
        S.sample_device(xd, out=out, params=params, u=float(u), scratch=scratch)
        tok, status = out.copy_to_host()
        miss += int(status != 0 or tok != sample(x, params, S.FixedDraw(float(u))))

    def launch(i):
        S.sample_device(xd, out=out, params=params, u=float(us[i % 64]), scratch=scratch)

    return Case(name, "sample.draw", f"vocab {n}", n * 4, launch, 1, miss / 16)


# ---------------------------------------------------------------------------


def copy_bandwidth(nbytes: int, reps: int = 10) -> float:
    src = cuda.to_device(np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8))
    dst = cuda.device_array(nbytes, np.uint8)
    times = []
    for _ in range(reps + 2):
        e0, e1 = cuda.event(), cuda.event()
        e0.record()
        dst.copy_to_device(src)
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
    return 2 * nbytes / statistics.median(times[2:])


def time_case(c: Case, reps: int, rounds: int) -> None:
    """GPU time per launch: each round queues ``reps`` launches behind a sleep kernel long
    enough (2x the measured host time of the round) that the GPU never waits for the host."""
    c.launch(0)
    cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(4):
        c.launch(i % c.n_sets)
    cuda.synchronize()
    host_est = (time.perf_counter() - t0) / 4 * 1e6
    host = []
    for r in range(rounds):
        if not SIMULATOR:
            _sleep[1, 32](int(2 * reps * host_est) + 200)
        probe = cuda.event(timing=False) if not SIMULATOR else cuda.event()
        e0, e1 = cuda.event(), cuda.event()
        probe.record()
        e0.record()
        t0 = time.perf_counter()
        for i in range(reps):
            c.launch((r * reps + i) % c.n_sets)
        host.append((time.perf_counter() - t0) / reps * 1e6)
        e1.record()
        if not SIMULATOR and probe.query():
            c.host_bound = True
        e1.synchronize()
        c.samples_us.append(e0.elapsed_time(e1) * 1e3 / reps)
    c.host_us = statistics.median(host)


def build_cases(rng, smoke: bool) -> list[Case]:
    if smoke:
        return [f16_case(rng, "router", 16, 64), topk_case(rng, 64, 4)]
    cs: list[Case] = []
    add = cs.append
    add(f16_case(rng, "router ffn_gate_inp", 256, 4096))
    add(f16_case(rng, "router ffn_gate_inp [wpr=4]", 256, 4096, wpr=4))
    add(f16_case(rng, "indexer.proj", 64, 4096))
    add(f16_case(rng, "indexer attn_q_b", 8192, 1024))
    add(f16_case(rng, "compressor kv+gate (CSA)", 1024, 4096, 1024))
    add(f16_case(rng, "compressor kv+gate (CSA) [wpr=2]", 1024, 4096, 1024, wpr=2))
    add(f16_case(rng, "compressor kv+gate (HCA)", 512, 4096, 512))
    add(f16_case(rng, "indexer compressor kv+gate", 256, 4096, 256))
    add(update_case(rng))
    add(hc_pre_case(rng))
    add(hc_head_case(rng))
    add(hc_post_case(rng))
    add(q_norm_rope_case(rng))
    add(rope_case(rng))
    add(kv_store_case(rng))
    add(attn_case(rng, "attn CSA 128+512/2048", 2048, 512))
    add(attn_case(rng, "attn CSA 128+512/2048", 2048, 512, geom=dict(hpb=16)))
    add(attn_case(rng, "attn CSA 128+512/2048", 2048, 512, geom=dict(chunk=64)))
    add(attn_case(rng, "attn CSA 128+512/2048", 2048, 512, geom=dict(splits=8)))
    add(attn_case(rng, "attn SWA 128", 0, None))
    add(attn_case(rng, "attn HCA 128+8192 (1M ctx)", 8192, None))
    add(emit_case(rng, "compressor emit CSA attn", 4, 512, True, "fp8"))
    add(emit_case(rng, "compressor emit HCA", 128, 512, False, "fp8"))
    add(emit_case(rng, "compressor emit CSA indexer", 4, 128, True, "qat"))
    add(q_prep_case(rng))
    for n in (2048, 32768, 262144):
        add(scores_case(rng, n))
    for n in (2048, 32768, 262144):
        add(topk_case(rng, n))
    add(router_case(rng))
    add(router_case(rng, hashed=True))
    add(sample_case(rng, "sample greedy", SamplingParams(temperature=0.0)))
    add(sample_case(rng, "sample default (T1, min_p .05)", SamplingParams()))
    add(sample_case(rng, "sample top_k 50 top_p .9", SamplingParams(temperature=0.8, top_k=50, top_p=0.9)))
    add(sample_case(rng, "sample top_k 1024", SamplingParams(temperature=1.0, top_k=1024, min_p=0.0)))
    return cs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="folder for model_kernels.csv / .md")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (simulator check of this script)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    t_start = time.time()
    if SIMULATOR:
        device, copy_gbs = "cudasim", float("nan")
        args.reps, args.rounds = 2, 2
    else:
        d = cuda.get_current_device()
        device = d.name.decode() if isinstance(d.name, bytes) else str(d.name)
        copy_gbs = copy_bandwidth(1 << 30) / 1e9
    cases = build_cases(rng, args.smoke or SIMULATOR)
    print(f"built and checked {len(cases)} cases in {time.time() - t_start:.1f}s", flush=True)
    for c in cases:
        time_case(c, args.reps, args.rounds)
    header = ["case", "op", "shape", "median_us", "p10_us", "p90_us", "host_us_per_launch", "host_bound", "GB_s",
              "pct_of_copy", "rel_error"]
    rows = []
    for c in cases:
        gbs = c.bytes_moved / (c.median_us * 1e-6) / 1e9 if c.bytes_moved else 0.0
        rows.append([c.name, c.op, c.shape, f"{c.median_us:.2f}", f"{c.pct(0.1):.2f}", f"{c.pct(0.9):.2f}",
                     f"{c.host_us:.1f}", int(c.host_bound), f"{gbs:.0f}",
                     f"{100 * gbs / copy_gbs:.0f}" if copy_gbs == copy_gbs else "", f"{c.error:.2g}"])
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"device {device}; copy {copy_gbs:.0f} GB/s; total {time.time() - t_start:.0f}s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "model_kernels.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        cmd = "python bench/model_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:])
        md = ["# Model kernels at DS4 Flash decode shapes", "",
              f"- device: {device} (copy ceiling {copy_gbs:.0f} GB/s, read + write)",
              f"- command: `{cmd}`",
              f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
              f"- host: {platform.python_version()}, numba-cuda, reps {args.reps} x rounds {args.rounds}, "
              f"median of event-timed rounds behind a sleep kernel", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        md += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
        (args.out / "model_kernels.md").write_text("\n".join(md) + "\n")
    bad = [c.name for c in cases if not (c.error <= 2e-3)]
    if bad:
        print("ERROR: cases above tolerance:", bad)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
