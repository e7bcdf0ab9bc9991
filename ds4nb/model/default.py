"""The embedded default model: the ``small`` synthetic preset, written once.

``ds4nb generate`` without ``-m`` runs it.  It is deterministic (fixed seed),
so every user and every run gets the same file; it is written atomically into
the user cache dir the first time it is needed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from ds4nb import __version__
from ds4nb.errors import Ds4Error

DEFAULT_PRESET = "small"
DEFAULT_SEED = 0


def cache_dir() -> Path:
    """``$DS4NB_CACHE_DIR``, else ``$XDG_CACHE_HOME/ds4nb``, else ``~/.cache/ds4nb``."""
    if env := os.environ.get("DS4NB_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ds4nb"


def default_model_path() -> Path:
    """Where the default model lives (one file per ds4nb version: the writer may change)."""
    return cache_dir() / f"ds4nb-{__version__}-{DEFAULT_PRESET}-seed{DEFAULT_SEED}.gguf"


def ensure_default_model(progress: Callable[[int, int], None] | None = None) -> Path:
    """Return the default model's path, writing it first if it is not there yet."""
    from ds4nb.model.synth import write_synthetic

    path = default_model_path()
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Ds4Error(f"cannot create the cache directory {path.parent}: {e.strerror}") from None
    write_synthetic(path, DEFAULT_PRESET, seed=DEFAULT_SEED, progress=progress)
    return path
