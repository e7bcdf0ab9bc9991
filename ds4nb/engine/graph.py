"""Running a step's launches: one by one (eager), or captured once as a CUDA graph and replayed.

A :class:`StepRunner` owns one step's launch list (``ds4nb.engine.model``).
Its first run is eager, which also compiles every kernel; the next run
captures the list into a graph (numba-cuda launches into a ``cuda.core``
``GraphBuilder``) and every run after that is one graph launch: ~1 us of GPU
launch gap per kernel instead of tens of microseconds of Python per launch.
Nothing in the list allocates, copies to the host or synchronises, so the
graph holds exactly the kernels the eager run launches, with the same
arguments: both give bit-identical results.

A step may hold branches (``Recorder.branch``, one open per lane):
independent work on a side stream, a parallel path of the graph, joined back
where the main stream needs its results.

Graphs are off in the CUDA simulator and with ``DS4NB_CUDA_GRAPHS=0``; a
capture that fails (an old driver, a numba-cuda without graph builders) falls
back to eager launches with one warning line.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from ds4nb.kernels._launch import Join, Launch

ENV_VAR = "DS4NB_CUDA_GRAPHS"


def graphs_requested(env: dict | None = None) -> bool:
    """Whether the environment allows graphs (``DS4NB_CUDA_GRAPHS=0`` turns them off)."""
    env = os.environ if env is None else env
    return env.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def _core_device() -> Any:
    try:
        from cuda.core import Device
    except ImportError:                         # cuda.core < 0.4
        from cuda.core.experimental import Device
    dev = Device()
    dev.set_current()
    return dev


def capture(launches: Sequence[Launch | Join]) -> Any:
    """The launches captured into an executable ``cuda.core`` graph; a branch (``Launch.lane``) becomes a
    parallel path of the graph (a split of the main builder), joined back at its lane's :class:`Join`."""
    builder = _core_device().create_graph_builder().begin_building("thread_local")
    lanes: dict[str, Any] = {}              # open branches: lane -> its builder
    captured: set[str] = set()              # paths (main "", lanes) with a launch captured since they opened
    try:
        for item in launches:
            if isinstance(item, Join):
                if item.lane in lanes:
                    builder = type(builder).join(builder, lanes.pop(item.lane))
                continue
            if item.lane and item.lane not in lanes:
                builder, lanes[item.lane] = builder.split(2)
                captured.discard(item.lane)
            if item.early and item.lane not in captured:
                item = dataclasses.replace(item, early=False)   # no kernel before it here (a group alone)
            captured.add(item.lane)
            item(lanes[item.lane] if item.lane else builder)
        for lane in list(lanes):
            builder = type(builder).join(builder, lanes.pop(lane))
    finally:
        builder.end_building()
    return builder.complete()


def kernel_launches(launches: Sequence[Launch | Join]) -> list[Launch]:
    """The launches of a step's list without its joins (each on the main stream: for timings and counts)."""
    return [dataclasses.replace(x, lane="") for x in launches if not isinstance(x, Join)]


class StepRunner:
    """One step's launches, run on ``stream``: eagerly first, then (if allowed) as a replayed graph."""

    def __init__(self, launches: Sequence[Launch | Join], stream: Any, *, use_graph: bool) -> None:
        from numba import cuda

        self.launches = list(launches)
        self.stream = stream
        self.use_graph = use_graph
        self.graph: Any = None
        self._core_stream: Any = None
        self._warm = False
        # eager runs of a step with branches: a stream and the events of its fork and join, per lane
        lanes = {x.lane for x in self.launches if not isinstance(x, Join) and x.lane}
        self._lanes = {lane: (cuda.stream(), cuda.event(), cuda.event()) for lane in sorted(lanes)}

    def run(self) -> None:
        """Enqueue the step on the stream (asynchronous)."""
        if self.graph is not None:
            self.graph.launch(self._core_stream)
            return
        if self._warm and self.use_graph:
            self._capture()
            if self.graph is not None:
                self.graph.launch(self._core_stream)
                return
        self._run_eager()
        self._warm = True

    def _run_eager(self) -> None:
        """Launch by launch; a branch on its lane's stream, after a fork event, joined by an event."""
        forked: set[str] = set()

        def join(lane: str) -> None:
            side, _, joined = self._lanes[lane]
            joined.record(side)
            joined.wait(self.stream)
            forked.discard(lane)

        for item in self.launches:
            if isinstance(item, Join):
                if item.lane in forked:
                    join(item.lane)
            elif item.lane:
                side, fork, _ = self._lanes[item.lane]
                if item.lane not in forked:
                    fork.record(self.stream)
                    fork.wait(side)
                    forked.add(item.lane)
                item(side)
            else:
                item(self.stream)
        for lane in list(forked):
            join(lane)

    def _capture(self) -> None:
        self.use_graph = False                  # one attempt
        try:
            self.graph = capture(self.launches)
            self._core_stream = _core_device().create_stream(self.stream)
            self.graph.upload(self._core_stream)
        except Exception as exc:                # any failure: launch eagerly, say so once
            self.graph = None
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warnings.warn(f"CUDA graph capture failed ({first[:160]}); decoding with eager launches", stacklevel=3)


@dataclass(frozen=True)
class GroupTime:
    group: str
    launches: int
    gpu_us: float           # GPU time per step of this group's launches, replayed alone as a graph


def kernel_name(kernel: Any) -> str:
    """``module.kernel`` (``module.factory.kernel`` for kernels built by a ``kernel_factory``)."""
    fn = getattr(kernel, "py_func", None) or getattr(kernel, "fn", None) or kernel
    module = fn.__module__.rsplit(".", 1)[-1]
    origin = getattr(fn, "ds4nb_origin", None)
    return f"{module}.{origin[1]}.{fn.__name__}" if origin else f"{module}.{fn.__name__}"


def time_groups(launches: Sequence[Launch], stream: Any, *, by: str = "family", reps: int = 20) -> list[GroupTime]:
    """GPU time per op family (``by="family"``) or per (family, kernel): each group captured alone, replayed.

    The launches keep their arguments (and so may write state): run it on a
    session whose state is restored afterwards.  Kernels replayed alone miss
    the cache effects of their neighbours; the sum is close to, not equal to,
    the whole step.
    """
    groups: dict[str, list[Launch]] = defaultdict(list)
    for launch in kernel_launches(launches):
        key = launch.family or "other"
        if by == "kernel":
            key = f"{key}: {kernel_name(launch.kernel)}"
        groups[key].append(launch)
    core_stream = _core_device().create_stream(stream)
    out = []
    for key, group in groups.items():
        graph = capture(group)
        graph.upload(core_stream)
        out.append(GroupTime(key, len(group), replay_us(graph, core_stream, stream, reps)))
    return sorted(out, key=lambda g: -g.gpu_us)


def replay_us(graph: Any, core_stream: Any, stream: Any, reps: int) -> float:
    """GPU microseconds of one replay of an uploaded graph: one warm launch, then ``reps`` between CUDA events
    on ``stream`` (``core_stream``: its ``cuda.core`` twin)."""
    from numba import cuda

    graph.launch(core_stream)
    start, stop = cuda.event(), cuda.event()
    start.record(stream)
    for _ in range(reps):
        graph.launch(core_stream)
    stop.record(stream)
    stop.synchronize()
    return 1000.0 * start.elapsed_time(stop) / reps
