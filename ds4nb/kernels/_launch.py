"""Host-side helpers shared by the kernel launchers (no device code here)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from numba import cuda


def flat(a: Any) -> Any:
    """A 1-D view of a contiguous device array (kernels index flat buffers)."""
    return a if a.ndim == 1 else a.reshape(a.size)


def device_array(shape: tuple[int, ...] | int, dtype: Any, stream: Any = 0) -> Any:
    return cuda.device_array(shape, dtype=np.dtype(dtype), stream=stream)


def to_device_flat(a: np.ndarray, stream: Any = 0) -> Any:
    return cuda.to_device(np.ascontiguousarray(a).reshape(-1), stream=stream)


_PLACEHOLDERS: dict[str, Any] = {}


def placeholder(dtype: Any = np.float32) -> Any:
    """A one-element device array passed where a kernel's optional input is absent (flagged off)."""
    key = np.dtype(dtype).str
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = cuda.to_device(np.zeros(1, dtype=dtype))
    return _PLACEHOLDERS[key]


@dataclass(frozen=True)
class Launch:
    """One prepared kernel launch: the kernel, its geometry and its arguments, fixed once.

    ``family`` names the op family it belongs to (``attention``, ``moe`` ...)
    for per-family timings; ``branch``: it runs on the step's side stream
    (:meth:`Recorder.branch`).  Calling it launches on ``stream`` (a numba
    stream, 0, or a ``cuda.core`` graph builder while capturing).
    """

    kernel: Any
    grid: Any
    block: Any
    args: tuple = field(repr=False)
    family: str = ""
    branch: bool = False

    def __call__(self, stream: Any = 0) -> None:
        self.kernel[self.grid, self.block, stream](*self.args)


@dataclass(frozen=True)
class LibraryCall:
    """A library routine in a step (a cuBLAS GEMM through CuPy), fixed once like a :class:`Launch`.

    ``fn(stream)`` enqueues it on ``stream`` (a numba stream, 0, or a
    ``cuda.core`` graph builder while capturing); ``kernel`` is ``fn`` so
    per-kernel timings name it.
    """

    fn: Callable[[Any], None] = field(repr=False)
    family: str = ""
    branch: bool = False

    @property
    def kernel(self) -> Any:
        return self.fn

    def __call__(self, stream: Any = 0) -> None:
        self.fn(stream)


@dataclass(frozen=True)
class Join:
    """In a step's launch list: the main stream waits here for the branch recorded before it."""

    family: str = ""


class Recorder:
    """A stand-in stream: launchers called with ``stream=recorder`` append their launches instead of running them.

    Every launcher sends its kernels through :func:`launch`, so the same
    launcher code runs a kernel now (tests, one-off calls) or prepares it
    once for a step plan that is replayed eagerly or captured as a graph.

    A step may run independent work concurrently: launches recorded inside
    :meth:`branch` go to a side stream that starts once every launch recorded
    before the branch is done, and the main stream's launches recorded after it
    do not wait for them until a :meth:`join`.  One branch at a time.
    """

    def __init__(self) -> None:
        self.launches: list[Launch | LibraryCall | Join] = []
        self.family = ""
        self.in_branch = False
        self.open_branch = False

    @contextlib.contextmanager
    def branch(self) -> Any:
        """Record the launches of the ``with`` body on the side stream (joined later by :meth:`join`)."""
        if self.open_branch:
            raise RuntimeError("a step records one branch at a time: join the previous one first")
        self.in_branch = self.open_branch = True
        try:
            yield
        finally:
            self.in_branch = False

    def join(self) -> None:
        """The main stream waits for the open branch (nothing to wait for: nothing recorded)."""
        if self.open_branch:
            self.launches.append(Join(self.family))
            self.open_branch = False


def launch(kernel: Any, grid: Any, block: Any, stream: Any, *args: Any) -> None:
    """``kernel[grid, block, stream](*args)``, or record it when ``stream`` is a :class:`Recorder`."""
    if isinstance(stream, Recorder):
        stream.launches.append(Launch(kernel, grid, block, args, stream.family, stream.in_branch))
    else:
        kernel[grid, block, stream](*args)


def call(fn: Callable[[Any], None], stream: Any) -> None:
    """``fn(stream)`` (a library routine enqueued on ``stream``), or record it when ``stream`` is a :class:`Recorder`."""
    if isinstance(stream, Recorder):
        stream.launches.append(LibraryCall(fn, stream.family, stream.in_branch))
    else:
        fn(stream)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = lo
    while p < n and p < hi:
        p *= 2
    return p


def kernel_factory(build: Callable[..., Any]) -> Callable[..., Any]:
    """Cache a function that builds kernels specialised for compile-time constants, and tag them.

    ``build(*args)`` returns a kernel (or device function) or a tuple of them,
    specialised for ``args`` (ints, enums: hashable and picklable); it runs once
    per distinct ``args``.  Each result's Python function is tagged with
    ``(module, factory name, args)``, so a tool can rebuild the same kernel in
    another process (tests/test_kernels_compile.py compiles every launched
    kernel for real GPUs from a simulator run).
    """
    @functools.cache
    def cached(*args: Any) -> Any:
        made = build(*args)
        for k in made if isinstance(made, tuple) else (made,):
            fn = getattr(k, "py_func", None) or getattr(k, "fn", None)  # GPU dispatcher / simulator kernel
            if fn is not None:
                fn.ds4nb_origin = (build.__module__, build.__name__, args)
        return made

    return functools.wraps(build)(cached)
