"""The step input a captured step reads: step records against the oracle's own state, and the buffer layout."""

from __future__ import annotations

import numpy as np

from ds4nb.engine.step import StepInput, StepLayout
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
