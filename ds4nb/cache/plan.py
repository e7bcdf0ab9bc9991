"""Placement plans: which weights live in GPU memory.

A placement policy looks at the tensor catalog, the device's memory and a
byte budget, and returns a :class:`PlacementPlan` mapping every tensor to
``device`` (copied, repacked as the kernels want) or ``mapped`` (left in
page-locked host memory, read by kernels over PCIe).  The residency manager
(:mod:`ds4nb.cache.residency`) executes a plan; placement never changes
numerics, only where bytes are read from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Mapping, Protocol, Sequence

from ds4nb.errors import Ds4Error
from ds4nb.model import TensorInfo

Placement = Literal["device", "mapped"]
GIB = 2**30


@dataclass(frozen=True)
class DeviceMemory:
    """What a policy may know about the GPU."""

    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class PlacementRequest:
    """Everything a policy decides from."""

    catalog: Sequence[TensorInfo]   # the tensors the engine reads
    device: DeviceMemory
    reserve_bytes: int          # KV cache, activations and workspace the engine needs
    budget_bytes: int | None    # --gpu-budget: most weight bytes allowed on the device
    expert_usage: Mapping[tuple[int, int], float] | None = None  # (layer, expert) -> frequency

    @property
    def weight_budget(self) -> int:
        """Bytes available for weights: the budget, or free memory less the engine's reserve."""
        room = self.device.free_bytes - self.reserve_bytes
        return room if self.budget_bytes is None else min(self.budget_bytes, room)


@dataclass(frozen=True)
class PlacementPlan:
    policy: str
    placements: Mapping[str, Placement] = field(repr=False)
    device_bytes: int
    mapped_bytes: int

    @classmethod
    def build(cls, policy: str, catalog: Sequence[TensorInfo], placements: Mapping[str, Placement]) -> "PlacementPlan":
        missing = [t.name for t in catalog if t.name not in placements]
        if missing:
            raise Ds4Error(f"placement policy {policy!r} left {len(missing)} tensors unplaced (e.g. {missing[0]})")
        dev = sum(t.nbytes for t in catalog if placements[t.name] == "device")
        mapped = sum(t.nbytes for t in catalog if placements[t.name] == "mapped")
        return cls(policy, MappingProxyType(dict(placements)), dev, mapped)

    def where(self, name: str) -> Placement:
        return self.placements[name]

    def describe(self) -> str:
        if self.mapped_bytes == 0:
            return f"{self.policy}: {self.device_bytes / GIB:.2f} GiB on the GPU"
        return (f"{self.policy}: {self.device_bytes / GIB:.2f} GiB on the GPU, "
                f"{self.mapped_bytes / GIB:.2f} GiB host-mapped")


class PlacementPolicy(Protocol):
    """A placement policy (built in, or from a plugin's ``ds4nb_placement_policies`` hook)."""

    name: str

    def plan(self, request: PlacementRequest) -> PlacementPlan: ...


class FullPolicy:
    """Every tensor in GPU memory; refuses (one line, with the numbers) when that does not fit."""

    name = "full"

    def plan(self, request: PlacementRequest) -> PlacementPlan:
        need = sum(t.nbytes for t in request.catalog)
        have = request.weight_budget
        if need > have:
            where = "the --gpu-budget" if request.budget_bytes is not None and request.budget_bytes < need else \
                f"{request.device.name} (free {request.device.free_bytes / GIB:.2f} GiB, " \
                f"{request.reserve_bytes / GIB:.2f} GiB kept for KV cache and activations)"
            raise Ds4Error(f"the model does not fit the GPU with the 'full' placement: need {need / GIB:.2f} GiB, "
                           f"have {max(have, 0) / GIB:.2f} GiB in {where}; a smaller --gpu-budget with a partial "
                           f"placement policy is needed")
        placements: dict[str, Placement] = {t.name: "device" for t in request.catalog}
        return PlacementPlan.build(self.name, request.catalog, placements)


BUILTIN_POLICIES: tuple[PlacementPolicy, ...] = (FullPolicy(),)
