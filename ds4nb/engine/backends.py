"""Choosing and opening a backend: ``cpu`` (the numpy oracle) or ``cuda``."""

from __future__ import annotations

import os
from typing import Callable, Literal

from ds4nb.cache.options import PlacementOptions
from ds4nb.errors import Ds4Error
from ds4nb.model import Model

Backend = Literal["auto", "cuda", "cpu"]
BACKENDS: tuple[Backend, ...] = ("auto", "cuda", "cpu")


def cuda_available() -> bool:
    """A real CUDA GPU that numba-cuda can use (the simulator does not count)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba-cuda present but no driver / library
        return False


def resolve_backend(requested: Backend) -> Literal["cuda", "cpu"]:
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not cuda_available():
            raise Ds4Error("--backend cuda: no CUDA GPU is available (numba-cuda found no device); "
                           "use --backend cpu")
        return "cuda"
    if requested == "auto":
        return "cuda" if cuda_available() else "cpu"
    raise Ds4Error(f"unknown backend {requested!r}: expected one of {', '.join(BACKENDS)}")


def open_engine(model: Model, backend: Backend, *, ctx: int, placement: PlacementOptions | None = None,
                progress: Callable[[int, int], None] | None = None):
    """An engine for ``model`` on the resolved backend, and a one-line description of it.

    ``placement`` (where the weights go) applies to the ``cuda`` backend; the ``cpu`` one reads the file.
    ``progress(done, total)``: bytes of weights placed so far (the cuda backend's load).
    """
    kind = resolve_backend(backend)
    if kind == "cuda":
        from ds4nb.engine.session import CudaEngine

        engine = CudaEngine(model, ctx=ctx, placement=placement, progress=progress)
        return engine, engine.describe()
    from ds4nb.reference.engine import CpuEngine

    engine = CpuEngine(model)
    return engine, engine.describe()
