"""The engine interface every ds4nb backend implements, and the numpy ``cpu`` backend.

An engine owns one session: a model plus a :class:`~ds4nb.reference.state.State`.

* ``prefill(tokens)`` runs tokens from the current position (a fresh engine,
  or one after ``reset()``, starts at 0) and returns the last token's logits;
* ``decode(token)`` is ``prefill([token])``;
* ``snapshot()`` / ``restore(state)`` (also the ``state`` property) copy the
  session out and back in; restoring reproduces later logits bit for bit;
* ``reset()`` forgets everything; ``position`` counts the tokens consumed.

Logits are float32 ``(n_vocab,)`` arrays the caller owns.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

from ds4nb.model.config import ModelConfig
from ds4nb.model.loader import Model, load_model
from ds4nb.reference.model import Reference
from ds4nb.reference.state import State


class Engine(ABC):
    """One DS4 inference session (see the module docstring)."""

    @property
    @abstractmethod
    def config(self) -> ModelConfig: ...

    @abstractmethod
    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """Consume ``tokens`` at positions ``position ...``; return the last one's logits."""

    def decode(self, token: int) -> np.ndarray:
        """Consume one token; return its logits."""
        return self.prefill([token])

    @property
    @abstractmethod
    def position(self) -> int: ...

    @abstractmethod
    def snapshot(self) -> State:
        """A deep copy of the session state."""

    @abstractmethod
    def restore(self, state: State) -> None:
        """Replace the session state by a copy of ``state``."""

    @abstractmethod
    def reset(self) -> None:
        """Start a new, empty session."""

    @property
    def state(self) -> State:
        return self.snapshot()

    @state.setter
    def state(self, state: State) -> None:
        self.restore(state)


class CpuEngine(Engine):
    """The numpy reference (``cpu`` backend): :class:`Reference` behind the engine interface.

    ``model`` is a loaded :class:`~ds4nb.model.loader.Model` or a GGUF path.
    ``expert_cache_bytes`` bounds the dequantised routed experts kept between
    tokens (0 dequantises every expert on every use).
    """

    name = "cpu"

    def __init__(self, model: Model | str | os.PathLike[str], *, expert_cache_bytes: int = 256 << 20):
        if not isinstance(model, Model):
            model = load_model(model)
        self.model = model
        self.reference = Reference(model, expert_cache_bytes=expert_cache_bytes)
        self._state = self.reference.new_state()

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        return self.reference.forward(list(tokens), self._state)

    @property
    def position(self) -> int:
        return self._state.position

    def snapshot(self) -> State:
        return self._state.copy()

    def restore(self, state: State) -> None:
        n_layer = self.config.n_layer
        if len(state.layers) != n_layer:
            raise ValueError(f"state has {len(state.layers)} layers, the model has {n_layer}")
        self._state = state.copy()

    def reset(self) -> None:
        self._state = self.reference.new_state()

    def describe(self) -> str:
        return "cpu backend (numpy reference)"
