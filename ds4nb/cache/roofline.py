"""What a plan costs a decode step: bytes per role, bytes read per token, the roofline.

Decode is bandwidth-bound: a token reads every dense weight once, one row of
each lookup table (the token embedding, the hash router's token -> expert
table), and of each routed-expert tensor the experts the router picks:
``n_expert_used / n_expert`` of them on average, or each expert's share from
a usage profile.  Bytes in GPU memory stream at the device's HBM read
bandwidth, host-mapped bytes at the host-read bandwidth over PCIe, one after
the other, so the decode roofline is
``1 / (device_bytes / device_bw + host_bytes / host_bw)`` tokens per second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ds4nb.cache.plan import PlacementPlan, expert_bytes, expert_count
from ds4nb.cache.usage import ExpertUsage
from ds4nb.model import TensorInfo

#: Tensors a token reads one row of (indexed by token id).
LOOKUP_TENSORS = ("token_embd.weight", ".ffn_gate_tid2eid.weight")


def is_lookup(info: TensorInfo) -> bool:
    return info.name == LOOKUP_TENSORS[0] or info.name.endswith(LOOKUP_TENSORS[1])


@dataclass(frozen=True)
class Traffic:
    """Bytes held (or read per token) in GPU memory and in host memory."""

    device: float = 0.0
    host: float = 0.0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.device + other.device, self.host + other.host)

    @property
    def total(self) -> float:
        return self.device + self.host


@dataclass(frozen=True)
class RoleCost:
    """One role's tensors under a plan: bytes held and bytes read per token."""

    role: str
    tensors: int
    held: Traffic
    per_token: Traffic


def expert_fractions(info: TensorInfo, n_expert_used: int, usage: ExpertUsage | None) -> tuple[float, ...]:
    """Expected fraction of tokens that read each expert of routed-expert tensor ``info``."""
    n = expert_count(info)
    assert n is not None
    if usage is None or info.layer is None:
        return (min(n_expert_used / n, 1.0),) * n
    return usage.token_fractions(info.layer, n_expert_used)


def tensor_cost(plan: PlacementPlan, info: TensorInfo, n_expert_used: int,
                usage: ExpertUsage | None = None) -> tuple[Traffic, Traffic]:
    """(bytes held, bytes read per token) of one tensor, split into device and host."""
    on_device = plan.tensor_device_bytes(info)
    held = Traffic(on_device, info.nbytes - on_device)
    if expert_count(info) is not None:
        per = expert_bytes(info)
        resident = plan.device_experts(info)
        dev = host = 0.0
        for e, f in enumerate(expert_fractions(info, n_expert_used, usage)):
            if e in resident:
                dev += per * f
            else:
                host += per * f
        return held, Traffic(dev, host)
    read = info.row_bytes if is_lookup(info) else info.nbytes
    return held, (Traffic(read, 0.0) if plan.where(info.name) == "device" else Traffic(0.0, read))


def role_costs(plan: PlacementPlan, catalog: Sequence[TensorInfo], n_expert_used: int,
               usage: ExpertUsage | None = None) -> list[RoleCost]:
    """One row per role, largest first."""
    rows: dict[str, RoleCost] = {}
    for info in catalog:
        role = info.role or "(unused)"
        held, read = tensor_cost(plan, info, n_expert_used, usage)
        prev = rows.get(role, RoleCost(role, 0, Traffic(), Traffic()))
        rows[role] = RoleCost(role, prev.tensors + 1, prev.held + held, prev.per_token + read)
    return sorted(rows.values(), key=lambda r: (-r.held.total, r.role))


@dataclass(frozen=True)
class Roofline:
    """Decode tokens/s if reading weights were all a step did."""

    per_token: Traffic
    device_bw: float   # bytes/s
    host_bw: float     # bytes/s

    @property
    def device_seconds(self) -> float:
        return self.per_token.device / self.device_bw

    @property
    def host_seconds(self) -> float:
        return self.per_token.host / self.host_bw

    @property
    def tokens_per_second(self) -> float:
        t = self.device_seconds + self.host_seconds
        return float("inf") if t == 0 else 1.0 / t


def roofline(plan: PlacementPlan, catalog: Sequence[TensorInfo], n_expert_used: int, *, device_bw: float,
             host_bw: float, usage: ExpertUsage | None = None) -> Roofline:
    total = Traffic()
    for info in catalog:
        total += tensor_cost(plan, info, n_expert_used, usage)[1]
    return Roofline(total, device_bw, host_bw)
