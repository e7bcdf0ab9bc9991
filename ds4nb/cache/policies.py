"""The built-in placement policies: ``full``, ``partial`` and ``direct``.

``partial`` fills the GPU budget in priority order (ENGINE.md, "Placement"),
each item going to the GPU if it fits in what is left:

0. what must stay resident: norms, hyper-connection mixers, the router and
   every other 1-D tensor (scales, biases, sinks); read many times per token
   and tiny, ``partial`` refuses to map them;
1. attention projections;
2. compressor and indexer;
3. shared experts;
4. the output head;
5. the token embedding;
6. routed experts, one ``(layer, expert)`` at a time (its gate, up and down
   slices together): by measured usage when a profile is given (the share of
   the layer's routing events, highest first), else layer by layer, the
   hash-routed layers last: their experts are known from the token id when a
   decode step starts, so the step copies the host-mapped ones while it
   computes the layers before them (``PREFETCH`` in ``ds4nb.engine.model``);

and everything else (the rest of the routed experts) is host-mapped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ds4nb.cache.plan import (
    Assignment,
    PlacementPlan,
    PlacementRequest,
    expert_bytes,
    expert_count,
    format_bytes,
)
from ds4nb.errors import Ds4Error
from ds4nb.model import TensorInfo

RESIDENT_ROLES = frozenset({"norm", "hc", "router", "attn_sinks"})

#: Priority classes of whole tensors, best first, after the must-stay-resident set.
PRIORITY_ROLES: tuple[tuple[str, frozenset[str]], ...] = (
    ("attention projections", frozenset({"attn_q_a", "attn_q_b", "attn_kv", "attn_output"})),
    ("compressor and indexer", frozenset({"compressor", "indexer"})),
    ("shared experts", frozenset({"shared_expert"})),
    ("output head", frozenset({"output"})),
    ("token embedding", frozenset({"token_embd"})),
)


def must_stay_resident(info: TensorInfo) -> bool:
    """Norms, HC mixers, router and other small (1-D) tensors: ``partial`` never maps them."""
    return info.role in RESIDENT_ROLES or len(info.shape) == 1


def dense_priority(catalog: Sequence[TensorInfo]) -> list[TensorInfo]:
    """The whole tensors ``partial`` considers, in priority order (file order within a class)."""
    out = [t for t in catalog if must_stay_resident(t)]
    for _, roles in PRIORITY_ROLES:
        out += [t for t in catalog if t.role in roles and not must_stay_resident(t)]
    return out


@dataclass(frozen=True)
class ExpertUnit:
    """One routed expert of one layer: its slice of every routed-expert tensor of the layer."""

    layer: int
    expert: int
    tensors: tuple[TensorInfo, ...]

    @property
    def nbytes(self) -> int:
        return sum(expert_bytes(t) for t in self.tensors)


#: the tensor that makes a layer hash-routed (docs/model.md: experts ``tid2eid[token]``)
HASH_TABLE_SUFFIX = ".ffn_gate_tid2eid.weight"


def hash_layers(catalog: Sequence[TensorInfo]) -> frozenset[int]:
    """The layers that route by token id (they hold a ``tid2eid`` table)."""
    return frozenset(t.layer for t in catalog if t.name.endswith(HASH_TABLE_SUFFIX) and t.layer is not None)


def expert_priority(request: PlacementRequest) -> list[ExpertUnit]:
    """Every (layer, expert) in ``partial``'s order: by usage share when profiled, else by layer with the
    hash-routed layers last."""
    by_layer: dict[int, list[TensorInfo]] = defaultdict(list)
    for t in request.catalog:
        if expert_count(t) is not None and t.layer is not None:
            by_layer[t.layer].append(t)
    hashed = hash_layers(request.catalog)
    units = [ExpertUnit(il, e, tuple(ts)) for il, ts in sorted(by_layer.items(), key=lambda kv: (kv[0] in hashed,
                                                                                                 kv[0]))
             for e in range(expert_count(ts[0]) or 0)]
    usage = request.expert_usage
    if usage is not None:
        units.sort(key=lambda u: (-usage.share(u.layer, u.expert), u.layer, u.expert))
    return units


def _weight_room(request: PlacementRequest) -> str:
    """How many weight bytes the GPU takes and why, for messages."""
    if request.budget_bytes is not None:
        return f"the GPU budget allows {format_bytes(request.budget_bytes)}"
    d = request.device
    return (f"{d.name} has {format_bytes(request.weight_budget)} for weights ({format_bytes(d.free_bytes)} "
            f"free, {format_bytes(request.reserve_bytes)} kept for KV cache and activations)")


class FullPolicy:
    """Every tensor in GPU memory; refuses (one line, with the numbers) when that does not fit."""

    name = "full"

    def plan(self, request: PlacementRequest) -> PlacementPlan:
        need = sum(t.nbytes for t in request.catalog)
        have = request.weight_budget
        if need > have:
            hint = ("use --placement partial (a prioritized subset on the GPU, the rest host-mapped) or a "
                    "larger --gpu-budget" if request.budget_bytes is not None else
                    "use --placement partial (a prioritized subset on the GPU, the rest host-mapped) or direct")
            raise Ds4Error(f"the model does not fit the GPU with the 'full' placement: it needs "
                           f"{format_bytes(need)}, but {_weight_room(request)}; {hint}")
        return PlacementPlan.build(self.name, request.catalog, {t.name: "device" for t in request.catalog})


class PartialPolicy:
    """A prioritized subset in GPU memory up to the budget (routed experts last), the rest host-mapped."""

    name = "partial"

    def plan(self, request: PlacementRequest) -> PlacementPlan:
        left = request.weight_budget
        resident = sum(t.nbytes for t in request.catalog if must_stay_resident(t))
        if resident > left:
            raise Ds4Error(f"the 'partial' placement keeps norms, hyper-connections, router and other small "
                           f"tensors on the GPU ({format_bytes(resident)}), but {_weight_room(request)}; "
                           f"use --placement direct or a larger --gpu-budget")
        placements: dict[str, Assignment] = {t.name: "mapped" for t in request.catalog}
        for t in dense_priority(request.catalog):
            if t.nbytes <= left:
                placements[t.name] = "device"
                left -= t.nbytes
        experts: dict[str, set[int]] = defaultdict(set)
        for unit in _fitting(expert_priority(request), left):
            for t in unit.tensors:
                experts[t.name].add(unit.expert)
        for name, ids in experts.items():
            placements[name] = frozenset(ids)
        return PlacementPlan.build(self.name, request.catalog, placements)


def _fitting(units: list[ExpertUnit], left: int) -> Iterator[ExpertUnit]:
    """The units that fit, first come first served."""
    for unit in units:
        if unit.nbytes <= left:
            left -= unit.nbytes
            yield unit


class DirectPolicy:
    """Every tensor host-mapped: kernels read weights over PCIe (the C engine's default)."""

    name = "direct"

    def plan(self, request: PlacementRequest) -> PlacementPlan:
        return PlacementPlan.build(self.name, request.catalog, {t.name: "mapped" for t in request.catalog})


BUILTIN_POLICIES = (FullPolicy(), PartialPolicy(), DirectPolicy())
