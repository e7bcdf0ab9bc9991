"""Host-side helpers shared by the kernel launchers (no device code here)."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from numba import config, cuda


def flat(a: Any) -> Any:
    """A 1-D view of a contiguous device array (kernels index flat buffers)."""
    return a if a.ndim == 1 else a.reshape(a.size)


def device_array(shape: tuple[int, ...] | int, dtype: Any, stream: Any = 0) -> Any:
    return cuda.device_array(shape, dtype=np.dtype(dtype), stream=stream)


def to_device_flat(a: np.ndarray, stream: Any = 0) -> Any:
    return cuda.to_device(np.ascontiguousarray(a).reshape(-1), stream=stream)


def aligned(a: Any, nbytes: int) -> bool:
    """Whether the first element of ``a`` (a device array, or host memory standing in for one) sits at a
    multiple of ``nbytes``: what a kernel's wide (vector) loads of it need."""
    ptr = getattr(a, "device_ctypes_pointer", None)
    addr = ptr.value if ptr is not None else getattr(getattr(a, "ctypes", None), "data", None)
    return addr is not None and addr % nbytes == 0


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
    for per-family timings; ``lane``: the stream of the step it runs on
    (``""`` the main stream, else a branch's, :meth:`Recorder.branch`);
    ``early``: launched early (:func:`launch_early`).  Calling it launches on
    ``stream`` (a numba stream, 0, or a ``cuda.core`` graph builder while
    capturing).
    """

    kernel: Any
    grid: Any
    block: Any
    args: tuple = field(repr=False)
    family: str = ""
    lane: str = ""
    early: bool = False

    def __call__(self, stream: Any = 0) -> None:
        if self.early and not config.ENABLE_CUDASIM:
            launch_early(self.kernel, self.grid, self.block, stream, self.args)
        else:
            self.kernel[self.grid, self.block, stream](*self.args)


def launch_early(kernel: Any, grid: Any, block: Any, stream: Any, args: tuple) -> None:
    """Launch ``kernel`` with programmatic stream serialization (sm_90+'s programmatic dependent launch).

    Its blocks may start before the previous kernel on the stream has
    finished (as soon as that kernel's blocks have all passed their own
    ``wait_prior_grid`` or exited); each waits in ``wait_prior_grid``
    before it touches memory a grid of the step writes, so the results are
    those of an ordinary launch, only the launch latency between the two
    kernels is hidden.  The kernel must call ``wait_prior_grid`` first, after
    at most index arithmetic and ``early_*`` weight reads (``q8_0.matvec``
    streams its first weight words while the previous kernel runs; a test
    holds every kernel to this).  numba launches through
    ``cuda.core`` without this option, so this compiles (once) through the
    dispatcher and launches the compiled kernel with the option set.
    """
    from cuda.core import LaunchConfig
    from cuda.core import launch as core_launch
    from numba.cuda.cudadrv.driver import _to_core_stream

    compiled = _compiled(kernel, args)
    kernelargs: list = []
    writeback: list = []
    for ty, val in zip(compiled.argument_types, args):
        compiled._prepare_args(ty, val, stream, writeback, kernelargs)
    early = LaunchConfig(grid=grid, block=block, shmem_size=0, programmatic_stream_serialization=True)
    core_launch(_to_core_stream(stream), early, compiled._codelibrary.get_cufunc().kernel, *kernelargs)


EARLY_ENV_VAR = "DS4NB_EARLY_LAUNCH"


def early_launch_requested(env: dict | None = None) -> bool:
    """Whether recorded steps launch early where they may (``DS4NB_EARLY_LAUNCH=0`` turns it off): on a GPU
    of sm_90+ (older ones have no programmatic dependent launch) with a numba-cuda and ``cuda.core`` that
    :func:`launch_early` can drive; never in the simulator."""
    env = os.environ if env is None else env
    if env.get(EARLY_ENV_VAR, "1").strip().lower() in ("0", "false", "no", "off") or config.ENABLE_CUDASIM:
        return False
    try:
        return tuple(cuda.get_current_device().compute_capability) >= (9, 0) and _early_launch_supported()
    except Exception:           # no usable GPU (a compile-only check): nothing launches anyway
        return False


@functools.cache
def _early_launch_supported() -> bool:
    """Whether the installed numba-cuda and ``cuda.core`` have what :func:`launch_early` uses (it reaches into
    numba's compiled kernels; another version may lack them: then every launch is ordinary, still correct)."""
    try:
        from cuda.core import LaunchConfig
        from numba.cuda.dispatcher import CUDADispatcher, _Kernel

        LaunchConfig(grid=1, block=1, programmatic_stream_serialization=True)
        return all(hasattr(_Kernel, a) for a in ("_prepare_args", "argument_types")) and all(
            hasattr(CUDADispatcher, a) for a in ("typeof_pyval", "compile", "specialized"))
    except Exception:
        return False


def waits_for_prior_grid(kernel: Any) -> bool:
    """Whether a kernel may be launched early: its code calls ``intrinsics.wait_prior_grid`` (by the
    convention of that function, as its first statement)."""
    fn = getattr(kernel, "py_func", None) or getattr(kernel, "fn", None) or kernel
    code = getattr(fn, "__code__", None)
    return code is not None and "wait_prior_grid" in code.co_names


def _compiled(kernel: Any, args: tuple) -> Any:
    """The dispatcher's compiled kernel for these arguments (compiling it if it is not yet)."""
    if kernel.specialized:
        return next(iter(kernel.overloads.values()))
    types = tuple(kernel.typeof_pyval(a) for a in args)
    compiled = kernel.overloads.get(types)
    return compiled if compiled is not None else kernel.compile(types)


@dataclass(frozen=True)
class LibraryCall:
    """A library routine in a step (a cuBLAS GEMM through CuPy), fixed once like a :class:`Launch`.

    ``fn(stream)`` enqueues it on ``stream`` (a numba stream, 0, or a
    ``cuda.core`` graph builder while capturing); ``kernel`` is ``fn`` so
    per-kernel timings name it.  Never launched early.
    """

    fn: Callable[[Any], None] = field(repr=False)
    family: str = ""
    lane: str = ""
    early: bool = False

    @property
    def kernel(self) -> Any:
        return self.fn

    def __call__(self, stream: Any = 0) -> None:
        self.fn(stream)


@dataclass(frozen=True)
class Join:
    """In a step's launch list: the main stream waits here for what branch ``lane`` recorded before it."""

    family: str = ""
    lane: str = ""


#: the branches of a step: work beside a sublayer (``SIDE``), the attention window's row beside the query path
#: (``KV``), a sublayer's Sinkhorn (``COMB``, read only by its ``hc.post``), the indexer's compressor (``INDEX``,
#: beside the attention's on ``SIDE``), host-memory expert copies ahead of their layers (``PREFETCH``)
SIDE = "side"
KV = "kv"
COMB = "comb"
INDEX = "index"
PREFETCH = "prefetch"


class Recorder:
    """A stand-in stream: launchers called with ``stream=recorder`` append their launches instead of running them.

    Every launcher sends its kernels through :func:`launch`, so the same
    launcher code runs a kernel now (tests, one-off calls) or prepares it
    once for a step plan that is replayed eagerly or captured as a graph.

    A step may run independent work concurrently: launches recorded inside
    :meth:`branch` go to a side stream (one per branch ``lane``) that starts
    once every launch recorded on the main stream before the branch opened is
    done, and the main stream's launches recorded after it do not wait for
    them until a :meth:`join` of that lane.  A lane holds one open branch at a
    time; branches of different lanes may be open together.

    ``early``: a kernel that follows another kernel on its stream is launched
    early (:func:`launch_early`) when it can wait for its predecessor itself.
    """

    def __init__(self, *, early: bool = False) -> None:
        self.launches: list[Launch | LibraryCall | Join] = []
        self.family = ""
        self.lane = ""                  # where launches go now ("": the main stream)
        self.open_lanes: set[str] = set()
        self.early = early
        self._follows_kernel: dict[str, bool] = {}   # per lane: its last item is a kernel launch

    def record(self, kernel: Any, grid: Any, block: Any, args: tuple) -> None:
        """Append a kernel launch; early (:func:`launch_early`) when it may be: the kernel waits for the
        prior grid (:func:`waits_for_prior_grid`) and follows a kernel on its stream (not a library call, a
        join, the branch's start or the step's start)."""
        early = self.early and self._follows_kernel.get(self.lane, False) and waits_for_prior_grid(kernel)
        self.launches.append(Launch(kernel, grid, block, args, self.family, self.lane, early))
        self._follows_kernel[self.lane] = True

    def record_call(self, fn: Callable[[Any], None]) -> None:
        self.launches.append(LibraryCall(fn, self.family, self.lane))
        self._follows_kernel[self.lane] = False

    @contextlib.contextmanager
    def branch(self, lane: str = SIDE) -> Any:
        """Record the launches of the ``with`` body on branch ``lane``'s stream (joined later by :meth:`join`)."""
        if not lane or lane in self.open_lanes:
            raise RuntimeError(f"a step records one {lane or 'main'!r} branch at a time: join the previous one first")
        if self.lane:
            raise RuntimeError("branches open from the main stream, not inside another branch")
        self.lane = lane
        self.open_lanes.add(lane)
        self._follows_kernel[lane] = False
        try:
            yield
        finally:
            self.lane = ""

    def join(self, lane: str = SIDE) -> None:
        """The main stream waits for branch ``lane`` (nothing to wait for: nothing open)."""
        if lane in self.open_lanes:
            self.launches.append(Join(self.family, lane))
            self.open_lanes.discard(lane)
            self._follows_kernel[""] = False


def launch(kernel: Any, grid: Any, block: Any, stream: Any, *args: Any) -> None:
    """``kernel[grid, block, stream](*args)``, or record it when ``stream`` is a :class:`Recorder`."""
    if isinstance(stream, Recorder):
        stream.record(kernel, grid, block, args)
    else:
        kernel[grid, block, stream](*args)


def call(fn: Callable[[Any], None], stream: Any) -> None:
    """``fn(stream)`` (a library routine enqueued on ``stream``), or record it when ``stream`` is a :class:`Recorder`."""
    if isinstance(stream, Recorder):
        stream.record_call(fn)
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
