"""Sampling: reference defaults, filter order, distributions and seeded reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from ds4nb.errors import UsageError
from ds4nb.sampling import GREEDY, MAX_TOP_K, SamplingParams, argmax, candidates, probabilities, sample

# chi-square critical values at p = 0.001
CHI2_CRIT = {1: 10.83, 2: 13.82, 3: 16.27}


def logits_for(probs: list[float]) -> np.ndarray:
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


def support(logits: np.ndarray, **params: float) -> set[int]:
    return {int(i) for i in np.nonzero(probabilities(logits, SamplingParams(**params)))[0]}


def chi_square(counts: np.ndarray, expected_probs: np.ndarray) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def draw(logits: np.ndarray, params: SamplingParams, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.bincount([sample(logits, params, rng) for _ in range(n)], minlength=logits.shape[0])


def run(logits: np.ndarray, params: SamplingParams, seed: int, n: int = 100) -> list[int]:
    rng = np.random.default_rng(seed)
    return [sample(logits, params, rng) for _ in range(n)]


def test_reference_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (1.0, 0, 1.0, 0.05)
    assert not p.greedy and GREEDY.greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 1.5},
        {"top_p": -0.1},
        {"min_p": 1.1},
        {"top_k": -1},
    ],
)
def test_invalid_params_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        SamplingParams(**kwargs)


# -- greedy ------------------------------------------------------------------------


def test_temperature_zero_is_argmax_and_draws_nothing() -> None:
    logits = np.array([0.5, 3.0, -1.0, 3.0, float("nan")], dtype=np.float32)
    rng = np.random.default_rng(7)
    before = rng.bit_generator.state
    assert sample(logits, GREEDY, rng) == 1  # first of the tied maxima; NaN never wins
    assert rng.bit_generator.state == before
    assert argmax(np.array([float("-inf"), float("nan")])) == 0
    rand = np.random.default_rng(0).standard_normal(129280).astype(np.float32)
    assert sample(rand, GREEDY, rng) == int(np.argmax(rand))


# -- reproducibility -----------------------------------------------------------------


def test_same_seed_same_tokens_and_one_draw_per_call() -> None:
    logits = np.random.default_rng(1).standard_normal(5000).astype(np.float32)
    params = SamplingParams(temperature=0.8, min_p=0.0)
    first = [sample(logits, params, np.random.default_rng(42)) for _ in range(3)]
    assert len(set(first)) == 1
    assert run(logits, params, seed=42) == run(logits, params, seed=42)
    assert run(logits, params, seed=42) != run(logits, params, seed=43)
    rng, twin = np.random.default_rng(5), np.random.default_rng(5)
    sample(logits, params, rng)
    twin.random()
    assert rng.bit_generator.state == twin.bit_generator.state


# -- distributions -------------------------------------------------------------------


def test_plain_softmax_distribution() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    counts = draw(logits_for(probs.tolist()), SamplingParams(min_p=0.0), n=20000, seed=123)
    assert chi_square(counts, probs) < CHI2_CRIT[3]


def test_temperature_flattens_the_distribution() -> None:
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    tempered = np.sqrt(probs) / np.sqrt(probs).sum()  # temperature 2
    params = SamplingParams(temperature=2.0, min_p=0.0)
    np.testing.assert_allclose(probabilities(logits_for(probs.tolist()), params), tempered, rtol=1e-6)
    counts = draw(logits_for(probs.tolist()), params, n=20000, seed=321)
    assert chi_square(counts, tempered) < CHI2_CRIT[3]


def test_filtered_distribution_is_renormalised_over_the_kept_tokens() -> None:
    logits = logits_for([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(min_p=0.5, top_p=0.6)
    np.testing.assert_allclose(probabilities(logits, params), [0.625, 0.375, 0, 0], rtol=1e-6)
    counts = draw(logits, params, n=10000, seed=9)
    assert counts[2] == counts[3] == 0
    assert chi_square(counts[:2], np.array([0.625, 0.375])) < CHI2_CRIT[1]


# -- filter order ----------------------------------------------------------------------


def test_top_k_comes_before_top_p() -> None:
    # top-k=2 leaves [0.4, 0.3] -> renormalised 0.57 already reaches top_p=0.5.
    # (top-p on the full distribution first would keep both.)
    assert support(logits_for([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.5, min_p=0.0) == {0}


def test_temperature_comes_before_min_p() -> None:
    logits = logits_for([1.0, 0.2])
    assert support(logits, temperature=1.0, min_p=0.3) == {0}
    # at temperature 2 the ratio is sqrt(0.2) = 0.45 >= 0.3
    assert support(logits, temperature=2.0, min_p=0.3) == {0, 1}


def test_temperature_comes_before_top_p() -> None:
    logits = logits_for([0.6, 0.3, 0.1])
    assert support(logits, temperature=1.0, top_p=0.55, min_p=0.0) == {0}
    assert support(logits, temperature=3.0, top_p=0.55, min_p=0.0) == {0, 1}


def test_top_p_is_not_renormalised_after_min_p() -> None:
    # min-p 0.5 keeps [0.5, 0.3]; top-p measures 0.5 / 1.0 < 0.6, so 0.3 stays.
    # Renormalising after min-p would give 0.625 >= 0.6 and keep only token 0.
    assert support(logits_for([0.5, 0.3, 0.15, 0.05]), min_p=0.5, top_p=0.6) == {0, 1}


def test_min_p_is_relative_to_the_best_token() -> None:
    logits = logits_for([0.5, 0.3, 0.15, 0.05])
    assert support(logits, min_p=0.2) == {0, 1, 2}
    assert support(logits, min_p=0.05) == {0, 1, 2, 3}
    assert support(logits, min_p=1.0) == {0}


def test_top_p_keeps_the_token_that_crosses_the_threshold() -> None:
    logits = logits_for([0.5, 0.3, 0.2])
    assert support(logits, top_p=0.75, min_p=0.0) == {0, 1}
    assert support(logits, top_p=0.5, min_p=0.0) == {0}
    assert support(logits, top_p=0.0, min_p=0.0) == {0, 1, 2}  # 0 disables top-p, as in the reference


def test_top_k_ties_go_to_the_lowest_ids() -> None:
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.0], dtype=np.float32)
    assert support(logits, top_k=2, min_p=0.0) == {1, 2}
    ids, _ = candidates(logits, SamplingParams(top_k=4, min_p=0.0))
    assert ids.tolist() == [1, 2, 3, 0]


def test_top_k_is_capped() -> None:
    logits = np.linspace(0.0, 1.0, 3000, dtype=np.float32)
    ids, _ = candidates(logits, SamplingParams(temperature=100.0, top_k=5000, min_p=0.0))
    assert len(ids) == MAX_TOP_K
    assert set(ids.tolist()) == set(range(3000 - MAX_TOP_K, 3000))


def test_non_finite_logits_are_never_sampled() -> None:
    logits = np.array([float("-inf"), float("nan"), 1.0, float("inf"), 0.5], dtype=np.float32)
    assert support(logits, min_p=0.0) == {2, 4}
    counts = draw(logits, SamplingParams(min_p=0.0), n=500, seed=3)
    assert counts[[0, 1, 3]].sum() == 0
    assert sample(np.array([float("-inf"), float("nan")]), SamplingParams(), np.random.default_rng(0)) == 0


def test_full_vocabulary_draw_stays_in_support() -> None:
    logits = (np.random.default_rng(11).standard_normal(129280) * 4).astype(np.float32)
    params = SamplingParams()
    allowed = set(np.nonzero(probabilities(logits, params))[0].tolist())
    assert 1 < len(allowed) < 1000
    rng = np.random.default_rng(2)
    assert {sample(logits, params, rng) for _ in range(200)} <= allowed
    assert probabilities(logits, params).sum() == pytest.approx(1.0)
