"""The generation loop shared by every backend.

Prefill the rendered prompt, then sample / stream / decode until a stop
condition.  The engine is anything with ``prefill(tokens) -> logits`` and
``decode(token) -> logits`` (the oracle's ``CpuEngine`` or the CUDA engine);
text leaves through the tokenizer's streaming detokenizer, so a multi-byte
character split across tokens is never printed half-way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

import numpy as np

from ds4nb.chat import StopCondition
from ds4nb.sampling import SamplingParams, sample
from ds4nb.tokenizer import Tokenizer

StopReason = Literal["eos", "length", "interrupted"]


class LogitsEngine(Protocol):
    def prefill(self, tokens: Sequence[int]) -> np.ndarray: ...

    def decode(self, token: int) -> np.ndarray: ...


PrefillProgress = Callable[[int, int], None]
"""``on_prefill_progress(done, total)``: called with 0 before the prefill starts, then after each chunk."""

PREFILL_FIRST_CHUNK = 16     # tokens: small, to learn the rate quickly
PREFILL_MAX_CHUNK = 4096     # tokens
PREFILL_CHUNK_SECONDS = 0.25  # later chunks are sized to take about this long


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    prefill_seconds: float
    generated_tokens: int
    decode_steps: int           # decode steps (one per generated token but the last)
    decode_seconds: float       # time from the first token to the end
    first_token_seconds: float  # prefill + first sample
    stop: StopReason

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        if self.decode_steps == 0 or self.decode_seconds <= 0:
            return 0.0
        return self.decode_steps / self.decode_seconds

    def describe(self) -> str:
        """One line for the end of a run; a rate that was never measured is said so, not shown as 0."""
        prefill = f"prefill {self.prefill_tps:.1f} t/s" if self.prefill_seconds > 0 else "no prefill timing"
        if self.decode_steps and self.decode_seconds > 0:
            decode = f"decode {self.decode_tps:.2f} t/s"
        else:
            decode = "no decode step"
        return (f"prompt {self.prompt_tokens} tok, {prefill} | generated {self.generated_tokens} tok, {decode} | "
                f"first token {self.first_token_seconds:.2f} s | stop: {self.stop}")


def prefill(engine: LogitsEngine, tokens: Sequence[int], on_progress: PrefillProgress | None = None) -> np.ndarray:
    """``engine.prefill(tokens)``; with ``on_progress``, in chunks sized to report about every quarter second.

    Engines prefill incrementally, so the logits are those of one call.
    """
    if on_progress is None:
        return engine.prefill(tokens)
    step = max(1, int(getattr(engine, "chunk", 1)))   # whole engine chunks: the CUDA engine replays those
    total, done, chunk = len(tokens), 0, _round_up(PREFILL_FIRST_CHUNK, step)
    on_progress(0, total)
    while True:
        t0 = time.perf_counter()
        logits = engine.prefill(tokens[done:done + chunk])
        elapsed = time.perf_counter() - t0
        n = min(chunk, total - done)
        done += n
        on_progress(done, total)
        if done >= total:
            return logits
        rate = n / elapsed if elapsed > 0 else float(PREFILL_MAX_CHUNK)
        chunk = _round_up(max(PREFILL_FIRST_CHUNK, min(PREFILL_MAX_CHUNK, int(rate * PREFILL_CHUNK_SECONDS))), step)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def generate(engine: LogitsEngine, tokenizer: Tokenizer, prompt: Sequence[int], *, max_new_tokens: int,
             params: SamplingParams, stop: StopCondition, on_text: Callable[[str], None],
             rng: np.random.Generator,
             on_prefill_progress: PrefillProgress | None = None) -> tuple[list[int], GenerationStats]:
    """Generate up to ``max_new_tokens`` tokens after ``prompt``; returns (tokens, stats).

    Ctrl-C ends generation early with ``stop == "interrupted"`` and keeps what was produced.
    ``on_prefill_progress`` (see :data:`PrefillProgress`) follows a long prompt's prefill.
    """
    stream = tokenizer.stream()
    out: list[int] = []
    decodes = 0
    reason: StopReason = "length"
    t0 = time.perf_counter()
    t_first = t_prefill = t_end = t0
    # Engines that sample on the device (the CUDA engine) return only the token ids, chained: the next step is
    # on its way before a token reaches the host.
    decode_chain = getattr(engine, "decode_chain", None)
    chain = None
    try:
        logits = prefill(engine, prompt, on_prefill_progress)
        t_prefill = time.perf_counter()
        token = sample(logits, params, rng)
        for step in range(max_new_tokens):
            if step == 0:
                t_first = time.perf_counter()
            if stop.is_stop(token):
                reason = "eos"
                break
            out.append(token)
            if text := stream.push(token):
                on_text(text)
            if step + 1 == max_new_tokens:
                break
            if decode_chain is not None:
                if chain is None:
                    chain = decode_chain(token, params, rng, max_new_tokens - 1)
                token = next(chain)
            else:
                token = sample(engine.decode(token), params, rng)
            decodes += 1
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        if chain is not None:
            chain.close()
    t_end = time.perf_counter()
    if tail := stream.flush():
        on_text(tail)
    if t_first < t_prefill:  # interrupted before the first token
        t_first = t_end
    stats = GenerationStats(
        prompt_tokens=len(prompt),
        prefill_seconds=max(t_prefill - t0, 0.0),
        generated_tokens=len(out),
        decode_steps=decodes,
        decode_seconds=max(t_end - t_first, 0.0),
        first_token_seconds=max(t_first - t0, 0.0),
        stop=reason,
    )
    return out, stats
