"""Captured decode steps (CUDA graphs) against eager launches and the numpy oracle, on a real GPU.

The same step launches run eagerly or replayed as a graph, so the two must
give bit-identical logits; both follow the numerics contract, so greedy tokens
equal the oracle's.  64 greedy steps per model cross the window wrap,
compressor emissions of both ratios and the indexer's first selection, with a
snapshot/restore in the middle and a replay in a fresh session restored from
that snapshot.  (CI runs the eager path in the simulator: tests/test_engine.py.)
"""

from __future__ import annotations

import numpy as np
import pytest

from ds4nb.engine.session import CudaEngine
from ds4nb.model import load_model
from ds4nb.reference.engine import CpuEngine

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("exact_prefill")]

STEPS = 64


def _prompt_len(cfg) -> int:
    """Tokens before decoding so that the STEPS decode steps cross the indexer's first selection."""
    ratio = next(cfg.compress_ratio(il) for il in range(cfg.n_layer) if cfg.layer_kind(il) == "csa")
    first_select = (cfg.indexer_top_k + 1) * ratio - 1      # rows > top_k from this position on
    return max(cfg.n_swa + 5, first_select - STEPS // 2)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_graph_equals_eager_equals_oracle(preset, tiny_gguf, small_gguf) -> None:
    model = load_model(tiny_gguf if preset == "tiny" else small_gguf)
    cfg = model.config
    n_prompt = _prompt_len(cfg)
    ctx = n_prompt + STEPS + 8
    prompt = np.random.default_rng().integers(0, cfg.n_vocab, n_prompt).tolist()
    graph, eager = CudaEngine(model, ctx=ctx, graphs=True), CudaEngine(model, ctx=ctx, graphs=False)
    cpu = CpuEngine(model)
    lg, le, lc = graph.prefill(prompt), eager.prefill(prompt), cpu.prefill(prompt)
    assert np.array_equal(lg, le), "prefill: graph and eager logits differ"
    tokens, errors, snap, after_snap = [], [], None, []
    for step in range(STEPS):
        errors.append(_rel(lg, lc))
        tok = int(np.argmax(lg))
        assert tok == int(np.argmax(lc)), f"step {step}: token {tok} != oracle {int(np.argmax(lc))}"
        tokens.append(tok)
        if step == STEPS // 2:                      # a snapshot/restore in the middle: nothing changes
            snap = graph.snapshot()
            assert snap.equals(eager.snapshot())
            graph.restore(snap)
            eager.restore(eager.snapshot())
        lg, le, lc = graph.decode(tok), eager.decode(tok), cpu.decode(tok)
        assert np.array_equal(lg, le), f"step {step}: graph and eager logits differ"
        if step >= STEPS // 2:
            after_snap.append(lg)
    assert graph.decode_mode == "cuda graph" and eager.decode_mode == "eager"
    assert graph.position == n_prompt + STEPS
    print(f"{preset}: {STEPS} steps from position {n_prompt}: tokens == oracle, graph == eager; "
          f"logits vs oracle max rel. error {max(errors):.2e}, bit-identical {sum(e == 0 for e in errors)}/{STEPS}")
    assert max(errors) < 1e-2
    # a fresh session restored from the snapshot replays the second half bit for bit
    fresh = CudaEngine(model, ctx=ctx, graphs=True)
    fresh.restore(snap)
    for tok, want in zip(tokens[STEPS // 2:], after_snap):
        assert np.array_equal(fresh.decode(tok), want)
    assert fresh.decode_mode == "cuda graph"


def test_device_sampling_graph_equals_eager(tiny_gguf) -> None:
    """Sampled decoding (sampling record in device memory): the graph draws the eager path's tokens."""
    from ds4nb.sampling import SamplingParams

    model = load_model(tiny_gguf)
    prompt = np.random.default_rng().integers(0, model.config.n_vocab, 12).tolist()
    seed = int(np.random.default_rng().integers(1 << 30))
    runs = []
    for graphs in (True, False):
        eng = CudaEngine(model, ctx=128, graphs=graphs)
        eng.prefill(prompt)
        rng = np.random.default_rng(seed)
        tok, out = prompt[-1], []
        for i in range(40):                          # greedy and sampled steps interleaved in one graph
            params = SamplingParams(temperature=0.0) if i % 3 == 0 else SamplingParams(temperature=0.9, top_k=20)
            tok = eng.decode_sample(tok, params, rng)
            out.append(tok)
        runs.append(out)
    assert runs[0] == runs[1]


def test_chained_decode_equals_step_by_step_graph(tiny_gguf) -> None:
    """``decode_chain`` with graphs (greedy, and top-k sampling with a seeded generator) gives the tokens of
    ``decode_sample`` fed each other's ids; a consumer that stops early leaves the last id decoded too."""
    from ds4nb.sampling import GREEDY, SamplingParams

    model = load_model(tiny_gguf)
    prompt = np.random.default_rng().integers(0, model.config.n_vocab, 12).tolist()
    seed = int(np.random.default_rng().integers(1 << 30))
    eng = CudaEngine(model, ctx=128, graphs=True)
    eng.prefill(prompt)
    state = eng.snapshot()
    for params in (GREEDY, SamplingParams(temperature=0.9, top_k=20)):
        eng.restore(state)
        chained = list(eng.decode_chain(prompt[-1], params, np.random.default_rng(seed), 40))
        after = eng.snapshot()
        eng.restore(state)
        rng, tok, stepped = np.random.default_rng(seed), prompt[-1], []
        for _ in range(40):
            tok = eng.decode_sample(tok, params, rng)
            stepped.append(tok)
        assert chained == stepped
        assert after.equals(eng.snapshot())
        eng.restore(state)
        chain = eng.decode_chain(prompt[-1], params, np.random.default_rng(seed), 40)
        first = [next(chain) for _ in range(5)]
        chain.close()
        assert first == stepped[:5] and eng.position == len(prompt) + 6
