"""``ds4nb bench``: throughput at context frontiers (docs/runtime.md, "Bench").

Like the reference engine's ds4-bench: after a warm-up (one prefill step and two decode steps, then a
fresh session, so kernels are compiled before anything is timed), one fixed token sequence is prefilled
incrementally to each frontier (``ctx_start``, ``+step_incr``, ... up to
``ctx_max``), timing only the newest prefill interval; then the session is
snapshotted, ``gen_tokens`` greedy tokens are generated (EOS excluded, so
every row does the same work), and the snapshot is restored before moving to
the next frontier.  Snapshot and restore are outside both timings.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Iterator, Sequence

import numpy as np

from ds4nb.errors import UsageError

#: Text repeated to build the default benchmark sequence (no --prompt-file).
FILLER = (
    "The engine reads a long document, one chapter after another, and keeps what matters: the names of the "
    "characters, the places they travel through, the promises they make and break. Every few pages the story "
    "returns to an old river town, where a ferryman counts the boats and writes their names in a ledger. "
)


@dataclass(frozen=True)
class BenchRow:
    ctx_tokens: int
    prefill_tokens: int
    prefill_tps: float
    gen_tokens: int
    gen_tps: float
    gen_tps_ss: float        # steady state: all decode steps but the first
    first_token_sec: float   # the first decode step after the prefill
    kvcache_bytes: int

    @classmethod
    def header(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def values(self) -> list[object]:
        return list(asdict(self).values())


@dataclass(frozen=True)
class Sweep:
    """The frontiers and generation length of one ``ds4nb bench`` run."""

    ctx_start: int
    ctx_max: int
    step_incr: int
    gen_tokens: int


GPU_SWEEP = Sweep(ctx_start=2048, ctx_max=32768, step_incr=2048, gen_tokens=128)  # the reference engine's
# The numpy reference prefills some 25 tokens/s on the default model: this sweep takes about 15 s.
CPU_SWEEP = Sweep(ctx_start=64, ctx_max=256, step_incr=64, gen_tokens=8)


def frontiers(ctx_start: int, ctx_max: int, step_incr: int) -> list[int]:
    if ctx_start <= 0 or step_incr <= 0:
        raise UsageError("--ctx-start and --step-incr must be positive")
    if ctx_start > ctx_max:
        raise UsageError(f"--ctx-start ({ctx_start}) must be <= --ctx-max ({ctx_max})")
    out = list(range(ctx_start, ctx_max + 1, step_incr))
    if out[-1] != ctx_max:
        out.append(ctx_max)
    return out


def check_sequence(tokens: Sequence[int], ctx_max: int) -> None:
    if len(tokens) < ctx_max:
        raise UsageError(f"the benchmark sequence has {len(tokens)} tokens, --ctx-max needs {ctx_max}")


def state_bytes(state) -> int:
    """Bytes of a session state (raw windows, compressed rows, compressor windows)."""
    return int(sum(a.nbytes for a in state.arrays().values()))


def _argmax_excluding(logits: np.ndarray, banned: int) -> int:
    saved = logits[banned]
    logits[banned] = -np.inf
    tok = int(np.argmax(logits))
    logits[banned] = saved
    return tok


def warm_up(engine, tokens: Sequence[int]) -> None:
    """One full prefill step and two decode steps, then a fresh session: the kernels they use are compiled
    (and their steps captured) before anything is timed, as the reference engine's bench is timed warm."""
    engine.reset()
    chunk = max(1, min(int(getattr(engine, "chunk", 1)), len(tokens) - 2))
    logits = engine.prefill(tokens[:chunk])
    for _ in range(2):
        logits = engine.decode(int(np.argmax(logits)))
    engine.reset()


def run_bench(engine, tokens: Sequence[int], *, ctx_start: int, ctx_max: int, step_incr: int, gen_tokens: int,
              eos_id: int) -> Iterator[BenchRow]:
    """Yield one :class:`BenchRow` per frontier (see the module docstring)."""
    check_sequence(tokens, ctx_max)
    warm_up(engine, tokens)
    done = 0
    for frontier in frontiers(ctx_start, ctx_max, step_incr):
        t0 = time.perf_counter()
        logits = engine.prefill(tokens[done:frontier])
        prefill_sec = time.perf_counter() - t0
        prefill_tokens = frontier - done
        done = frontier
        snap = engine.snapshot()
        steps = []
        for _ in range(gen_tokens):
            tok = _argmax_excluding(logits, eos_id)
            t0 = time.perf_counter()
            logits = engine.decode(tok)
            steps.append(time.perf_counter() - t0)
        engine.restore(snap)
        gen_sec = sum(steps)
        ss = sum(steps[1:])
        yield BenchRow(
            ctx_tokens=frontier,
            prefill_tokens=prefill_tokens,
            prefill_tps=prefill_tokens / prefill_sec if prefill_sec > 0 else 0.0,
            gen_tokens=gen_tokens,
            gen_tps=gen_tokens / gen_sec if gen_sec > 0 else 0.0,
            gen_tps_ss=(gen_tokens - 1) / ss if ss > 0 else 0.0,
            first_token_sec=steps[0] if steps else 0.0,
            kvcache_bytes=state_bytes(snap),
        )
