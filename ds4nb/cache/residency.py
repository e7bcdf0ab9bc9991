"""Executing a placement plan: weights into GPU memory (or host-mapped memory).

Each tensor gets the layout its kernels read (docs in
:mod:`ds4nb.quants.repack`): quantized types are repacked block-minor, F16/F32
stay row-major, the I32 hash table stays as is.

``device`` tensors stream through a pipeline that keeps the disk, the CPU,
the PCIe link and the GPU busy at once: the file is cut into pieces of whole
rows (at most :data:`PIECE_BYTES`); reader threads ``preadv`` pieces
straight into a ring of pinned staging buffers, several pieces ahead; the
main thread copies each finished piece to the device with one asynchronous
DMA and, for quantized tensors, repacks it there
(:func:`ds4nb.quants.device_repack.repack_rows`) into its final place.  The
host never touches the bytes beyond the read.  In the CUDA simulator the
repack runs in numpy (simulated kernels are far too slow for whole models).

``mapped`` tensors take the same path into page-locked, device-mapped host
buffers (the repack kernel writes them over PCIe); kernels then read them over
PCIe.  A routed-expert tensor the plan splits by expert becomes
:class:`SplitExperts`: the chosen experts in GPU memory, the others mapped.
A progress callback gets bytes done and total.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
from gguf import GGMLQuantizationType as Q
from numba import config, cuda

from ds4nb.cache.plan import PlacementPlan
from ds4nb.errors import Ds4Error
from ds4nb.model import Model, TensorInfo
from ds4nb.quants.device_repack import repack_rows
from ds4nb.quants.formats import block_size
from ds4nb.quants.repack import REPACKABLE, PackedWeight, fields, repack

_PLAIN = {Q.F32: np.float32, Q.F16: np.float16, Q.I32: np.int32}
_WORD_DTYPE = {8: np.uint64, 4: np.uint32, 2: np.float16}

#: Largest piece the pipeline moves at once, and how many pieces are in flight.
PIECE_BYTES = 64 << 20
STAGES = 8
READERS = 8


def host_layout(info: TensorInfo) -> PackedWeight | np.ndarray:
    """The tensor in the layout kernels read, still in host memory."""
    if info.qtype in REPACKABLE:
        return repack(np.asarray(info.data), info.qtype, info.shape)
    if info.qtype in _PLAIN:
        return np.asarray(info.data).view(_PLAIN[info.qtype]).reshape(info.shape)
    raise Ds4Error(f"tensor {info.name}: no GPU layout for {info.qtype.name}")


def _alloc(shape: Any, dtype: Any, mapped: bool, fill: np.ndarray | None = None) -> Any:
    """A device array, or page-locked device-mapped host memory seen as a device array (filled on the host)."""
    if not mapped:
        return cuda.device_array(shape, dtype)
    buf = cuda.mapped_array(shape, dtype=dtype)
    if fill is not None:
        buf[...] = fill
    if config.ENABLE_CUDASIM:
        return buf
    # numba's MappedNDArray reshapes into views without a device pointer: kernels get a plain device array
    # over the same memory (which keeps the mapped buffer alive)
    return cuda.from_cuda_array_interface(buf.__cuda_array_interface__, owner=buf, sync=False)


def empty_packed(qtype: Q, shape: tuple[int, ...], mapped: bool = False) -> PackedWeight:
    """Unfilled arrays for a block-minor tensor (device memory, or page-locked device-mapped host memory)."""
    blocks = int(np.prod(shape)) // block_size(qtype)
    arrays = {f.name: _alloc(blocks * f.words, _WORD_DTYPE[f.word_bytes], mapped) for f in fields(qtype)}
    return PackedWeight(qtype, tuple(shape), arrays["qs"], arrays.get("sc"), arrays["dm"])


@dataclass(frozen=True)
class SplitExperts:
    """A routed-expert tensor split by expert: some experts in GPU memory, the others host-mapped.

    ``device`` and ``mapped`` hold their experts in id order; ``slot_of[e]``
    (device int32) is expert ``e``'s index in ``device`` when ``>= 0``, else
    ``-1 - index`` in ``mapped`` (``moe.split_ids`` reads it).
    """

    device: PackedWeight
    mapped: PackedWeight
    slot_of: Any
    device_ids: tuple[int, ...]


def _dest_ranges(info: TensorInfo, where: str, on_device: frozenset[int]) -> tuple[Any, list[tuple[int, int, Any, int]]]:
    """(the placed value, [(first source row, rows, destination, destination row)]) for a repackable tensor."""
    n_rows = int(np.prod(info.shape[:-1]))
    if where != "split":
        dst = empty_packed(info.qtype, info.shape, mapped=where == "mapped")
        return dst, [(0, n_rows, dst, 0)]
    n_expert, per = info.shape[0], n_rows // info.shape[0]
    dev_ids = sorted(on_device)
    host_ids = [e for e in range(n_expert) if e not in on_device]
    dev = empty_packed(info.qtype, (len(dev_ids), *info.shape[1:]))
    host = empty_packed(info.qtype, (len(host_ids), *info.shape[1:]), mapped=True)
    slot_of = np.empty(n_expert, np.int32)
    slot_of[dev_ids] = np.arange(len(dev_ids))
    slot_of[host_ids] = -1 - np.arange(len(host_ids))
    ranges = [(e * per, per, dev, i * per) for i, e in enumerate(dev_ids)]
    ranges += [(e * per, per, host, i * per) for i, e in enumerate(host_ids)]
    return SplitExperts(dev, host, cuda.to_device(slot_of), tuple(dev_ids)), sorted(ranges, key=lambda r: r[0])


@dataclass(frozen=True)
class _Piece:
    """``n_rows`` rows of a tensor, ``nbytes`` bytes at file offset ``offset``, for row ``row0`` of ``dst``."""

    info: TensorInfo
    dst: Any            # a PackedWeight (repacked there) or a plain array (copied there)
    row0: int
    n_rows: int
    offset: int
    nbytes: int


def _pieces(info: TensorInfo, ranges: list[tuple[int, int, Any, int]], piece_bytes: int) -> Iterator[_Piece]:
    n_rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
    row_bytes = info.nbytes // n_rows
    per = max(1, piece_bytes // row_bytes)
    for src0, rows, dst, dst0 in ranges:
        for r in range(0, rows, per):
            n = min(per, rows - r)
            yield _Piece(info, dst, dst0 + r, n, info.offset + (src0 + r) * row_bytes, n * row_bytes)


class _Staging:
    """A ring of pinned host buffers and device buffers for pieces in flight, with their events."""

    def __init__(self, n: int, nbytes: int) -> None:
        self.host = [cuda.pinned_array(nbytes, np.uint8) for _ in range(n)]
        self.device = [cuda.device_array(nbytes, np.uint8) for _ in range(n)]
        self.done = [cuda.event() for _ in range(n)]
        self.used = [False] * n


def _read_into(fd: int, buf: np.ndarray, offset: int, nbytes: int, name: str) -> None:
    view = memoryview(buf)[:nbytes]
    got = 0
    while got < nbytes:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise Ds4Error(f"tensor {name}: the file ended while reading it")
        got += n


def _load_pipelined(model: Model, plan: PlacementPlan, infos: list[TensorInfo], placed: dict[str, Any],
                    stream: Any, progress: Callable[[int], None]) -> None:
    """The pipeline of the module docstring: every repackable tensor and every plain ``device`` one."""
    pieces: list[_Piece] = []
    for info in infos:
        where = plan.where(info.name)
        if info.qtype in REPACKABLE:
            on_device = plan.device_experts(info) if where == "split" else frozenset()
            placed[info.name], ranges = _dest_ranges(info, where, on_device)
        elif info.qtype in _PLAIN and where == "device":
            placed[info.name] = dst = cuda.device_array(info.shape, _PLAIN[info.qtype])
            ranges = [(0, int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1, dst, 0)]
        else:
            continue
        pieces += _pieces(info, ranges, PIECE_BYTES)
    if not pieces:
        return
    stages = min(STAGES, len(pieces))
    staging = _Staging(stages, max(p.nbytes for p in pieces))
    fd = os.open(model.path, os.O_RDONLY)
    pending: dict[int, Future] = {}
    try:
        with ThreadPoolExecutor(max_workers=min(READERS, stages), thread_name_prefix="ds4nb-load") as pool:
            def submit(i: int) -> None:
                s, p = i % stages, pieces[i]
                if staging.used[s]:
                    staging.done[s].synchronize()           # the previous piece in this slot has left the host
                staging.used[s] = True
                pending[i] = pool.submit(_read_into, fd, staging.host[s], p.offset, p.nbytes, p.info.name)

            for i in range(stages):
                submit(i)
            for i, p in enumerate(pieces):
                pending.pop(i).result()
                s = i % stages
                host = staging.host[s][:p.nbytes]
                if isinstance(p.dst, PackedWeight):
                    staging.device[s][:p.nbytes].copy_to_device(host, stream=stream)
                    repack_rows(staging.device[s][:p.nbytes], p.info.qtype, p.info.shape[-1], p.row0, p.n_rows,
                                p.dst, stream=stream)
                else:
                    flat = p.dst.reshape(p.dst.size).view(np.uint8)
                    start = p.nbytes // p.n_rows * p.row0
                    flat[start:start + p.nbytes].copy_to_device(host, stream=stream)
                staging.done[s].record(stream)
                if i + stages < len(pieces):
                    submit(i + stages)
                progress(p.nbytes)
        stream.synchronize()
    finally:
        os.close(fd)


@dataclass
class Residency:
    """The placed weights of one model: name -> device array or ``PackedWeight`` of device arrays."""

    plan: PlacementPlan
    tensors: Mapping[str, Any]
    loaded_bytes: int

    def __getitem__(self, name: str) -> Any:
        return self.tensors[name]

    def get(self, info: TensorInfo | None) -> Any:
        return None if info is None else self.tensors[info.name]


def load_residency(model: Model, plan: PlacementPlan, names: list[str],
                   progress: Callable[[int, int], None] | None = None, stream: Any = 0,
                   repack_on_device: bool | None = None) -> Residency:
    """Place the tensors ``names`` of ``model`` as ``plan`` says (see the module docstring).

    ``repack_on_device``: the GPU pipeline (default: on a real GPU) or, in
    the simulator, host repacking and plain copies.
    """
    infos = [model.tensor(n) for n in names]
    total = sum(i.nbytes for i in infos)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    if repack_on_device is None:
        repack_on_device = not config.ENABLE_CUDASIM
    placed: dict[str, Any] = {}
    if repack_on_device:
        _load_pipelined(model, plan, infos, placed, stream or cuda.stream(), advance)
    for info in infos:
        if info.name in placed:
            continue
        placed[info.name] = _host_placed(info, plan)
        advance(info.nbytes)
    return Residency(plan, {n: placed[n] for n in names}, total)


def _host_placed(info: TensorInfo, plan: PlacementPlan) -> Any:
    """A tensor placed without the pipeline: repacked on the host (the simulator), or a plain mapped tensor."""
    where = plan.where(info.name)
    value = host_layout(info)
    if not isinstance(value, PackedWeight):
        if where == "device":
            return cuda.to_device(np.ascontiguousarray(value))
        return _alloc(value.shape, value.dtype, True, fill=value)
    on_device = plan.device_experts(info) if where == "split" else frozenset()
    placed, ranges = _dest_ranges(info, where, on_device)
    n_rows = int(np.prod(info.shape[:-1]))
    for src0, rows, dst, dst0 in ranges:
        for f in fields(info.qtype):
            words = getattr(value, f.name).reshape(n_rows, -1)[src0:src0 + rows]
            flat = getattr(dst, f.name)
            per = words.shape[1]
            flat[dst0 * per:(dst0 + rows) * per].copy_to_device(np.ascontiguousarray(words).reshape(-1))
    return placed
