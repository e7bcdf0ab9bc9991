"""Which Q8_0 matmul strategy a device uses for each batch size, decided once per device and model shapes.

Strategies (ENGINE.md, "Dispatcher"): ``mmq`` (tiled int8 matmul for
batches), ``cublas`` (an FP16 copy of the weights through cuBLAS) and
``warp8`` (warp-per-row matvec on pre-quantized activations, and its
8-token batched twin).  A step of ``n`` tokens uses the choice of the largest
batch regime (:data:`REGIMES`) not above ``n``; a decode step (regime 1) is
the matvec, which only ``warp8`` implements.

How the choice is made (:func:`select_q8_dispatch`):

* ``DS4_CUDA_PREFILL_PATH=mmq|cublas|warp8`` forces a strategy for every
  batch regime; one that cannot run here downgrades along mmq -> cublas ->
  warp8 with one warning line.  Any other value but ``auto`` is a one-line
  :class:`UsageError` (commands check it at startup on every backend).
* ``auto`` (the default): the choices cached for this key (device, compute
  capability, driver, ds4nb version, the model's Q8_0 shapes), else every
  strategy that can run is timed on each regime by the caller's ``measure``
  and the fastest is taken and cached (JSON in the user cache dir, written
  atomically; a corrupt or stale entry is measured over).  Without a
  ``measure`` (no GPU timing: the simulator, ``ds4nb info``) the default
  order mmq > cublas > warp8 is taken and nothing is written.

The caller says which strategies can run and how to time one (the kernels
live in the registry, a layer above: ``ds4nb.engine.q8_timing``); this
module is pure logic.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ds4nb.dispatch.cachefile import load_entries, save_entries
from ds4nb.errors import UsageError, shown
from ds4nb.model.default import cache_dir as user_cache_dir

if TYPE_CHECKING:
    from ds4nb.dispatch.device import DeviceProbe

ENV_VAR = "DS4_CUDA_PREFILL_PATH"
#: The strategies, in the default order for batches (and the downgrade chain).
STRATEGIES = ("mmq", "cublas", "warp8")
DOWNGRADE = {"mmq": "cublas", "cublas": "warp8"}
#: Batch regimes (tokens per step): a step of n tokens takes the choice of the largest regime <= n.
REGIMES = (1, 8, 64, 512)
#: Strategies that can run a batch of one token (the decode matvec).
BATCH1_STRATEGIES = ("warp8",)
DISPATCH_CACHE_FILE = "q8-dispatch.json"

Source = Literal["measured", "cached", "env", "default"]
#: (strategy, regime, seconds for the model's Q8_0 matmuls of one layer, or None: not run)
Timing = tuple[str, int, float | None]


class StrategyDowngrade(UserWarning):
    """``DS4_CUDA_PREFILL_PATH`` asked for a strategy that cannot run here; a slower one is used."""


@dataclass(frozen=True)
class DispatchKey:
    """What a measured choice depends on; ``shapes``: (n_rows, k) of each Q8_0 matmul of one layer."""

    device: str
    cc: tuple[int, int]
    driver: str
    version: str
    shapes: tuple[tuple[int, int], ...]

    @classmethod
    def for_device(cls, probe: DeviceProbe, shapes: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> DispatchKey:
        """The key of the probed device, its driver and this ds4nb."""
        from ds4nb import __version__
        from ds4nb.dispatch.device import driver_version

        return cls(probe.name, (int(probe.cc[0]), int(probe.cc[1])), driver_version(probe), __version__,
                   tuple((int(n), int(k)) for n, k in shapes))

    def shapes_digest(self) -> str:
        text = ",".join(f"{n}x{k}" for n, k in self.shapes)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def text(self) -> str:
        """The key as the cache file spells it (stable across runs and processes)."""
        return (f"{self.device} | cc {self.cc[0]}.{self.cc[1]} | driver {self.driver} | ds4nb {self.version} "
                f"| q8_0 shapes {self.shapes_digest()}")

    def flops(self, n_tok: int) -> int:
        """Multiply-adds x 2 of one layer's Q8_0 matmuls for ``n_tok`` tokens."""
        return 2 * n_tok * sum(n * k for n, k in self.shapes)


@dataclass(frozen=True)
class Q8Dispatch:
    """The Q8_0 strategy per batch regime, why, and the timings it was chosen from (empty if none)."""

    choices: tuple[tuple[int, str], ...]
    reason: str
    timings: tuple[Timing, ...] = ()
    source: Source = "default"

    def __post_init__(self) -> None:
        regimes = [r for r, _ in self.choices]
        if not regimes or regimes[0] != 1 or regimes != sorted(set(regimes)):
            raise ValueError(f"Q8Dispatch: regimes must start at 1 and increase, got {regimes}")
        bad = [s for _, s in self.choices if s not in STRATEGIES]
        if bad:
            raise ValueError(f"Q8Dispatch: unknown strategies {bad}")

    def strategy_for(self, n_tok: int) -> str:
        """The strategy for a step of ``n_tok`` tokens: the choice of the largest regime <= ``n_tok``."""
        if n_tok < 1:
            raise ValueError(f"a step has at least one token, got {n_tok}")
        name = self.choices[0][1]
        for regime, strategy in self.choices:
            if regime > n_tok:
                break
            name = strategy
        return name

    def strategies(self) -> set[str]:
        """The strategies some regime uses."""
        return {s for _, s in self.choices}

    def seconds(self, strategy: str, regime: int) -> float | None:
        """The timing of ``strategy`` on ``regime`` (None: not run)."""
        for s, r, sec in self.timings:
            if s == strategy and r == regime:
                return sec
        return None

    def describe(self) -> str:
        """One line: ``q8_0 1:warp8 8:warp8 64:mmq 512:mmq (measured on NVIDIA H200)``."""
        return "q8_0 " + " ".join(f"{r}:{s}" for r, s in self.choices) + f" ({self.reason})"


def requested_strategy(env: Mapping[str, str] | None = None) -> str:
    """The strategy ``DS4_CUDA_PREFILL_PATH`` asks for (``auto`` when unset); a bad value is a :class:`UsageError`.

    Commands call this at startup on every backend, so a typo is reported at
    once rather than only when a GPU engine starts.
    """
    env = os.environ if env is None else env
    requested = env.get(ENV_VAR, "auto").strip().lower() or "auto"
    if requested not in (*STRATEGIES, "auto"):
        raise UsageError(f"{ENV_VAR}={shown(repr(requested))}: expected one of mmq, cublas, warp8, auto")
    return requested


def dispatch_cache_path(cache_dir: Path | None = None) -> Path:
    """The cache file of measured choices (in the user cache dir unless ``cache_dir`` is given)."""
    return (user_cache_dir() if cache_dir is None else Path(cache_dir)) / DISPATCH_CACHE_FILE


def select_q8_dispatch(available: Callable[[str], bool], measure: Callable[[str, int], float | None] | None,
                       key: DispatchKey, env: Mapping[str, str] | None = None, cache_dir: Path | None = None, *,
                       remeasure: bool = False) -> Q8Dispatch:
    """The Q8_0 strategy per regime for the device of ``key`` (see the module docstring).

    ``available(strategy)``: whether it can run here.  ``measure(strategy,
    regime)``: seconds of one layer's Q8_0 matmuls for ``regime`` tokens
    (None, or not a positive number: it cannot run that regime); ``None``:
    do not measure.  ``remeasure``: ignore a cached choice.
    """
    requested = requested_strategy(env)
    can_run = [s for s in STRATEGIES if available(s)]
    candidates = {r: [s for s in can_run if r > 1 or s in BATCH1_STRATEGIES] for r in REGIMES}
    if not candidates[1]:
        raise UsageError(f"no Q8_0 matmul strategy can run on {shown(key.device)}")
    if requested != "auto":
        return _forced(requested, can_run, key.device)

    path = dispatch_cache_path(cache_dir)
    entries = load_entries(path)
    if not remeasure:
        hit = _cached(entries.get(key.text()), can_run, candidates)
        if hit is not None:
            choices, timings = hit
            return Q8Dispatch(choices, f"cached ({path})", timings, "cached")
    if measure is None:
        choices = tuple((r, candidates[r][0]) for r in REGIMES)
        return Q8Dispatch(choices, "not measured (default order mmq > cublas > warp8)", (), "default")

    timings: list[Timing] = []
    for regime in REGIMES:
        for strategy in STRATEGIES:
            sec = _seconds(measure(strategy, regime)) if strategy in candidates[regime] else None
            timings.append((strategy, regime, sec))
    choices = tuple((r, _fastest(r, candidates[r], timings)) for r in REGIMES)
    entries[key.text()] = {
        "choices": {str(r): s for r, s in choices},
        "available": can_run,
        "timings": [list(t) for t in timings],
        "shapes": [list(s) for s in key.shapes],
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_entries(path, entries)
    return Q8Dispatch(choices, f"measured on {key.device}", tuple(timings), "measured")


def _forced(requested: str, can_run: list[str], device: str) -> Q8Dispatch:
    """``DS4_CUDA_PREFILL_PATH``'s strategy for every batch regime, downgraded with one warning if it cannot run."""
    name: str | None = requested
    skipped = []
    while name not in can_run:
        skipped.append(name)
        name = DOWNGRADE.get(name)
        if name is None:
            raise UsageError(f"{ENV_VAR}={requested}: no Q8_0 matmul strategy can run on {shown(device)}")
    reason = f"{ENV_VAR}={requested}"
    if skipped:
        what = " and ".join(skipped)
        reason += f": {what} unavailable: downgraded to {name}"
        warnings.warn(f"{ENV_VAR}={requested}: {what} cannot run on {shown(device)}; using {name}",
                      StrategyDowngrade, stacklevel=3)
    decode = next(s for s in can_run if s in BATCH1_STRATEGIES)   # the caller checked there is one
    return Q8Dispatch(tuple((r, decode if r == 1 else name) for r in REGIMES), reason, (), "env")


def _seconds(value: object) -> float | None:
    """A measurement as seconds, or None when it is not a positive finite number (the strategy did not run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def _fastest(regime: int, candidates: list[str], timings: list[Timing]) -> str:
    """The candidate with the least time on ``regime``; none timed: the first in the default order."""
    timed = [(sec, STRATEGIES.index(s), s) for s, r, sec in timings if r == regime and sec is not None
             and s in candidates]
    return min(timed)[2] if timed else candidates[0]


def _cached(entry: object, can_run: list[str],
            candidates: dict[int, list[str]]) -> tuple[tuple[tuple[int, str], ...], tuple[Timing, ...]] | None:
    """A cache entry's (choices, timings), or None if it is malformed or was measured with other strategies."""
    if not isinstance(entry, dict) or entry.get("available") != can_run:
        return None
    raw = entry.get("choices")
    if not isinstance(raw, dict):
        return None
    choices = []
    for regime in REGIMES:
        name = raw.get(str(regime))
        if name not in candidates[regime]:
            return None
        choices.append((regime, name))
    raw_timings = entry.get("timings")
    if not isinstance(raw_timings, list):
        return None
    timings: list[Timing] = []
    for t in raw_timings:
        if not (isinstance(t, list) and len(t) == 3 and t[0] in STRATEGIES and type(t[1]) is int
                and t[1] in REGIMES and (t[2] is None or _seconds(t[2]) is not None)):
            return None
        timings.append((t[0], t[1], None if t[2] is None else float(t[2])))
    return tuple(choices), tuple(timings)
