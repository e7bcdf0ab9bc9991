"""Which Q8_0 matmul strategy a device uses, decided once at startup.

Strategies (ENGINE.md, "Dispatcher"): ``mmq`` (tiled int8 matmul for
batches), ``cublas`` (an FP16 copy of the weights through CuPy's GEMM) and
``warp8`` (warp-per-row matvec on pre-quantized activations).  The caller
says which strategies can run here (the kernels that implement them live in
the registry, a layer above); ``DS4_CUDA_PREFILL_PATH=mmq|cublas|warp8|auto``
forces one, and an unavailable choice downgrades along mmq -> cublas -> warp8
with a warning.  ``auto`` takes the first available in that order.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Mapping

from ds4nb.errors import UsageError, shown

ENV_VAR = "DS4_CUDA_PREFILL_PATH"
STRATEGIES = ("mmq", "cublas", "warp8")
DOWNGRADE = {"mmq": "cublas", "cublas": "warp8"}


@dataclass(frozen=True)
class StrategyChoice:
    name: str
    reason: str

    def describe(self) -> str:
        return f"q8_0 {self.name} ({self.reason})"


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


def select_q8_strategy(available: Callable[[str], bool], device_name: str,
                       env: Mapping[str, str] | None = None) -> StrategyChoice:
    """The strategy for a device on which ``available(name)`` says what can run."""
    requested = requested_strategy(env)
    if requested == "auto":
        for name in STRATEGIES:
            if available(name):
                return StrategyChoice(name, f"auto on {device_name}")
        raise UsageError(f"no Q8_0 matmul strategy can run on {device_name}")
    name = requested
    while not available(name):
        nxt = DOWNGRADE.get(name)
        if nxt is None:
            raise UsageError(f"{ENV_VAR}={requested}: no Q8_0 matmul strategy can run on {device_name}")
        warnings.warn(f"{ENV_VAR}: strategy {name!r} is not available on {device_name}; using {nxt!r}",
                      stacklevel=2)
        name = nxt
    reason = f"{ENV_VAR}={requested}" + ("" if name == requested else f", {requested} unavailable")
    return StrategyChoice(name, reason)
