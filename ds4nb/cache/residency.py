"""Executing a placement plan: weights into GPU memory (or host-mapped memory).

Each tensor gets the layout its kernels read (docs in
:mod:`ds4nb.quants.repack`): quantized types are repacked block-minor, F16/F32
stay row-major, the I32 hash table stays as is.  ``device`` tensors are
copied into device memory; ``mapped`` ones are copied into page-locked,
device-mapped host buffers that kernels read over PCIe.  Loading streams one
tensor at a time (host memory holds at most one repacked tensor) and reports
bytes for a progress bar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
from gguf import GGMLQuantizationType as Q

from ds4nb.cache.plan import PlacementPlan
from ds4nb.errors import Ds4Error
from ds4nb.model import Model, TensorInfo
from ds4nb.quants.repack import REPACKABLE, PackedWeight, repack

_PLAIN = {Q.F32: np.float32, Q.F16: np.float16, Q.I32: np.int32}


def host_layout(info: TensorInfo) -> PackedWeight | np.ndarray:
    """The tensor in the layout kernels read, still in host memory."""
    if info.qtype in REPACKABLE:
        return repack(np.asarray(info.data), info.qtype, info.shape)
    if info.qtype in _PLAIN:
        return np.asarray(info.data).view(_PLAIN[info.qtype]).reshape(info.shape)
    raise Ds4Error(f"tensor {info.name}: no GPU layout for {info.qtype.name}")


def _to_mapped(a: np.ndarray) -> Any:
    from numba import cuda

    buf = cuda.mapped_array(a.shape, dtype=a.dtype)
    buf[...] = a
    return buf


def _place(value: PackedWeight | np.ndarray, where: str) -> PackedWeight | Any:
    from numba import cuda

    if isinstance(value, PackedWeight):
        if where == "device":
            return value.to_device()

        def up(a: np.ndarray | None) -> Any:
            return None if a is None else _to_mapped(np.ascontiguousarray(a).reshape(-1))

        return PackedWeight(value.qtype, value.shape, up(value.qs), up(value.sc), up(value.dm))
    a = np.ascontiguousarray(value)
    return cuda.to_device(a) if where == "device" else _to_mapped(a)


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
                   progress: Callable[[int, int], None] | None = None) -> Residency:
    """Place the tensors ``names`` of ``model`` as ``plan`` says."""
    infos = [model.tensor(n) for n in names]
    total = sum(i.nbytes for i in infos)
    done = 0
    placed: dict[str, Any] = {}
    for info in infos:
        placed[info.name] = _place(host_layout(info), plan.where(info.name))
        done += info.nbytes
        if progress:
            progress(done, total)
    return Residency(plan, placed, total)
