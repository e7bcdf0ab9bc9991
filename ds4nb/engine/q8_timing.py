"""The dispatcher's view of the engine: a model's Q8_0 matmul shapes, what can run, and timing them.

``ds4nb.dispatch.select`` decides; this module gives it what it needs from
the layers above it: which Q8_0 strategies the registry can run on a device
(:func:`available_strategies`), and a timer (:class:`Q8Timer`) that runs one
strategy on the Q8_0 matmuls of one DS4 layer (:func:`model_q8_shapes`)
with random weights and activations for a batch regime and returns the
seconds they take.  :func:`q8_dispatch` puts them together for a session,
``ds4nb dispatch`` and ``ds4nb info``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.dispatch.device import DeviceProbe
from ds4nb.dispatch.select import DispatchKey, Q8Dispatch, select_q8_dispatch
from ds4nb.engine.graph import StepRunner, graphs_requested
from ds4nb.engine.model import BATCHED_IMPLS
from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8_0Act, alloc_q8_0
from ds4nb.kernels.registry import DeviceInfo
from ds4nb.model import ModelConfig
from ds4nb.plugins import get_registry
from ds4nb.quants import random_blocks
from ds4nb.quants.repack import PackedWeight, repack

Q = GGMLQuantizationType

#: Timed repetitions per (strategy, regime), after one untimed run (which compiles the kernels).
TIMED_REPS = 3


def model_q8_shapes(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(n_rows, k) of each Q8_0 matmul of one layer, in step order (``ds4nb.engine.model``).

    attn_q_a, attn_kv, attn_q_b, attn_output_a (a batch runs it as
    ``n_out_group`` matmuls of one group each, so it appears that many
    times), attn_output_b, and the shared expert's gate, up and down.
    """
    e = cfg.n_embd
    return [(cfg.q_lora_rank, e), (cfg.head_dim, e), (cfg.q_dim, cfg.q_lora_rank),
            *[(cfg.out_lora_rank, cfg.out_group_dim)] * cfg.n_out_group, (e, cfg.out_low_dim),
            (cfg.n_ff_exp, e), (cfg.n_ff_exp, e), (e, cfg.n_ff_exp)]


def cublas_module() -> ModuleType | None:
    """``ds4nb.kernels.cublas`` when it imports (it needs CuPy), else None."""
    try:
        from ds4nb.kernels import cublas
    except ImportError:
        return None
    return cublas


def available_strategies(device: DeviceInfo) -> Callable[[str], bool]:
    """``available(strategy)``: whether the registry can run the strategy's kernels on ``device``."""
    reg = get_registry()

    def available(strategy: str) -> bool:
        impl = BATCHED_IMPLS.get(strategy)
        if impl is None:
            return False
        try:
            ok = reg.get("q8_0.matvec", "warp8").supports(device) and reg.get(*impl).supports(device)
        except LookupError:
            return False
        if ok and strategy == "cublas":
            module = cublas_module()
            ok = module is not None and bool(module.cublas_available())
        return ok

    return available


class Q8Timer:
    """``timer(strategy, n_tok)``: seconds one layer's Q8_0 matmuls take with ``strategy`` for ``n_tok`` tokens.

    Every occurrence of a shape gets its own weights (random Q8_0 blocks,
    repacked, on the device), so repeated shapes are not read from L2.  The
    activations are random float32 rows, quantized to Q8_0 by the registry's
    ``act.quantize_q8_0`` (``warp8``, ``mmq``) or converted to FP16
    (``cublas``, against an FP16 copy of the weights made once); that step
    is timed with the matmul, as a step runs it.  The launches are recorded
    once and run as the engine runs a step (``StepRunner``): an eager run
    that compiles, then a CUDA graph (unless graphs are off), replayed
    ``reps`` times between two CUDA events, so Python's launch overhead is
    not timed.  Returns None for a strategy that cannot run here.
    :meth:`close` frees the buffers.
    """

    def __init__(self, cfg: ModelConfig, device: DeviceInfo, *, reps: int = TIMED_REPS, seed: int = 0) -> None:
        self.shapes = model_q8_shapes(cfg)
        self.device = device
        self.reps = reps
        self._rng = np.random.default_rng(seed)
        self._stream: Any = None
        self._weights: list[PackedWeight] | None = None
        self._weights16: list[Any] | None = None
        self._x: dict[tuple[int, int], Any] = {}          # (n_tok, k) -> float32 (n_tok * k,)
        self._act: dict[tuple[int, int], Q8_0Act] = {}    # (n_tok, k) -> Q8_0 buffers
        self._x16: dict[tuple[int, int], Any] = {}        # (n_tok, k) -> float16 (n_tok * k,)
        self._out: dict[tuple[int, int], Any] = {}        # (n_tok, n_rows) -> float32

    def __call__(self, strategy: str, n_tok: int) -> float | None:
        rec = L.Recorder()
        if not self._record(strategy, n_tok, rec):
            return None
        stream = self._stream
        runner = StepRunner(rec.launches, stream, use_graph=graphs_requested() and not self.device.simulator)
        runner.run()                        # eager: compiles every kernel
        runner.run()                        # captured as a graph, launched once
        start, stop = cuda.event(), cuda.event()
        start.record(stream)
        for _ in range(self.reps):
            runner.run()
        stop.record(stream)
        stop.synchronize()
        return start.elapsed_time(stop) / 1e3 / self.reps

    def close(self) -> None:
        """Drop every buffer and return the memory now (a session places its weights next)."""
        self._weights = self._weights16 = None
        for d in (self._x, self._act, self._x16, self._out):
            d.clear()
        self._stream = None
        if not self.device.simulator:
            cuda.current_context().deallocations.clear()

    # -- buffers -----------------------------------------------------------

    def _packed(self) -> list[PackedWeight]:
        if self._weights is None:
            self._stream = cuda.stream()
            host: dict[tuple[int, int], PackedWeight] = {}
            for shape in self.shapes:
                if shape not in host:
                    host[shape] = repack(random_blocks(Q.Q8_0, shape, self._rng, rms=0.02), Q.Q8_0, shape)
            self._weights = [host[shape].to_device(self._stream) for shape in self.shapes]
        return self._weights

    def _input(self, n_tok: int, k: int) -> Any:
        key = (n_tok, k)
        if key not in self._x:
            x = self._rng.standard_normal(n_tok * k).astype(np.float32)
            self._x[key] = cuda.to_device(x, stream=self._stream)
        return self._x[key]

    def _output(self, n_tok: int, n_rows: int) -> Any:
        key = (n_tok, n_rows)
        if key not in self._out:
            self._out[key] = cuda.device_array(n_tok * n_rows, np.float32, stream=self._stream)
        return self._out[key]

    # -- one strategy's calls --------------------------------------------

    def _record(self, strategy: str, n_tok: int, rec: L.Recorder) -> bool:
        """Record ``strategy``'s launches for ``n_tok`` tokens into ``rec``; False if it cannot run here."""
        if strategy == "cublas":
            return self._record_cublas(n_tok, rec)
        impl = BATCHED_IMPLS.get(strategy)
        if impl is None:
            return False
        reg = get_registry()
        op, name = ("q8_0.matvec", "warp8") if n_tok == 1 else impl
        try:
            matmul = reg.get(op, name).fn
            quantize = reg.select("act.quantize_q8_0", device=self.device).fn
        except LookupError:
            return False
        weights = self._packed()
        stream = self._stream
        for w in weights:
            n_rows, k = w.n_rows, w.n_cols
            x = self._input(n_tok, k).reshape(n_tok, k)
            act = self._act.get((n_tok, k))
            if act is None:
                act = self._act[(n_tok, k)] = alloc_q8_0(n_tok, k, stream)
            quantize(x, out=act, stream=rec)
            matmul(w, act, out=self._output(n_tok, n_rows), stream=rec)
        return True

    def _record_cublas(self, n_tok: int, rec: L.Recorder) -> bool:
        cublas = cublas_module()
        if cublas is None or not cublas.cublas_available():
            return False
        weights = self._packed()
        stream = self._stream
        if self._weights16 is None:
            self._weights16 = []
            for w in weights:
                w16 = cuda.device_array(w.n_rows * w.n_cols, np.float16, stream=stream)
                cublas.dequantize_q8_0_f16(w, out=w16, stream=stream)
                self._weights16.append(w16)
        for w, w16 in zip(weights, self._weights16):
            n_rows, k = w.n_rows, w.n_cols
            x = self._input(n_tok, k)
            x16 = self._x16.get((n_tok, k))
            if x16 is None:
                x16 = self._x16[(n_tok, k)] = cuda.device_array(n_tok * k, np.float16, stream=stream)
            cublas.to_f16(x, out=x16, stream=rec)
            cublas.f16_gemm(w16, x16, out=self._output(n_tok, n_rows), n_rows=n_rows, k=k, n_tok=n_tok, stream=rec)
        return True


def dispatch_key(cfg: ModelConfig, probe: DeviceProbe) -> DispatchKey:
    """The cache key of ``cfg``'s Q8_0 shapes on the probed device."""
    return DispatchKey.for_device(probe, model_q8_shapes(cfg))


def q8_dispatch(cfg: ModelConfig, probe: DeviceProbe, *, measure: bool = True, remeasure: bool = False,
                env: Mapping[str, str] | None = None, cache_dir: Path | None = None,
                on_measure: Callable[[], None] | None = None) -> Q8Dispatch:
    """The Q8_0 strategy per batch regime for ``cfg`` on the probed (current) device: ``DS4_CUDA_PREFILL_PATH``,
    the cached choice, or measured now (never in the simulator, nor with ``measure=False``: then the default order).

    What can run is judged on ``DeviceInfo.current()`` (CuPy included) by every caller alike, so a session and
    ``ds4nb dispatch`` agree on the cache entry.  ``on_measure`` is called once before the first timing (a few
    seconds), e.g. to say so.
    """
    key = dispatch_key(cfg, probe)
    device = DeviceInfo.current()
    available = available_strategies(device)
    if not measure or probe.simulator:
        return select_q8_dispatch(available, None, key, env, cache_dir)
    timer = Q8Timer(cfg, device)
    announced = False

    def timed(strategy: str, n_tok: int) -> float | None:
        nonlocal announced
        if not announced and on_measure is not None:
            on_measure()
        announced = True
        return timer(strategy, n_tok)

    try:
        return select_q8_dispatch(available, timed, key, env, cache_dir, remeasure=remeasure)
    finally:
        timer.close()
