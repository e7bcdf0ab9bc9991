"""Placement plans: which weight bytes live in GPU memory.

A placement policy looks at the tensor catalog, the device's memory and a
byte budget, and returns a :class:`PlacementPlan` that places every tensor:
``device`` (copied, repacked as the kernels want), ``mapped`` (left in
page-locked host memory, read by kernels over PCIe), or, for a routed-expert
tensor, split by expert: the experts in a set on the device, the others
mapped.  The GGUF stores a layer's routed experts as one 3-D tensor
``(n_expert, n_out, n_in)`` whose experts are equal contiguous slices, so an
expert's bytes are exactly ``nbytes // n_expert``.

The residency manager (:mod:`ds4nb.cache.residency`) executes a plan;
placement never changes numerics, only where bytes are read from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, Protocol, Union

from ds4nb.errors import Ds4Error
from ds4nb.model import Model, TensorInfo

if TYPE_CHECKING:
    from ds4nb.cache.usage import ExpertUsage

Placement = Literal["device", "mapped"]
PLACEMENTS: tuple[Placement, ...] = ("device", "mapped")

#: What a policy assigns one tensor: a whole placement, or (routed-expert
#: tensors only) the ids of the experts that go to the device.
Assignment = Union[Placement, frozenset[int]]

#: How a plan reports one tensor.
Where = Literal["device", "mapped", "split"]


def format_bytes(n: float) -> str:
    """GiB with two decimals for model-sized numbers, MiB below 1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def engine_tensors(model: Model) -> tuple[TensorInfo, ...]:
    """The tensors the engine reads (those the schema knows), in file order: what a plan places."""
    return tuple(t for t in model.catalog if t.role is not None)


def expert_count(info: TensorInfo) -> int | None:
    """Experts stacked on axis 0 of a routed-expert tensor; ``None`` for every other tensor."""
    return info.shape[0] if info.role == "routed_expert" and len(info.shape) == 3 else None


def expert_bytes(info: TensorInfo) -> int:
    """Bytes of one expert's slice of a routed-expert tensor (exact: experts are whole rows)."""
    n = expert_count(info)
    if n is None:
        raise ValueError(f"{info.name} is not a routed-expert tensor")
    per, rest = divmod(info.nbytes, n)
    if rest:
        raise Ds4Error(f"tensor {info.name}: {info.nbytes} bytes do not split into {n} equal experts")
    return per


def device_bytes(info: TensorInfo, assignment: Assignment) -> int:
    """Bytes of ``info`` that ``assignment`` puts in GPU memory."""
    if assignment == "device":
        return info.nbytes
    if assignment == "mapped":
        return 0
    return expert_bytes(info) * len(assignment)


@dataclass(frozen=True)
class DeviceMemory:
    """What a policy may know about the GPU."""

    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class PlacementRequest:
    """Everything a policy decides from."""

    catalog: Sequence[TensorInfo]   # the tensors to place (engine_tensors)
    device: DeviceMemory
    reserve_bytes: int          # KV cache, activations and workspace the engine keeps on the device
    budget_bytes: int | None    # --gpu-budget resolved: most weight bytes allowed on the device
    expert_usage: ExpertUsage | None = None  # a measured routing profile, checked against the catalog
    policy_arg: str | None = None            # ARG of --placement NAME:ARG (policies with takes_arg)

    @property
    def weight_budget(self) -> int:
        """Bytes available for weights: the budget, else free memory less the engine's reserve."""
        if self.budget_bytes is not None:
            return self.budget_bytes
        return max(self.device.free_bytes - self.reserve_bytes, 0)


@dataclass(frozen=True)
class PlacementPlan:
    """Every tensor of a catalog placed; build it with :meth:`build`, which checks and sums."""

    policy: str
    placements: Mapping[str, Assignment] = field(repr=False)
    device_bytes: int
    mapped_bytes: int

    @classmethod
    def build(cls, policy: str, catalog: Sequence[TensorInfo],
              placements: Mapping[str, Assignment]) -> PlacementPlan:
        """Check that ``placements`` places each tensor of ``catalog`` once, and sum the bytes.

        A set of expert ids holding every expert becomes ``device``, an empty
        one ``mapped``.  Problems are one-line :class:`Ds4Error`\\ s.
        """
        if not isinstance(placements, Mapping):
            raise Ds4Error(f"placement policy {policy!r} returned placements of type "
                           f"{type(placements).__name__}, expected a mapping of tensor name to placement")
        names = {t.name for t in catalog}
        unknown = [n for n in placements if n not in names]
        if unknown:
            raise Ds4Error(f"placement policy {policy!r} placed {_tensors(len(unknown))} that the model does not "
                           f"have (e.g. {unknown[0]!r})")
        missing = [t.name for t in catalog if t.name not in placements]
        if missing:
            raise Ds4Error(f"placement policy {policy!r} left {_tensors(len(missing))} unplaced (e.g. {missing[0]})")
        normal: dict[str, Assignment] = {}
        dev = 0
        for info in catalog:
            a = _normalize(policy, info, placements[info.name])
            normal[info.name] = a
            dev += device_bytes(info, a)
        total = sum(t.nbytes for t in catalog)
        return cls(policy, MappingProxyType(normal), dev, total - dev)

    # -- queries (the residency manager and the engine) -------------------

    def where(self, name: str) -> Where:
        """``device`` or ``mapped`` for a whole tensor, ``split`` for a routed-expert tensor split by expert."""
        a = self.placements[name]
        return "split" if isinstance(a, frozenset) else a

    def device_experts(self, info: TensorInfo) -> frozenset[int]:
        """Ids of the experts of routed-expert tensor ``info`` in GPU memory (the others are mapped)."""
        n = expert_count(info)
        if n is None:
            raise ValueError(f"{info.name} is not a routed-expert tensor")
        a = self.placements[info.name]
        if isinstance(a, frozenset):
            return a
        return frozenset(range(n)) if a == "device" else frozenset()

    def tensor_device_bytes(self, info: TensorInfo) -> int:
        return device_bytes(info, self.placements[info.name])

    def describe(self) -> str:
        if self.mapped_bytes == 0:
            return f"{self.policy}: {format_bytes(self.device_bytes)} on the GPU"
        return f"{self.policy}: {format_bytes(self.device_bytes)} on the GPU, {format_bytes(self.mapped_bytes)} host-mapped"


def _tensors(n: int) -> str:
    return f"{n} tensor" + ("" if n == 1 else "s")


def _normalize(policy: str, info: TensorInfo, a: object) -> Assignment:
    if isinstance(a, str) and a in PLACEMENTS:
        return a  # type: ignore[return-value]
    if isinstance(a, (set, frozenset)):
        n = expert_count(info)
        if n is None:
            raise Ds4Error(f"placement policy {policy!r} split {info.name} by expert, but it is not a "
                           f"routed-expert tensor")
        bad = [e for e in a if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < n]
        if bad:
            raise Ds4Error(f"placement policy {policy!r} put expert {bad[0]!r} of {info.name} on the device; "
                           f"its experts are 0..{n - 1}")
        if len(a) == n:
            return "device"
        return frozenset(a) if a else "mapped"
    raise Ds4Error(f"placement policy {policy!r} placed {info.name} as {a!r}; expected 'device', 'mapped' "
                   f"or a set of expert ids")


class PlacementPolicy(Protocol):
    """A placement policy (built in, or from a plugin's ``ds4nb_placement_policies`` hook)."""

    name: str

    def plan(self, request: PlacementRequest) -> PlacementPlan: ...


@dataclass(frozen=True)
class ProvidedPolicy:
    """A policy and the plugin it came from (``ds4nb`` for the built-ins)."""

    policy: PlacementPolicy
    provider: str
    builtin: bool = False

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def summary(self) -> str:
        return (type(self.policy).__doc__ or "").strip().split("\n")[0]


def layers_of(catalog: Iterable[TensorInfo]) -> dict[int, int]:
    """Layer -> number of routed experts, from the routed-expert tensors of ``catalog``."""
    out: dict[int, int] = {}
    for info in catalog:
        n = expert_count(info)
        if n is not None and info.layer is not None:
            out[info.layer] = n
    return out
