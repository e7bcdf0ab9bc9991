"""What the dispatcher knows about a GPU: a one-time probe."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProbe:
    name: str
    cc: tuple[int, int]
    sm_count: int
    total_bytes: int
    free_bytes: int
    simulator: bool

    def describe(self) -> str:
        if self.simulator:
            return "CUDA simulator"
        return (f"{self.name} (cc {self.cc[0]}.{self.cc[1]}, {self.sm_count} SMs, "
                f"{self.free_bytes / 2**30:.1f}/{self.total_bytes / 2**30:.1f} GiB free)")


def probe_device() -> DeviceProbe:
    """Probe the current numba-cuda device (the simulator reports a nominal 80 GiB, cc 9.0)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return DeviceProbe("cudasim", (9, 0), 1, 80 << 30, 80 << 30, True)
    from numba import cuda

    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    free, total = cuda.current_context().get_memory_info()
    return DeviceProbe(name, tuple(dev.compute_capability), int(dev.MULTIPROCESSOR_COUNT), int(total), int(free),
                       False)
