"""The CUDA backend: a DS4 session whose whole state lives on the GPU.

:class:`CudaEngine` implements the engine interface of the oracle
(:class:`ds4nb.reference.engine.Engine`): ``prefill``, ``decode``,
``decode_sample``, ``snapshot``/``restore`` (as a host
:class:`~ds4nb.reference.state.State`, so a session can move between
backends) and ``reset``.

Setup, once: probe the device, let the dispatcher pick the Q8_0 strategy,
place the weights, allocate the session state for ``ctx`` tokens, the
activation scratch for a prefill chunk and the step input buffer.  Then a
step is orchestration only: write the step input (token ids, step records,
sampling record) into pinned memory, copy it with one asynchronous copy, run
the step's fixed launch list (``ds4nb.engine.model``; a replayed CUDA graph
after its first, eager run: ``ds4nb.engine.graph``), copy back what the
caller wants (the logits, or 8 bytes of sampled token), synchronise.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from numba import cuda

from ds4nb.cache.choose import choose_placement
from ds4nb.cache.options import PlacementOptions
from ds4nb.cache.plan import DeviceMemory, engine_tensors
from ds4nb.cache.residency import load_residency
from ds4nb.dispatch.device import probe_device
from ds4nb.engine.graph import GroupTime, StepRunner, graphs_requested, kernel_launches, time_groups
from ds4nb.engine.model import (Q8_MATMUL_WEIGHTS, Kernels, Scratch, StagePlan, StepContext, alloc_layer_states,
                                build_step, f16_copies, prefill_chunk, session_bytes, state_bytes)
from ds4nb.engine.q8_timing import q8_dispatch
from ds4nb.engine.step import StepInput, StepLayout
from ds4nb.errors import Ds4Error
from ds4nb.kernels._launch import early_launch_requested
from ds4nb.kernels.attention import NEG_INF
from ds4nb.kernels.registry import DeviceInfo
from ds4nb.kernels.sample import CAP as SAMPLE_CAP
from ds4nb.kernels.sample import FixedDraw, sample_launch
from ds4nb.model import Model, Weights
from ds4nb.plugins import placement_policies
from ds4nb.reference.engine import Engine
from ds4nb.reference.state import CompressorState, LayerState, RowBuffer, State
from ds4nb.sampling import SamplingParams, sample

F32 = np.float32


class CudaEngine(Engine):
    """DS4 on one CUDA GPU (or the CUDA simulator); see the module docstring.

    ``graphs``: replay steps as CUDA graphs (default: on, unless
    ``DS4NB_CUDA_GRAPHS=0`` or the simulator).  ``count_experts``: count the
    router's picks per layer and expert on the device (:meth:`expert_counts`,
    ``ds4nb profile``).
    """

    name = "cuda"

    def __init__(self, model: Model, *, ctx: int = 4096, chunk: int | None = None,
                 placement: PlacementOptions | None = None,
                 progress: Callable[[int, int], None] | None = None, graphs: bool | None = None,
                 count_experts: bool = False) -> None:
        if not isinstance(model.weights, Weights):
            raise Ds4Error(f"{model.path.name} is a {model.kind} file, not a main DS4 model")
        self.model = model
        cfg = self._cfg = model.config
        self.ctx = ctx
        self.probe = probe_device()
        if chunk is None:                   # tokens of a prefill step: from the GPU's memory
            chunk = prefill_chunk(cfg, ctx, self.probe.total_bytes)
        self.chunk = max(1, min(chunk, ctx))
        device = DeviceInfo.current()
        self.dispatch = q8_dispatch(cfg, self.probe)
        w = model.weights
        expert_types = {lw.ffn_gate_exps.qtype for lw in w.layers} | {lw.ffn_down_exps.qtype for lw in w.layers}

        tensors = engine_tensors(model)
        names = [t.name for t in tensors]
        self.plan = choose_placement(
            tensors, DeviceMemory(self.probe.name, self.probe.total_bytes, self.probe.free_bytes),
            placement or PlacementOptions(), reserve_bytes=session_bytes(cfg, ctx, self.chunk),
            policies=placement_policies())
        self.stream = cuda.stream()
        self.res = load_residency(model, self.plan, names, progress, stream=self.stream)

        self.layout = StepLayout.from_config(cfg, self.chunk)
        self.states = alloc_layer_states(cfg, ctx, self.layout.ring)
        self.inputs = StepInput(self.chunk, self.layout)
        self._counts = cuda.to_device(np.zeros((cfg.n_layer, cfg.n_expert), np.int32)) if count_experts else None
        kernels = Kernels(device, self.dispatch, expert_types)
        use_f16 = "cublas" in self.dispatch.strategies()
        scratch = Scratch(cfg, self.chunk, ctx, f16=use_f16, staged=StagePlan.of(cfg, w, self.plan))
        # the cublas strategy's F16 weight copies: in what is left after weights, state and scratch
        self.f16 = f16_copies(w, self.res, self._f16_budget(), self.stream) if use_f16 else {}
        self._step = StepContext(cfg, w, self.res, kernels, self.layout, self.states, scratch, self.inputs, ctx,
                                 self._counts, self.f16)
        self.use_graphs = (graphs_requested() if graphs is None else graphs) and not self.probe.simulator
        self.early_launch = early_launch_requested()   # programmatic dependent launch between kernels
        self._runners: dict[tuple[int, bool], StepRunner] = {}
        self._logits_host = cuda.pinned_array(cfg.n_vocab, np.float32)
        self._sampled_host = cuda.pinned_array((2, 2), np.int32)        # (token, status) of two steps in flight
        self._sampled_ready = (cuda.event(), cuda.event())
        self._input_free = cuda.event()
        self._input_free.record(self.stream)
        #: set to a list to collect (start, stop) CUDA events around every step's launches (benchmarks)
        self.step_events: list[tuple[Any, Any]] | None = None
        self.reset()

    #: GPU memory the F16 copies leave free: a share of the device and a floor (allocator slack, other users)
    F16_HEADROOM_SHARE = 0.04
    F16_HEADROOM_MIN = 2 << 30

    def _f16_budget(self) -> int:
        """Bytes the ``cublas`` strategy's F16 weight copies may take: what is free now, less a headroom."""
        if self.probe.simulator:
            return 1 << 62
        free, total = cuda.current_context().get_memory_info()
        return max(0, int(free) - max(self.F16_HEADROOM_MIN, int(self.F16_HEADROOM_SHARE * total)))

    # ------------------------------------------------------------------
    # sizes and description

    @property
    def config(self):
        return self._cfg

    def state_bytes(self) -> int:
        """Device bytes of the session state for ``ctx`` tokens (the KV cache of this engine)."""
        return state_bytes(self._cfg, self.ctx, self.layout.ring)

    @property
    def decode_mode(self) -> str:
        """How decode steps run: ``cuda graph`` once the first step has been captured, else ``eager``."""
        runner = self._runners.get((1, True)) or self._runners.get((1, False))
        if runner is not None and runner.graph is not None:
            return "cuda graph"
        return "cuda graph" if self.use_graphs and (runner is None or runner.use_graph) else "eager"

    def describe(self) -> str:
        f16 = ""
        if "cublas" in self.dispatch.strategies():
            n = sum(a.size * 2 for a in self.f16.values())
            f16 = f" | cublas F16 copies {n / 2**30:.1f} GiB ({len(self.f16)} of {self._cfg.n_layer * len(Q8_MATMUL_WEIGHTS)} weights)"
        return (f"cuda on {self.probe.describe()} | {self.dispatch.describe()}{f16} | placement {self.plan.describe()} "
                f"| decode: {self.decode_mode}")

    # ------------------------------------------------------------------
    # steps

    def _runner(self, n_tok: int, sample: bool) -> StepRunner:
        """The runner of a step of ``n_tok`` tokens: decode steps and full prefill chunks are kept (and graphed)."""
        key = (n_tok, sample)
        runner = self._runners.get(key)
        if runner is None:
            kept = n_tok in (1, self.chunk)
            runner = StepRunner(build_step(self._step, n_tok, sample=sample, early=self.early_launch), self.stream,
                                use_graph=self.use_graphs and kept)
            if kept:
                self._runners[key] = runner
        return runner

    def _run(self, tokens: Sequence[int] | None, *, sample: SamplingParams | None = None, u: float = 0.0) -> None:
        """Enqueue one step of ``tokens`` at the current position (asynchronous; the caller synchronises).
        ``None``: a chained decode step, whose token id the previous sampling step left on the device."""
        cfg = self._cfg
        self._input_free.synchronize()                  # the previous step's input copy is done
        self.inputs.write(tokens, self.pos, sample, u, cfg.n_vocab)
        self.inputs.upload(self.stream, ids=tokens is not None)
        self._input_free.record(self.stream)
        n_tok = 1 if tokens is None else len(tokens)
        runner = self._runner(n_tok, sample is not None)
        if self.step_events is None:
            runner.run()
        else:
            start, stop = cuda.event(), cuda.event()
            start.record(self.stream)
            runner.run()
            stop.record(self.stream)
            self.step_events.append((start, stop))
        self.pos += n_tok

    def _check(self, tokens: Sequence[int]) -> list[int]:
        tokens = [int(t) for t in tokens]
        if self.pos + len(tokens) > self.ctx:
            raise Ds4Error(f"context is full: {self.pos + len(tokens)} tokens do not fit --ctx {self.ctx}")
        for t in tokens:
            if not 0 <= t < self._cfg.n_vocab:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{self._cfg.n_vocab - 1})")
        return tokens

    def _logits_to_host(self) -> np.ndarray:
        self._step.scratch.logits.copy_to_host(self._logits_host, stream=self.stream)
        self.stream.synchronize()
        return np.array(self._logits_host)

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = self._check(tokens)      # before any work: a prompt that does not fit leaves the session as it was
        if not tokens:
            raise ValueError("prefill needs at least one token")
        for i in range(0, len(tokens), self.chunk):
            self._run(tokens[i:i + self.chunk])
        return self._logits_to_host()

    def decode(self, token: int) -> np.ndarray:
        self._run(self._check([token]))
        return self._logits_to_host()

    def decode_sample(self, token: int | None, params: SamplingParams, rng: np.random.Generator) -> int:
        """Decode ``token`` and sample the next id on the device (one graph replay, 8 bytes back).

        ``token=None`` samples from the logits of the last step instead.
        """
        u = 0.0 if params.greedy else float(rng.random())
        if token is None:
            self._input_free.synchronize()
            self.inputs.write([0], self.pos, params, u, self._cfg.n_vocab)   # only the sampling record is read
            self.inputs.upload(self.stream)
            sample_launch(self._step.scratch.logits, out=self._step.scratch.sampled, sp=self.inputs.sp,
                          scratch=self._step.scratch.sample_scratch, stream=self.stream)
        else:
            self._run(self._check([token]), sample=params, u=u)
        tok, status = self._sampled(self._fetch_sampled(0))
        if status:  # the device path declined (more min-p survivors than it sorts): the twin on the host
            return sample(self._logits_to_host(), params, FixedDraw(u))
        return tok

    def decode_chain(self, token: int, params: SamplingParams, rng: np.random.Generator, n: int) -> Iterator[int]:
        """Decode ``token``, sample, decode the sample, ... ``n`` times, yielding the ``n`` sampled ids: the
        tokens of ``n`` :meth:`decode_sample` calls, each fed the previous one's id, with the same draws.

        Each step after the first is a chained step: its id is the one the
        previous step's sampler left in device memory, so it is enqueued
        before that id reaches the host, and the GPU does not wait for the
        host between tokens.  A consumer that stops early (a stop token) has
        one step more decoded than it took ids: the session holds the last
        yielded id too, as the next prompt would.  Sampling the device can
        decline (no top-k, ``temperature > 0``: more min-p survivors than it
        sorts) runs step by step through :meth:`decode_sample`.
        """
        if not (params.greedy or 0 < params.top_k <= SAMPLE_CAP):
            for _ in range(n):
                token = self.decode_sample(token, params, rng)
                yield token
            return
        if self.pos + n > self.ctx:
            raise Ds4Error(f"context is full: {self.pos + n} tokens do not fit --ctx {self.ctx}")
        in_flight: deque[int] = deque()
        for i in range(n):
            u = 0.0 if params.greedy else float(rng.random())
            self._run(self._check([token]) if i == 0 else None, sample=params, u=u)
            in_flight.append(self._fetch_sampled(i % 2))
            if len(in_flight) == 2:
                yield self._chained_token(in_flight.popleft())
        while in_flight:
            yield self._chained_token(in_flight.popleft())

    def _fetch_sampled(self, slot: int) -> int:
        """Enqueue the copy of the last step's (token, status) into host slot ``slot``."""
        self._step.scratch.sampled.copy_to_host(self._sampled_host[slot], stream=self.stream)
        self._sampled_ready[slot].record(self.stream)
        return slot

    def _sampled(self, slot: int) -> tuple[int, int]:
        self._sampled_ready[slot].synchronize()
        tok, status = (int(v) for v in self._sampled_host[slot])
        return tok, status

    def _chained_token(self, slot: int) -> int:
        tok, status = self._sampled(slot)
        if status:      # cannot happen for the parameters decode_chain chains; the next step decoded garbage
            raise RuntimeError("device sampling declined inside a chained decode")
        return tok

    # ------------------------------------------------------------------
    # measurement

    def profile_step(self, tokens: Sequence[int], *, by: str = "family", reps: int = 20) -> list[GroupTime]:
        """GPU time per op family (or per family and kernel) of a step of ``tokens`` here (one token: a decode
        step; more: a prefill chunk); the session is left as it was."""
        tokens = self._check(tokens)
        state = self.snapshot()
        self._run(tokens)                               # the step once: every kernel compiled, inputs in place
        times = time_groups(self._runner(len(tokens), False).launches, self.stream, by=by, reps=reps)
        self.restore(state)
        return times

    def expert_counts(self) -> np.ndarray:
        """int64 (n_layer, n_expert): how many tokens picked each expert since the engine started."""
        if self._counts is None:
            raise ValueError("this engine does not count experts (CudaEngine(..., count_experts=True))")
        self.stream.synchronize()
        return self._counts.copy_to_host().astype(np.int64)

    def set_graphs(self, enabled: bool) -> None:
        """Switch CUDA graphs on or off for the following steps (drops the captured steps)."""
        self.use_graphs = enabled and not self.probe.simulator
        self._runners.clear()

    def set_early_launch(self, enabled: bool) -> None:
        """Switch early (programmatic dependent) launches on or off for the following steps (drops the
        recorded steps); ``enabled`` takes effect only where the GPU supports them."""
        self.early_launch = enabled and early_launch_requested()
        self._runners.clear()

    @property
    def prefetched_layers(self) -> list[int]:
        """The hash layers whose host-mapped experts a decode step copies as it starts (``StagePlan``)."""
        return sorted(self._step.scratch.prefetch)

    def launches_per_token(self) -> int:
        return len(kernel_launches(self._runner(1, True).launches))

    # ------------------------------------------------------------------
    # state <-> host

    @property
    def position(self) -> int:
        return self.pos

    def reset(self) -> None:
        """An empty session: position 0, empty compressor windows.

        Window and compressed rows are not cleared: kernels read only the rows
        the step records count (``N_RAW``, ``ROWS``), and nothing is reallocated,
        so captured steps stay valid.
        """
        self.stream.synchronize()
        self.pos = 0
        for ls in self.states:
            for comp in (ls.attn_compressor, ls.index_compressor):
                if comp is not None:
                    comp.kv.copy_to_device(np.zeros(comp.kv.shape, np.float32), stream=self.stream)
                    comp.score.copy_to_device(np.full(comp.score.shape, NEG_INF, np.float32), stream=self.stream)
        self.stream.synchronize()

    def _comp_rows(self, il: int, position: int) -> int:
        """Compressed rows layer ``il`` holds after ``position`` tokens (every ``ratio``-th token emits one)."""
        ratio = self._cfg.compress_ratio(il)
        return position // ratio if ratio else 0

    def snapshot(self) -> State:
        cfg = self._cfg
        self.stream.synchronize()
        layers = []
        for il, ls in enumerate(self.states):
            n_raw = min(self.pos, cfg.n_swa)
            ring = ls.raw.copy_to_host()
            order = [(self.pos - n_raw + i) % self.layout.ring for i in range(n_raw)]
            out = LayerState(raw=ring[order].copy())
            n = self._comp_rows(il, self.pos)
            if ls.comp is not None:
                out.comp = RowBuffer.of(_rows_to_host(ls.comp, n))
                out.attn_compressor = CompressorState(ls.attn_compressor.kv.copy_to_host(),
                                                      ls.attn_compressor.score.copy_to_host())
            if ls.index_comp is not None:
                out.index_comp = RowBuffer.of(_rows_to_host(ls.index_comp, n))
                out.index_compressor = CompressorState(ls.index_compressor.kv.copy_to_host(),
                                                       ls.index_compressor.score.copy_to_host())
            layers.append(out)
        return State(self.pos, layers)

    def restore(self, state: State) -> None:
        """Copy ``state`` into this session's buffers (never reallocated: captured steps stay valid)."""
        cfg = self._cfg
        if len(state.layers) != cfg.n_layer:
            raise ValueError(f"state has {len(state.layers)} layers, the model has {cfg.n_layer}")
        if state.position > self.ctx:
            raise Ds4Error(f"the state holds {state.position} tokens, more than --ctx {self.ctx}")
        for il, src in enumerate(state.layers):
            n = self._comp_rows(il, state.position)
            for rows in (src.comp, src.index_comp):
                if rows is not None and rows.n != n:
                    raise Ds4Error(f"layer {il} of the state holds {rows.n} compressed rows; position "
                                   f"{state.position} means {n}")
        self.reset()
        self.pos = state.position
        for ls, src in zip(self.states, state.layers):
            ring = np.zeros((self.layout.ring, cfg.head_dim), np.float32)
            n_raw = len(src.raw)
            for i in range(n_raw):
                ring[(self.pos - n_raw + i) % self.layout.ring] = src.raw[i]
            ls.raw.copy_to_device(ring, stream=self.stream)
            for dst, rows in ((ls.comp, src.comp), (ls.index_comp, src.index_comp)):
                if dst is not None and rows is not None and rows.n:
                    dst[:rows.n].copy_to_device(np.ascontiguousarray(rows.rows, np.float32), stream=self.stream)
            for dst, comp in ((ls.attn_compressor, src.attn_compressor),
                              (ls.index_compressor, src.index_compressor)):
                if dst is not None and comp is not None:
                    dst.kv.copy_to_device(np.ascontiguousarray(comp.kv, np.float32), stream=self.stream)
                    dst.score.copy_to_device(np.ascontiguousarray(comp.score, np.float32), stream=self.stream)
        self.stream.synchronize()


def _rows_to_host(rows: Any, n: int) -> np.ndarray:
    """The first ``n`` rows of a device (cap, d) array."""
    return rows[:n].copy_to_host() if n else np.zeros((0, rows.shape[1]), np.float32)
