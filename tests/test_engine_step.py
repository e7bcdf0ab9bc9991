"""The step input a captured step reads: step records against the oracle's own state, and the buffer layout;
a step's branch (side-stream launches) run eagerly."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from ds4nb.engine.graph import StepRunner, kernel_launches
from ds4nb.engine.step import StepInput, StepLayout
from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import wait_prior_grid
from ds4nb.kernels.sample import SP_FIELDS, sampling_record
from ds4nb.kernels.step import EMIT, N_RAW, NF, POS, RAW_ROW, ROWS, SELECT, VISIBLE, fill_records
from ds4nb.model.presets import flash_config
from ds4nb.reference.engine import CpuEngine
from ds4nb.sampling import SamplingParams


def test_layout_groups_of_the_flash_preset() -> None:
    cfg = flash_config()
    layout = StepLayout.from_config(cfg)
    assert set(layout.groups) == {(4, cfg.indexer_top_k), (128, 0)}
    for il in range(cfg.n_layer):
        g = layout.layer_group[il]
        ratio = cfg.compress_ratio(il)
        assert (g == 0) == (ratio == 0)
        if g:
            assert layout.groups[g - 1] == (ratio, cfg.indexer_top_k if cfg.layer_kind(il) == "csa" else 0)


def test_records_follow_the_oracle_state(tiny_model) -> None:
    """Each token's record says what the oracle's state holds once that token is in."""
    cfg = tiny_model.config
    layout = StepLayout.from_config(cfg)
    cpu = CpuEngine(tiny_model)
    n = 4 * cfg.indexer_top_k + 3 * cfg.n_swa              # past the window wrap and the indexer's first selection
    tokens = np.random.default_rng().integers(0, cfg.n_vocab, n).tolist()
    recs = np.zeros((n, NF), np.int32)
    fill_records(recs, 0, layout.n_swa, layout.groups)
    before = [0] * cfg.n_layer
    for pos, tok in enumerate(tokens):
        cpu.decode(tok)
        rec = recs[pos]
        assert rec[POS] == pos and rec[RAW_ROW] == pos % cfg.n_swa
        for il, ls in enumerate(cpu.snapshot().layers):
            assert rec[N_RAW] == len(ls.raw)
            g = layout.field(il)
            rows = 0 if ls.comp is None else ls.comp.n
            assert rec[g + ROWS] == rows
            assert rec[g + EMIT] == int(rows > before[il])
            selects = cfg.layer_kind(il) == "csa" and rows > cfg.indexer_top_k
            assert rec[g + SELECT] == (cfg.indexer_top_k if selects else 0)
            assert rec[g + VISIBLE] == (cfg.indexer_top_k if selects else rows)
            before[il] = rows


def test_step_input_lands_in_its_device_views(tiny_model) -> None:
    cfg = tiny_model.config
    layout = StepLayout.from_config(cfg)
    inputs = StepInput(5, layout)
    rng = np.random.default_rng()
    tokens = rng.integers(0, cfg.n_vocab, 3).tolist()
    pos0 = int(rng.integers(0, 1000))
    params = SamplingParams(temperature=0.7, top_k=9, top_p=0.8, min_p=0.02)
    u = float(rng.random())
    inputs.write(tokens, pos0, params, u, cfg.n_vocab)
    inputs.upload(0)
    assert inputs.ids.copy_to_host()[:3].tolist() == tokens
    recs = inputs.steps.copy_to_host().reshape(5, NF)[:3]
    assert recs[:, POS].tolist() == [pos0, pos0 + 1, pos0 + 2]
    sp = inputs.sp.copy_to_host()
    assert sp.size == SP_FIELDS and np.array_equal(sp, sampling_record(params, u, cfg.n_vocab))


def test_prefill_chunk_follows_gpu_memory() -> None:
    """The prefill step's tokens: the largest size whose scratch fits 2% of the GPU, never more than ctx."""
    from ds4nb.engine.model import CHUNK_MEMORY_SHARE, CHUNK_SIZES, Scratch, prefill_chunk

    cfg = flash_config()
    sizes = [prefill_chunk(cfg, 4096, gib << 30) for gib in (8, 24, 80, 141)]
    assert sizes == sorted(sizes) and sizes[-1] == CHUNK_SIZES[0] and sizes[0] < sizes[-1]
    for gib, chunk in zip((8, 24, 80, 141), sizes):
        fits = Scratch.nbytes(cfg, chunk, 4096) <= CHUNK_MEMORY_SHARE * (gib << 30)
        assert fits or chunk == CHUNK_SIZES[-1]
        bigger = [c for c in CHUNK_SIZES if c > chunk]
        assert all(Scratch.nbytes(cfg, c, 4096) > CHUNK_MEMORY_SHARE * (gib << 30) for c in bigger)
    assert prefill_chunk(cfg, 100, 141 << 30) == 100


@cuda.jit
def _axpy(a, x, y, out):
    """out = a x + y (float32), a thread per value."""
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]


def test_branch_runs_beside_the_main_stream_until_its_join() -> None:
    """A step's branches (one open per lane) record on their lane's stream and join where the main stream needs
    them; eager runs give the sequential results (the graph path of the same lists: tests/test_engine_graph.py
    on the GPU)."""
    rng = np.random.default_rng()
    x = rng.standard_normal(300).astype(np.float32)
    d = [cuda.to_device(np.zeros(300, np.float32)) for _ in range(6)]
    xd, zero = cuda.to_device(x), cuda.to_device(np.zeros(300, np.float32))
    f32 = np.float32
    rec = L.Recorder()

    def axpy(a, xs, ys, out):
        L.launch(_axpy, 2, 256, rec, f32(a), xs, ys, out)

    axpy(2, xd, zero, d[0])                 # main: d0 = 2x
    with rec.branch(L.PREFETCH):
        axpy(7, xd, zero, d[4])             # prefetch lane: d4 = 7x
    with rec.branch():
        axpy(3, d[0], zero, d[1])           # side, after d0: d1 = 6x
    axpy(5, xd, zero, d[2])                 # main, beside both: d2 = 5x
    rec.join()
    axpy(1, d[1], d[2], d[3])               # main, after the side's join: d3 = 11x
    rec.join()                              # nothing open: records nothing
    rec.join(L.PREFETCH)
    axpy(1, d[4], d[3], d[5])               # main, after the prefetch lane's join: d5 = 18x
    kinds = [(type(x).__name__, x.lane) for x in rec.launches]
    assert kinds == [("Launch", ""), ("Launch", L.PREFETCH), ("Launch", L.SIDE), ("Launch", ""), ("Join", L.SIDE),
                     ("Launch", ""), ("Join", L.PREFETCH), ("Launch", "")]
    with rec.branch():
        with pytest.raises(RuntimeError, match="not inside another branch"):
            with rec.branch(L.PREFETCH):
                pass
    with pytest.raises(RuntimeError, match="branch at a time"):
        with rec.branch():
            pass
    runner = StepRunner(rec.launches[:8], cuda.default_stream(), use_graph=False)
    for _ in range(2):
        runner.run()
        cuda.synchronize()
        d3 = f32(1) * (f32(3) * (f32(2) * x)) + f32(5) * x
        np.testing.assert_array_equal(d[3].copy_to_host(), d3)
        np.testing.assert_array_equal(d[5].copy_to_host(), f32(1) * (f32(7) * x) + d3)
    plain = kernel_launches(rec.launches)
    assert len(plain) == 6 and not any(x.lane for x in plain)


@cuda.jit
def _axpy_early(a, x, y, out):
    wait_prior_grid()
    i = cuda.grid(1)
    if i < out.size:
        out[i] = a * x[i] + y[i]


def test_early_launches_follow_a_kernel_on_their_stream() -> None:
    """``Recorder(early=True)`` marks a launch early only when its kernel waits for the prior grid and the
    launch follows a kernel on its own stream (not the step's or the branch's start, a join or a library
    call); the eager run gives the sequential results (on the GPU, tests/test_engine_graph.py)."""
    rng = np.random.default_rng()
    x = rng.standard_normal(300).astype(np.float32)
    xd, zero = cuda.to_device(x), cuda.to_device(np.zeros(300, np.float32))
    d = [cuda.to_device(np.zeros(300, np.float32)) for _ in range(6)]
    f32 = np.float32
    assert L.waits_for_prior_grid(_axpy_early) and not L.waits_for_prior_grid(_axpy)
    from ds4nb.kernels import hc, norm
    assert L.waits_for_prior_grid(hc._ss_kernel) and L.waits_for_prior_grid(norm._rms_norm_kernel)
    for early in (True, False):
        rec = L.Recorder(early=early)
        L.launch(_axpy_early, 2, 256, rec, f32(2), xd, zero, d[0])      # step start: d0 = 2x
        L.launch(_axpy_early, 2, 256, rec, f32(3), d[0], zero, d[1])    # follows a kernel: d1 = 6x
        L.launch(_axpy, 2, 256, rec, f32(1), d[1], zero, d[2])          # cannot wait itself: d2 = 6x
        with rec.branch():
            L.launch(_axpy_early, 2, 256, rec, f32(1), d[2], xd, d[3])  # branch start: d3 = 7x
            L.launch(_axpy_early, 2, 256, rec, f32(2), d[3], zero, d[4])  # follows the side's kernel: 14x
        L.launch(_axpy_early, 2, 256, rec, f32(1), d[2], zero, d[5])    # main, beside: d5 = 6x
        rec.join()
        L.call(lambda stream: None, rec)                                  # a library call
        L.launch(_axpy_early, 2, 256, rec, f32(1), d[4], d[5], d[0])    # after it: d0 = 20x
        launches = [x for x in rec.launches if isinstance(x, L.Launch)]
        want = [False, True, False, False, True, True, False]
        assert [x.early for x in launches] == [w and early for w in want]
        StepRunner(rec.launches, cuda.default_stream(), use_graph=False).run()
        cuda.synchronize()
        np.testing.assert_array_equal(d[0].copy_to_host(), f32(2) * (f32(2) * x * f32(3) + x) + f32(3) * (f32(2) * x))
    assert not L.early_launch_requested({"DS4NB_EARLY_LAUNCH": "0"})
