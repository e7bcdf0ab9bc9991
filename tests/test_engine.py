"""The CUDA engine against the numpy oracle (simulator in CI; a real GPU when present).

Both follow docs/model.md's "one rounding per value" numerics, so they compute
the same float32 values whatever their summation orders, and greedy decoding
gives the same tokens.  Prompts cross the window wrap, the first compressed
rows of both ratios and the indexer's top-k selection.
"""

from __future__ import annotations

import numpy as np
import pytest

from ds4nb.engine.session import CudaEngine
from ds4nb.reference.engine import CpuEngine

# tiny preset: window 8, CSA ratio 4 (indexer top-k 4 -> selecting from the 5th row, pos >= 19),
# HCA ratio 16 (first row at pos 15)
PROMPT = 21


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.fixture(scope="module")
def engines(tiny_model, exact_prefill):
    return CudaEngine(tiny_model, ctx=64, chunk=4), CpuEngine(tiny_model)


@pytest.fixture(scope="module")
def prompt_state(tiny_model, engines):
    """A fresh random prompt crossing every boundary, prefilled by the oracle."""
    _, cpu = engines
    rng = np.random.default_rng()
    tokens = rng.integers(0, tiny_model.config.n_vocab, PROMPT + 3).tolist()
    cpu.reset()
    cpu.prefill(tokens[:PROMPT])
    return tokens, cpu.snapshot()


def test_prompt_crosses_every_boundary(tiny_model, prompt_state) -> None:
    cfg = tiny_model.config
    _, state = prompt_state
    assert state.position > cfg.n_swa                                    # the window has wrapped
    kinds = {cfg.layer_kind(il): ls for il, ls in enumerate(state.layers)}
    assert kinds["hca"].comp.n >= 1                                        # a ratio-16 row exists
    assert kinds["csa"].comp.n > cfg.indexer_top_k                         # the indexer selects


# 12 steps from position 21 cross CSA emissions (23, 27, 31) and an HCA one (31) in the simulator;
# tests/test_engine_graph.py runs 64 on a GPU
GENERATED = 12


def greedy_side_by_side(gpu: CudaEngine, cpu: CpuEngine, prompt: list[int], n: int) -> tuple[list, list, list]:
    """Prefill ``prompt`` on each engine, then ``n`` greedy tokens each: (gpu tokens, oracle tokens, rel. errors)."""
    gpu.reset()
    cpu.reset()
    lg, lc = gpu.prefill(prompt), cpu.prefill(prompt)
    got, want, errors = [], [], []
    for _ in range(n):
        errors.append(rel(lg, lc))
        got.append(int(np.argmax(lg)))
        want.append(int(np.argmax(lc)))
        lg, lc = gpu.decode(got[-1]), cpu.decode(want[-1])
    print(f"logits rel. error: max {max(errors):.2e}, bit-identical steps {sum(e == 0 for e in errors)}/{n}")
    return got, want, errors


def test_greedy_generation_matches_the_oracle(tiny_model, engines) -> None:
    """A fresh random prompt crossing every boundary, then greedy tokens: the same tokens, close logits."""
    gpu, cpu = engines
    prompt = np.random.default_rng().integers(0, tiny_model.config.n_vocab, PROMPT).tolist()
    got, want, errors = greedy_side_by_side(gpu, cpu, prompt, GENERATED)
    assert got == want, f"prompt {prompt}"
    assert max(errors) < 1e-2


@pytest.mark.gpu
def test_greedy_generation_matches_the_oracle_small(small_gguf, exact_prefill) -> None:
    """`small` (real window 128, ratios 4 / 128, top-k 512): 2100 prompt tokens reach the indexer's selection."""
    from ds4nb.model import load_model

    model = load_model(small_gguf)
    cfg = model.config
    n_prompt = (cfg.indexer_top_k + 13) * 4
    prompt = np.random.default_rng().integers(0, cfg.n_vocab, n_prompt).tolist()
    got, want, errors = greedy_side_by_side(CudaEngine(model, ctx=4096, chunk=64), CpuEngine(model), prompt,
                                            GENERATED)
    assert got == want
    assert max(errors) < 1e-2


def test_decode_matches_oracle_from_the_same_state(engines, prompt_state) -> None:
    gpu, cpu = engines
    tokens, state = prompt_state
    gpu.restore(state)
    cpu.restore(state)
    for tok in tokens[PROMPT:PROMPT + 2]:
        lg, lc = gpu.decode(tok), cpu.decode(tok)
        assert np.isfinite(lg).all()
        assert rel(lg, lc) < 1e-2
    assert gpu.position == cpu.position == PROMPT + 2


def test_chunked_prefill_matches_oracle(engines, prompt_state) -> None:
    """A prefill step of several tokens (T > 1: batched projections, experts, compressors, causal attention)."""
    gpu, cpu = engines
    tokens, state = prompt_state
    gpu.restore(state)
    cpu.restore(state)
    lg, lc = gpu.prefill(tokens[PROMPT:PROMPT + 3]), cpu.prefill(tokens[PROMPT:PROMPT + 3])
    assert rel(lg, lc) < 1e-2


def test_snapshot_restore_is_exact(tiny_model, engines, prompt_state) -> None:
    gpu, _ = engines
    tokens, state = prompt_state
    gpu.restore(state)
    back = gpu.snapshot()
    assert back.equals(state)                 # host -> device -> host is lossless
    a = gpu.decode(tokens[PROMPT])
    gpu.restore(back)
    b = gpu.decode(tokens[PROMPT])
    assert np.array_equal(a, b)


def test_greedy_sampling_on_the_device(engines, prompt_state) -> None:
    from ds4nb.sampling import GREEDY

    gpu, _ = engines
    tokens, state = prompt_state
    gpu.restore(state)
    logits = gpu.decode(tokens[PROMPT])
    gpu.restore(state)
    tok = gpu.decode_sample(tokens[PROMPT], GREEDY, np.random.default_rng())
    assert tok == int(np.argmax(logits))


def test_chained_decode_equals_step_by_step(engines, prompt_state) -> None:
    """``decode_chain`` (each step's id left on the device by the previous step's sampler) gives the tokens and
    the state of ``decode_sample`` calls fed each other's ids, with the same draws."""
    from ds4nb.sampling import SamplingParams

    gpu, _ = engines
    tokens, state = prompt_state
    params = SamplingParams(temperature=0.9, top_k=5)
    seed = int(np.random.default_rng().integers(1 << 30))
    gpu.restore(state)
    chained = list(gpu.decode_chain(tokens[PROMPT], params, np.random.default_rng(seed), 3))
    after_chain = gpu.snapshot()
    gpu.restore(state)
    rng, tok, stepped = np.random.default_rng(seed), tokens[PROMPT], []
    for _ in range(3):
        tok = gpu.decode_sample(tok, params, rng)
        stepped.append(tok)
    assert chained == stepped
    assert after_chain.equals(gpu.snapshot())


def test_context_overflow_is_a_clear_error(tiny_model) -> None:
    from ds4nb.errors import Ds4Error

    gpu = CudaEngine(tiny_model, ctx=2, chunk=2)
    with pytest.raises(Ds4Error, match="context is full"):
        gpu.prefill([1, 2, 3])
