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

``mapped`` tensors are repacked on the host into page-locked, device-mapped
buffers that kernels read over PCIe.  A progress callback gets bytes done and
total.
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


def _to_mapped(a: np.ndarray) -> Any:
    buf = cuda.mapped_array(a.shape, dtype=a.dtype)
    buf[...] = a
    return buf


def _mapped(info: TensorInfo) -> PackedWeight | Any:
    value = host_layout(info)
    if isinstance(value, PackedWeight):
        def up(a: np.ndarray | None) -> Any:
            return None if a is None else _to_mapped(np.ascontiguousarray(a).reshape(-1))

        return PackedWeight(value.qtype, value.shape, up(value.qs), up(value.sc), up(value.dm))
    return _to_mapped(np.ascontiguousarray(value))


def empty_packed(qtype: Q, shape: tuple[int, ...]) -> PackedWeight:
    """Unfilled device arrays for a block-minor tensor: the flat ``qs``, ``sc`` and ``dm`` fields."""
    blocks = int(np.prod(shape)) // block_size(qtype)
    arrays = {f.name: cuda.device_array(blocks * f.words, _WORD_DTYPE[f.word_bytes]) for f in fields(qtype)}
    return PackedWeight(qtype, tuple(shape), arrays["qs"], arrays.get("sc"), arrays["dm"])


def _device_empty(info: TensorInfo) -> PackedWeight | Any:
    """The tensor's final device arrays, unfilled."""
    if info.qtype in REPACKABLE:
        return empty_packed(info.qtype, info.shape)
    if info.qtype in _PLAIN:
        return cuda.device_array(info.shape, _PLAIN[info.qtype])
    raise Ds4Error(f"tensor {info.name}: no GPU layout for {info.qtype.name}")


@dataclass(frozen=True)
class _Piece:
    """Rows ``[row0, row0 + n_rows)`` of a tensor: ``nbytes`` bytes at file offset ``offset``."""

    info: TensorInfo
    row0: int
    n_rows: int
    offset: int
    nbytes: int


def _pieces(infos: list[TensorInfo], piece_bytes: int) -> Iterator[_Piece]:
    for info in infos:
        n_rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        row_bytes = info.nbytes // n_rows
        per = max(1, piece_bytes // row_bytes)
        for r0 in range(0, n_rows, per):
            n = min(per, n_rows - r0)
            yield _Piece(info, r0, n, info.offset + r0 * row_bytes, n * row_bytes)


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


def _load_device(model: Model, infos: list[TensorInfo], placed: dict[str, Any], stream: Any,
                 progress: Callable[[int], None]) -> None:
    """The pipeline of the module docstring for the ``device`` tensors ``infos``."""
    for info in infos:
        placed[info.name] = _device_empty(info)
    pieces = list(_pieces(infos, PIECE_BYTES))
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
                dst = placed[p.info.name]
                if isinstance(dst, PackedWeight):
                    staging.device[s][:p.nbytes].copy_to_device(host, stream=stream)
                    repack_rows(staging.device[s][:p.nbytes], p.info.qtype, p.info.shape[-1], p.row0, p.n_rows, dst,
                                stream=stream)
                else:
                    flat = dst.reshape(dst.size).view(np.uint8)
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
    on_device = [i for i in infos if plan.where(i.name) == "device"]
    if repack_on_device:
        _load_device(model, on_device, placed, stream or cuda.stream(), advance)
    else:
        for info in on_device:
            value = host_layout(info)
            placed[info.name] = value.to_device() if isinstance(value, PackedWeight) else cuda.to_device(value)
            advance(info.nbytes)
    for info in infos:
        if plan.where(info.name) == "mapped":
            placed[info.name] = _mapped(info)
            advance(info.nbytes)
    return Residency(plan, {n: placed[n] for n in names}, total)
