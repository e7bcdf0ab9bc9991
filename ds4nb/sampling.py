"""Next-token sampling with the reference engine's defaults and filter order.

Temperature 0 is greedy (argmax; ties go to the lowest id, NaN never wins).
Otherwise the filters run in this order:

1. drop non-finite logits (-inf, +inf and NaN are never sampled);
2. top-k (``top_k > 0``, capped at 1024): keep the k largest logits, ties
   going to the lowest id;
3. temperature: weights ``w = exp((logit - max_logit) / temperature)``, and
   ``total`` = the sum of the top-k weights;
4. min-p: drop tokens whose probability is below ``min_p`` times the most
   likely token's (``w < min_p``, since the best token has ``w = 1``);
5. top-p: sorted by weight (ties: lowest id first), keep the shortest prefix
   whose weight reaches ``top_p * total``; ``total`` still counts the tokens
   min-p dropped, so top-p is *not* renormalised after min-p. ``top_p`` of 0
   or 1 disables it.

One token is then drawn in proportion to the kept weights with a single
uniform number from the caller's ``numpy.random.Generator``: every
non-greedy call consumes exactly one ``rng.random()``, greedy calls none, so a
seeded generator reproduces a run. (The draws are not the reference engine's
xorshift stream, so sampled tokens match it in distribution, not one by one.)

The filter math takes an array namespace ``xp`` (numpy by default; cupy
exposes the same calls) so a device path can reuse it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ds4nb.errors import UsageError

__all__ = [
    "DEFAULT_MIN_P",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_K",
    "DEFAULT_TOP_P",
    "GREEDY",
    "MAX_TOP_K",
    "SamplingParams",
    "argmax",
    "candidates",
    "probabilities",
    "sample",
]

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.05
#: The reference engine never keeps more than this many top-k candidates.
MAX_TOP_K = 1024


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults are the reference engine's.

    ``temperature`` 0 means greedy; ``top_k`` 0 means no top-k filter;
    ``top_p`` 0 or 1 means no top-p filter; ``min_p`` 0 means no min-p filter.
    """

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    min_p: float = DEFAULT_MIN_P

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UsageError(f"temperature must be a number >= 0, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise UsageError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise UsageError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def argmax(logits: Any, *, xp: ModuleType = np) -> int:
    """Index of the largest logit; NaN never wins and ties go to the lowest index."""
    x = xp.asarray(logits)
    return int(xp.argmax(xp.where(xp.isnan(x), -xp.inf, x)))


def _top_k_mask(values: Any, k: int, xp: ModuleType) -> Any:
    """Mask of the k largest values, ties at the cut going to the earliest positions."""
    n = values.shape[0]
    cut = xp.partition(values, n - k)[n - k]
    above = values > cut
    at_cut = xp.nonzero(values == cut)[0][: k - int(xp.count_nonzero(above))]
    mask = above.copy()
    mask[at_cut] = True
    return mask


def candidates(logits: Any, params: SamplingParams, *, xp: ModuleType = np) -> tuple[Any, Any]:
    """The token ids a non-greedy draw can return, most likely first, with their weights.

    Weights are relative (not normalised). Applies the filters in the order
    documented in this module. With no finite logit the only candidate is the
    argmax.
    """
    x = xp.asarray(logits, dtype=xp.float64)
    ids = xp.nonzero(xp.isfinite(x))[0]
    if ids.shape[0] == 0:
        return xp.asarray([argmax(x, xp=xp)]), xp.asarray([1.0])
    values = x[ids]
    k = min(params.top_k, MAX_TOP_K)
    if 0 < k < ids.shape[0]:
        keep = _top_k_mask(values, k, xp)
        ids, values = ids[keep], values[keep]
    weights = xp.exp((values - xp.max(values)) / params.temperature)
    total = xp.sum(weights)

    keep = weights >= params.min_p
    ids, weights = ids[keep], weights[keep]
    order = xp.argsort(-weights, kind="stable")
    ids, weights = ids[order], weights[order]

    if 0 < params.top_p < 1:
        reached = xp.cumsum(weights) >= params.top_p * total
        n_keep = int(xp.argmax(reached)) + 1 if bool(xp.any(reached)) else weights.shape[0]
        ids, weights = ids[:n_keep], weights[:n_keep]
    return ids, weights


def probabilities(logits: Any, params: SamplingParams, *, xp: ModuleType = np) -> Any:
    """The full-vocabulary distribution :func:`sample` draws from (one-hot when greedy)."""
    x = xp.asarray(logits)
    probs = xp.zeros(x.shape[0], dtype=xp.float64)
    if params.greedy:
        probs[argmax(x, xp=xp)] = 1.0
        return probs
    ids, weights = candidates(x, params, xp=xp)
    probs[ids] = weights / xp.sum(weights)
    return probs


def sample(logits: Any, params: SamplingParams, rng: np.random.Generator, *, xp: ModuleType = np) -> int:
    """Pick the next token id from a 1-D array of logits."""
    if params.greedy:
        return argmax(logits, xp=xp)
    ids, weights = candidates(logits, params, xp=xp)
    cumulative = xp.cumsum(weights)
    target = rng.random() * float(cumulative[-1])
    pick = min(int(xp.searchsorted(cumulative, target, side="left")), ids.shape[0] - 1)
    return int(ids[pick])
