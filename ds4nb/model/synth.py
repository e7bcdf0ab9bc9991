"""Write synthetic DS4 GGUF files (``ds4nb synth``).

A synthetic file has the real architecture string, metadata keys, tensor
names and quant mix (:func:`ds4nb.model.catalog.expected_tensors`) and the real
DeepSeek V4 vocabulary (truncated for ``tiny``), with random weights scaled so
activations stay finite through every layer: a weight ``(n_out, n_in)`` has
RMS ``1/sqrt(n_in)``, norm scales are near 1, HC and bias tensors are small.

Writing streams: the header goes first, the file is sized, then tensor chunks
(<= 64 MiB each, every one from its own seeded generator, so the bytes do not
depend on the worker count) are generated and written at their offsets by a
pool of processes.  Nothing is held in RAM beyond a chunk per worker.  The
file appears under its final name only when complete (temp file + rename).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES

from ds4nb.errors import Ds4Error
from ds4nb.model.catalog import TensorSpec, expected_tensors
from ds4nb.model.config import ARCH, ModelConfig
from ds4nb.model.presets import TINY_MERGES, flash_config, small_config, tiny_config
from ds4nb.quants import random_blocks
from ds4nb.vocab import ds4_vocab

Preset = Literal["tiny", "small", "flash"]
ExpertQuant = Literal["q2", "q4"]

ALIGNMENT = 32
CHUNK_BYTES = 64 << 20

# (gate/up, down) routed-expert types of the published files: the q2 file's
# "IQ2XXS-w2Q2K" mix and the q4 file's Q4_K experts.
EXPERT_QUANTS: dict[str, tuple[Q, Q]] = {"q2": (Q.IQ2_XXS, Q.Q2_K), "q4": (Q.Q4_K, Q.Q4_K)}


@dataclass(frozen=True)
class Init:
    """How a tensor's random values are drawn: mean + rms * noise."""

    rms: float
    mean: float = 0.0


@dataclass(frozen=True)
class PlannedTensor:
    spec: TensorSpec
    qtype: Q
    init: Init
    index: int          # position in the file: seeds its generator
    nbytes: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.spec.shape[-1] // block * size

    @property
    def n_rows(self) -> int:
        return math.prod(self.spec.shape[:-1])


@dataclass(frozen=True)
class SynthPlan:
    config: ModelConfig
    preset: str
    seed: int
    quant: ExpertQuant
    tensors: tuple[PlannedTensor, ...]
    metadata: dict[str, tuple[object, GGUFValueType]]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _init_for(spec: TensorSpec) -> Init:
    """The random distribution of one tensor (keeps activations O(1) through the layers)."""
    field = spec.field
    if field.endswith("_norm") or field in ("enorm", "hnorm", "norm"):
        return Init(rms=0.1, mean=1.0)
    if field.endswith("_scale"):          # HC mixing scales (pre, post, comb)
        return Init(rms=0.1, mean=0.5)
    if field.endswith("_base") or field == "ffn_exp_probs_b":
        return Init(rms=0.1)
    if field == "attn_sinks":
        return Init(rms=0.5)
    if field.endswith("_ape"):
        return Init(rms=0.1)
    if field == "token_embd":
        return Init(rms=1.0)
    if field == "ffn_gate_tid2eid":
        return Init(rms=0.0)
    return Init(rms=1.0 / math.sqrt(spec.shape[-1]))


def _qtype_for(spec: TensorSpec, quant: ExpertQuant) -> Q:
    if spec.role == "routed_expert":
        gate_up, down = EXPERT_QUANTS[quant]
        return down if spec.field.startswith("ffn_down") else gate_up
    return spec.qtypes[0]


def _preset_config(preset: str, n_vocab: int, n_layer: int | None) -> ModelConfig:
    if n_layer is not None and not 1 <= n_layer <= 256:
        raise Ds4Error(f"--layers must be between 1 and 256, got {n_layer}")
    layers = {} if n_layer is None else {"n_layer": n_layer}
    if preset == "tiny":
        return tiny_config(n_vocab, **layers)
    if preset == "small":
        return small_config(n_vocab, **layers)
    if preset == "flash":
        return flash_config(**layers)
    raise Ds4Error(f"unknown preset {preset!r}: expected tiny, small or flash")


def plan_synthetic(preset: str, *, seed: int = 0, quant: ExpertQuant = "q2",
                   n_layer: int | None = None) -> SynthPlan:
    """Decide shapes, quant types, distributions and metadata of a synthetic model."""
    if quant not in EXPERT_QUANTS:
        raise Ds4Error(f"unknown --quant {quant!r}: expected q2 or q4")
    vocab = ds4_vocab(TINY_MERGES if preset == "tiny" else None)
    cfg = _preset_config(preset, len(vocab.tokens), n_layer)
    if len(vocab.tokens) != cfg.n_vocab:
        raise Ds4Error(f"vocabulary has {len(vocab.tokens)} tokens, the {preset} shape needs {cfg.n_vocab}")

    tensors = []
    for spec in expected_tensors(cfg):
        if not spec.synth:
            continue
        qtype = _qtype_for(spec, quant)
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = math.prod(spec.shape) // block * size
        tensors.append(PlannedTensor(spec, qtype, _init_for(spec), len(tensors), nbytes))

    meta: dict[str, tuple[object, GGUFValueType]] = {
        "general.architecture": (ARCH, GGUFValueType.STRING),
        "general.name": (f"DeepSeek-V4-Flash synthetic {preset} ({quant})", GGUFValueType.STRING),
        "general.alignment": (ALIGNMENT, GGUFValueType.UINT32),
        "ds4nb.synth.preset": (preset, GGUFValueType.STRING),
        "ds4nb.synth.seed": (seed, GGUFValueType.UINT64),
    }
    meta.update(cfg.to_metadata())
    # metadata convention here: arrays are lists tagged with their element type
    meta.update({key: (value, sub if vtype == GGUFValueType.ARRAY else vtype)
                 for key, (value, vtype, sub) in vocab.gguf_metadata().items()})
    return SynthPlan(cfg, preset, seed, quant, tuple(tensors), meta)


# ---------------------------------------------------------------------------
# tensor bytes


def _chunks(t: PlannedTensor) -> list[tuple[int, int]]:
    """Row ranges of <= CHUNK_BYTES each (a row is the contiguous last axis)."""
    rows_per = max(1, CHUNK_BYTES // t.row_bytes)
    return [(r, min(r + rows_per, t.n_rows)) for r in range(0, t.n_rows, rows_per)]


def chunk_bytes(seed: int, t: PlannedTensor, n_expert: int, row0: int, row1: int) -> np.ndarray:
    """The bytes of rows [row0, row1) of tensor ``t``: a pure function of (seed, tensor, rows)."""
    rng = np.random.default_rng([seed, t.index, row0])
    n = row1 - row0
    cols = t.spec.shape[-1]
    if t.qtype == Q.I32:  # hash routing table: n_expert_used distinct experts per token
        picks = np.argpartition(rng.random((n, n_expert)), cols - 1, axis=1)[:, :cols]
        return picks.astype("<i4").view(np.uint8).reshape(-1)
    if t.init.mean != 0.0:  # norm scales and the like: plain floats around a mean
        values = t.init.mean + t.init.rms * rng.standard_normal((n, cols), dtype=np.float32)
        dtype = {Q.F32: "<f4", Q.F16: "<f2"}[t.qtype]
        return values.astype(dtype).view(np.uint8).reshape(-1)
    return random_blocks(t.qtype, (n, cols), rng, t.init.rms).reshape(-1)


def tensor_bytes(plan: SynthPlan, name: str) -> np.ndarray:
    """All bytes of one planned tensor (for tests; the writer streams chunks instead)."""
    t = next(t for t in plan.tensors if t.name == name)
    return np.concatenate([chunk_bytes(plan.seed, t, plan.config.n_expert, r0, r1) for r0, r1 in _chunks(t)])


# ---------------------------------------------------------------------------
# writing


def _write_header(plan: SynthPlan, path: Path) -> int:
    """Write metadata and the tensor directory; returns the data section's offset."""
    w = GGUFWriter(path, str(plan.metadata["general.architecture"][0]))
    for key, (value, vtype) in plan.metadata.items():
        if key == "general.architecture":
            continue  # GGUFWriter writes it from its constructor argument
        if key == "general.alignment":
            w.add_uint32(key, int(value))  # GGUFWriter reads data_alignment from this key
        elif isinstance(value, list):
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=vtype)
        else:
            w.add_key_value(key, value, vtype)
    for t in plan.tensors:
        w.add_tensor_info(t.name, t.spec.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    header_len = w.fout[0].tell()
    w.close()
    return -(-header_len // ALIGNMENT) * ALIGNMENT


def _offsets(plan: SynthPlan, data_start: int) -> dict[str, int]:
    out, pos = {}, data_start
    for t in plan.tensors:
        out[t.name] = pos
        pos += -(-t.nbytes // ALIGNMENT) * ALIGNMENT
    return out


_worker_fd: int | None = None


def _worker_open(path: str) -> None:
    global _worker_fd
    _worker_fd = os.open(path, os.O_WRONLY)


def _write_unit(seed: int, t: PlannedTensor, n_expert: int, row0: int, row1: int, offset: int) -> int:
    data = chunk_bytes(seed, t, n_expert, row0, row1)
    view = memoryview(data)
    assert _worker_fd is not None
    done = 0
    while done < len(view):
        done += os.pwrite(_worker_fd, view[done:], offset + done)
    return len(data)


def write_synthetic(out: str | os.PathLike[str], preset: str = "tiny", *, seed: int = 0,
                    quant: ExpertQuant = "q2", n_layer: int | None = None, workers: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> SynthPlan:
    """Plan and write a synthetic DS4 GGUF to ``out`` atomically; returns the plan it followed."""
    plan = plan_synthetic(preset, seed=seed, quant=quant, n_layer=n_layer)
    write_plan(plan, out, workers=workers, progress=progress)
    return plan


def write_plan(plan: SynthPlan, out: str | os.PathLike[str], *, workers: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Write ``plan`` to ``out``: temp file beside it, renamed only when complete.

    ``progress(done_bytes, total_bytes)`` is called as chunks land.
    """
    out = Path(out)
    if out.is_dir():
        raise Ds4Error(f"output path is a directory: {out}")
    if not out.parent.is_dir():
        raise Ds4Error(f"output directory does not exist: {out.parent}")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        data_start = _write_header(plan, tmp)
        offsets = _offsets(plan, data_start)
        last = plan.tensors[-1]
        end = offsets[last.name] + last.nbytes
        free = _free_bytes(out.parent)
        if free is not None and end > free:
            raise Ds4Error(f"not enough space in {out.parent}: need {end / 2**30:.2f} GiB, "
                           f"have {free / 2**30:.2f} GiB")
        os.truncate(tmp, end)
        # Workers get only what a chunk needs (not the plan with its vocabulary).
        units = [(plan.seed, t, plan.config.n_expert, r0, r1, offsets[t.name] + r0 * t.row_bytes)
                 for t in plan.tensors for r0, r1 in _chunks(t)]
        _run_units(plan.total_bytes, str(tmp), units, workers, progress)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _free_bytes(directory: Path) -> int | None:
    try:
        st = os.statvfs(directory)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _run_units(total: int, path: str, units: list[tuple],
               workers: int | None, progress: Callable[[int, int], None] | None) -> None:
    done = 0
    workers = workers or min(os.cpu_count() or 1, 32)
    if workers <= 1 or total < (256 << 20):
        _worker_open(path)
        try:
            for u in units:
                done += _write_unit(*u)
                if progress:
                    progress(done, total)
        finally:
            global _worker_fd
            assert _worker_fd is not None
            os.close(_worker_fd)
            _worker_fd = None
        return
    with ProcessPoolExecutor(max_workers=workers, initializer=_worker_open, initargs=(path,)) as pool:
        # Bounded submission keeps at most a few chunks per worker in flight.
        pending = set()
        it: Iterator[tuple] = iter(units)

        def submit_more() -> None:
            while len(pending) < 2 * workers:
                try:
                    u = next(it)
                except StopIteration:
                    return
                pending.add(pool.submit(_write_unit, *u))

        submit_more()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                pending.discard(f)
                done += f.result()
            if progress:
                progress(done, total)
            submit_more()


def describe(plan: SynthPlan, seconds: float) -> str:
    rate = plan.total_bytes / max(seconds, 1e-9) / 1e9
    return (f"{len(plan.tensors)} tensors, {plan.total_bytes / 2**20:,.1f} MiB in {seconds:.1f} s "
            f"({rate:.2f} GB/s)")


__all__ = ["EXPERT_QUANTS", "PlannedTensor", "SynthPlan", "chunk_bytes", "describe", "plan_synthetic",
           "tensor_bytes", "write_plan", "write_synthetic"]
