"""The numpy oracle's forward pass on the `tiny` preset (docs/model.md).

tiny: 4 layers with compress ratios [0, 0, 4, 16] (two window-only layers,
one CSA, one HCA), sliding window 8, indexer top-k 4, one hash layer.  Token
counts below are chosen to cross every boundary of that shape:

* 8 / 9: the window fills and starts to slide;
* 4 / 5: the first CSA row (and indexer row) exists after token 4;
* 16 / 17: the first HCA row after token 16;
* 20 / 21: the fifth CSA row makes the indexer choose 4 of 5 rows.

Every test draws fresh random tokens; the seed is in the failure message.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ds4nb.model import load_model
from ds4nb.reference import CpuEngine, State
from ds4nb.reference import ops

BOUNDARIES = [1, 3, 4, 5, 7, 8, 9, 15, 16, 17, 19, 20, 21, 31, 32]


@pytest.fixture
def seed() -> int:
    return int(np.random.SeedSequence().entropy % 2**32)


@pytest.fixture(scope="module")
def engine(tiny_model) -> CpuEngine:
    return CpuEngine(tiny_model)


def random_tokens(seed: int, n: int, n_vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, n_vocab, n).tolist()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


def test_tiny_has_every_layer_kind(tiny_model) -> None:
    cfg = tiny_model.config
    kinds = [cfg.layer_kind(il) for il in range(cfg.n_layer)]
    assert set(kinds) == {"swa", "csa", "hca"}
    assert cfg.n_hash_layer >= 1 and cfg.n_swa < 32 and cfg.indexer_top_k < 32 // 4
    assert max(cfg.compress_ratios) <= 16


@pytest.mark.parametrize("n", BOUNDARIES)
def test_prefill_then_decode_equals_longer_prefill(engine: CpuEngine, seed: int, n: int) -> None:
    """docs/model.md "Prefill and decode": prefill(N) + decode(t) == prefill(N + 1)."""
    toks = random_tokens(seed, n + 1, engine.config.n_vocab)
    engine.reset()
    engine.prefill(toks[:n])
    assert engine.position == n
    stepped = engine.decode(toks[n])
    engine.reset()
    whole = engine.prefill(toks)
    assert engine.position == n + 1
    assert stepped.shape == (engine.config.n_vocab,) and stepped.dtype == np.float32
    assert np.isfinite(whole).all()
    assert rel_err(stepped, whole) < 1e-5, f"seed {seed}"


def test_prefill_state_equals_decode_state(engine: CpuEngine, seed: int) -> None:
    """A prefill leaves bit-identical state and logits to token-by-token decode (all boundaries)."""
    toks = random_tokens(seed, 34, engine.config.n_vocab)
    engine.reset()
    whole = engine.prefill(toks)
    s_prefill = engine.snapshot()
    engine.reset()
    for t in toks[:-1]:
        engine.decode(t)
    last = engine.decode(toks[-1])
    assert engine.snapshot().equals(s_prefill), f"seed {seed}"
    assert np.array_equal(last, whole), f"seed {seed}"
    # chunked prefill at a nonzero position is the same computation as well
    engine.reset()
    engine.prefill(toks[:13])
    assert np.array_equal(engine.prefill(toks[13:]), whole), f"seed {seed}"


def test_every_layer_kind_is_exercised(engine: CpuEngine, seed: int, monkeypatch) -> None:
    """After 24 tokens: the window slid, both compressors emitted rows, the indexer chose rows."""
    ref = engine.reference
    cfg = engine.config
    chosen: list[tuple[int, int, int]] = []
    real_visible = ref.indexer_visible

    def spy(il, lw, ls, x_norm, qr_norm, pos):
        mask = real_visible(il, lw, ls, x_norm, qr_norm, pos)
        if mask is not None:
            chosen.append((il, len(mask), int(mask.sum())))
        return mask

    monkeypatch.setattr(ref, "indexer_visible", spy)
    engine.reset()
    n = 24
    engine.prefill(random_tokens(seed, n, cfg.n_vocab))
    state = engine.snapshot()
    seen = set()
    for il, ls in enumerate(state.layers):
        kind = cfg.layer_kind(il)
        seen.add(kind)
        assert ls.raw.shape == (cfg.n_swa, cfg.head_dim)
        if kind == "swa":
            assert ls.comp is None and ls.attn_compressor is None and ls.index_comp is None
            continue
        ratio = cfg.compress_ratio(il)
        assert ls.comp.n == n // ratio >= 1
        assert ls.attn_compressor.kv.shape == ((2 if kind == "csa" else 1) * ratio, cfg.compressor_width(il))
        if kind == "csa":
            assert ls.index_comp.n == n // ratio
            assert ls.index_compressor.kv.shape == (2 * ratio, 2 * cfg.indexer_head_dim)
        else:
            assert ls.index_comp is None
    assert seen == {"swa", "csa", "hca"}
    csa = [il for il in range(cfg.n_layer) if cfg.layer_kind(il) == "csa"]
    # the indexer picks top_k rows once there are more than top_k rows: row top_k
    # (0-based) is emitted at position (top_k + 1) * ratio - 1
    first_active = (cfg.indexer_top_k + 1) * cfg.compress_ratio(csa[0]) - 1
    assert first_active < n
    active = [c for c in chosen if c[0] in csa]
    assert len(active) == len(csa) * (n - first_active)
    assert all(n_rows > cfg.indexer_top_k and n_vis == cfg.indexer_top_k for _, n_rows, n_vis in active)


def test_indexer_masks_rows_in_attention(engine: CpuEngine, seed: int, monkeypatch) -> None:
    """Masked compressed rows really leave the attention (step 10 feeds step 11)."""
    cfg = engine.config
    toks = random_tokens(seed, 22, cfg.n_vocab)
    engine.reset()
    base = engine.prefill(toks)
    ref = engine.reference
    monkeypatch.setattr(ref, "indexer_visible", lambda *a: None)  # every row visible
    engine.reset()
    all_visible = engine.prefill(toks)
    assert not np.array_equal(base, all_visible), f"seed {seed}"


def test_save_restore_is_bit_exact(engine: CpuEngine, seed: int, tiny_model) -> None:
    """docs/model.md "Session state": a snapshot (copy or bytes) reproduces later logits bit for bit."""
    cfg = engine.config
    toks = random_tokens(seed, 30, cfg.n_vocab)
    engine.reset()
    engine.prefill(toks[:19])
    snap = engine.snapshot()
    blob = snap.to_bytes()
    first = [engine.decode(t) for t in toks[19:]]
    assert engine.position == 30
    engine.restore(snap)
    assert engine.position == 19
    again = [engine.decode(t) for t in toks[19:]]
    other = CpuEngine(tiny_model)
    other.state = State.from_bytes(blob)
    third = [other.decode(t) for t in toks[19:]]
    for a, b, c in zip(first, again, third):
        assert np.array_equal(a, b) and np.array_equal(a, c), f"seed {seed}"
    # the snapshot is a deep copy: decoding after restore did not change it
    assert State.from_bytes(blob).equals(snap)


def test_state_file_round_trip(tmp_path: Path, engine: CpuEngine, seed: int) -> None:
    engine.reset()
    engine.prefill(random_tokens(seed, 18, engine.config.n_vocab))
    snap = engine.snapshot()
    snap.save(tmp_path / "s.npz")
    assert State.load(tmp_path / "s.npz").equals(snap)
    empty = engine.reference.new_state()
    assert not empty.equals(snap) and empty.position == 0


def test_reset_forgets_the_session(engine: CpuEngine, seed: int) -> None:
    toks = random_tokens(seed, 10, engine.config.n_vocab)
    engine.reset()
    a = engine.prefill(toks)
    engine.prefill(toks)
    engine.reset()
    assert engine.position == 0
    assert np.array_equal(engine.prefill(toks), a)


def test_hash_layers_pick_the_table_experts(engine: CpuEngine, seed: int, monkeypatch) -> None:
    """docs/model.md step 16b: hash layers route by tid2eid[token]; others by biased top-k."""
    ref = engine.reference
    cfg = engine.config
    calls: list[tuple[int, int, list[int], np.ndarray, np.ndarray]] = []
    real_route = ref.route

    def spy(il, lw, x_norm, token):
        sel, w = real_route(il, lw, x_norm, token)
        probs = ops.router_probs(ref.t.dense(lw.ffn_gate_inp).matvec(x_norm))
        calls.append((il, token, sel.tolist(), w, probs))
        return sel, w

    monkeypatch.setattr(ref, "route", spy)
    toks = random_tokens(seed, 12, cfg.n_vocab)
    engine.reset()
    engine.prefill(toks)
    assert len(calls) == cfg.n_layer * len(toks)
    for il, token, sel, w, probs in calls:
        lw = ref.w.layers[il]
        if cfg.is_hash_layer(il):
            table = ref.t.vector(lw.ffn_gate_tid2eid)
            assert sel == table[token].tolist(), f"seed {seed}"
        else:
            bias = 0.0 if lw.ffn_exp_probs_b is None else ref.t.vector(lw.ffn_exp_probs_b).astype(np.float64)
            score = probs.astype(np.float64) + bias
            assert sorted(sel) == sorted(np.argsort(-score, kind="stable")[:cfg.n_expert_used].tolist())
        np.testing.assert_allclose(w, probs[sel] / probs[sel].sum() * cfg.expert_weights_scale, rtol=1e-6)
    assert {il for il, *_ in calls if cfg.is_hash_layer(il)} == set(range(cfg.n_hash_layer))


def test_hash_routing_changes_with_the_table(tiny_gguf: Path, tmp_path: Path, seed: int) -> None:
    """Rewriting a token's tid2eid row changes the experts that token uses, and its logits."""
    data = bytearray(tiny_gguf.read_bytes())
    model = load_model(tiny_gguf)
    table = model.weights.layers[0].ffn_gate_tid2eid
    tok = int(np.random.default_rng(seed).integers(0, model.config.n_vocab))
    row = np.frombuffer(bytes(table.data), np.int32).reshape(table.shape)[tok].copy()
    new_row = (row + 1) % model.config.n_expert
    off = table.offset + tok * table.shape[1] * 4
    data[off:off + new_row.nbytes] = new_row.astype(np.int32).tobytes()
    patched = tmp_path / "patched.gguf"
    patched.write_bytes(bytes(data))
    a = CpuEngine(model)
    b = CpuEngine(patched)
    x = np.random.default_rng(seed).standard_normal(model.config.n_embd).astype(np.float32)
    lw_a, lw_b = a.reference.w.layers[0], b.reference.w.layers[0]
    assert a.reference.route(0, lw_a, x, tok)[0].tolist() == row.tolist()
    assert b.reference.route(0, lw_b, x, tok)[0].tolist() == new_row.tolist()
    assert not np.array_equal(a.prefill([tok]), b.prefill([tok]))


def test_logits_are_deterministic_across_engines(tiny_model, engine: CpuEngine, seed: int) -> None:
    toks = random_tokens(seed, 9, engine.config.n_vocab)
    engine.reset()
    other = CpuEngine(tiny_model, expert_cache_bytes=0)
    assert np.array_equal(engine.prefill(toks), other.prefill(toks))


def test_bad_inputs(engine: CpuEngine, tiny_model) -> None:
    engine.reset()
    with pytest.raises(ValueError):
        engine.prefill([])
    with pytest.raises(ValueError):
        engine.decode(engine.config.n_vocab)
    with pytest.raises(ValueError):
        engine.decode(-1)
    assert engine.position == 0
    bad = State(0, engine.snapshot().layers[:1])
    with pytest.raises(ValueError):
        engine.restore(bad)


@pytest.mark.slow
def test_small_decodes_at_5_tokens_per_second(small_gguf: Path) -> None:
    """Performance sanity: the `small` preset decodes >= 5 tokens/s on one core.

    Measured in CPU time of a single-threaded process, so a busy machine does
    not make it flaky.
    """
    code = (
        "import sys, time, numpy as np\n"
        "from ds4nb.reference import CpuEngine\n"
        "e = CpuEngine(sys.argv[1])\n"
        "toks = np.random.default_rng(0).integers(0, e.config.n_vocab, 40).tolist()\n"
        "e.prefill(toks[:8]); e.decode(toks[8])\n"
        "t = time.process_time()\n"
        "for tok in toks[9:]: e.decode(tok)\n"
        "print(31 / (time.process_time() - t))\n"
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code, str(small_gguf)], env=env, capture_output=True,
                         text=True, check=True)
    assert float(out.stdout.strip()) >= 5.0
