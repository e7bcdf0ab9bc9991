"""What the dispatcher knows about a GPU: a one-time probe, and its measured read bandwidth.

The read bandwidth (GPU memory and host-mapped memory, each through a
read-only kernel) bounds decode speed for a placement; it is measured once
per device, driver and ds4nb version and cached as JSON in the user cache
dir (``ds4nb placement`` shows it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import cuda, uint64

from ds4nb.dispatch.cachefile import load_entries, save_entries


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
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    free, total = cuda.current_context().get_memory_info()
    return DeviceProbe(name, tuple(dev.compute_capability), int(dev.MULTIPROCESSOR_COUNT), int(total), int(free),
                       False)


# ---------------------------------------------------------------------------
# read bandwidth: what a decode step's weight reads can stream at

#: Bytes of the buffers measured: far beyond any L2 cache.
DEVICE_SAMPLE_BYTES = 1 << 30
HOST_SAMPLE_BYTES = 256 << 20
BANDWIDTH_CACHE_FILE = "read-bandwidth.json"


@dataclass(frozen=True)
class ReadBandwidth:
    """Bytes/s a read-only kernel streams from GPU memory and from host-mapped memory."""

    device: float
    host: float
    source: str   # "measured", "cached", "given" (flags) or "assumed" (no GPU)

    def describe(self) -> str:
        return f"HBM {self.device / 1e9:.0f} GB/s, host-mapped {self.host / 1e9:.1f} GB/s ({self.source})"


#: Without a GPU: the H100 measurements of ENGINE.md ("Environment facts"): a read-only kernel over
#: device memory 2706 GB/s, over host-mapped memory 50.7 GB/s.
ASSUMED_READ_BANDWIDTH = ReadBandwidth(2706e9, 50.7e9, "assumed")


@cuda.jit
def _read_words(words, sink):
    """XOR every word a thread visits (grid-stride, four loads in flight) into ``sink[thread]``."""
    i = cuda.grid(1)
    stride = cuda.gridsize(1)
    n = words.size
    acc = uint64(0)
    j = i
    while j + 3 * stride < n:
        acc ^= words[j] ^ words[j + stride] ^ words[j + 2 * stride] ^ words[j + 3 * stride]
        j += 4 * stride
    while j < n:
        acc ^= words[j]
        j += stride
    sink[i] = acc


def xor_read(words, *, blocks: int, threads: int) -> int:
    """Read every uint64 of ``words`` (device or host-mapped) once on the GPU; their XOR (tests check it)."""
    sink = cuda.device_array(blocks * threads, dtype=np.uint64)
    _read_words[blocks, threads](words, sink)
    return int(np.bitwise_xor.reduce(sink.copy_to_host()))


def _seconds_per_read(words, *, blocks: int, threads: int, repeats: int) -> float:
    sink = cuda.device_array(blocks * threads, dtype=np.uint64)
    kernel = _read_words[blocks, threads]
    kernel(words, sink)  # compile and warm up
    cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel(words, sink)
        cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_read_bandwidth(*, device_bytes: int = DEVICE_SAMPLE_BYTES, host_bytes: int = HOST_SAMPLE_BYTES,
                           blocks: int | None = None, threads: int = 256, repeats: int = 5) -> ReadBandwidth:
    """Time a read-only kernel over a device buffer and over a host-mapped (page-locked) one; best of ``repeats``."""
    blocks = blocks or 8 * probe_device().sm_count
    on_device = cuda.device_array(device_bytes // 8, dtype=np.uint64)
    on_host = cuda.mapped_array(host_bytes // 8, dtype=np.uint64)
    on_host[:] = 0  # touch every page
    dev = on_device.size * 8 / _seconds_per_read(on_device, blocks=blocks, threads=threads, repeats=repeats)
    host = on_host.size * 8 / _seconds_per_read(on_host, blocks=blocks, threads=threads, repeats=repeats)
    return ReadBandwidth(dev, host, "measured")


def driver_version(probe: DeviceProbe) -> str:
    """The CUDA driver's version (``12.8``), or ``simulator``."""
    if probe.simulator:
        return "simulator"
    from numba.cuda.cudadrv.driver import driver as drv

    return ".".join(str(v) for v in drv.get_version())


def bandwidth_key(probe: DeviceProbe) -> str:
    """What a measurement depends on: the device, the driver, this ds4nb."""
    from ds4nb import __version__

    return f"{probe.name} | driver {driver_version(probe)} | ds4nb {__version__}"


def cached_read_bandwidth(key: str, cache_file: Path, measure: Callable[[], ReadBandwidth]) -> ReadBandwidth:
    """The bandwidth cached under ``key`` in ``cache_file``, else ``measure()`` once and cache it."""
    entries = load_entries(cache_file)
    hit = entries.get(key)
    if isinstance(hit, dict) and _positive(hit.get("device_bytes_per_s")) and _positive(hit.get("host_bytes_per_s")):
        return ReadBandwidth(float(hit["device_bytes_per_s"]), float(hit["host_bytes_per_s"]), "cached")
    bw = measure()
    entries[key] = {"device_bytes_per_s": bw.device, "host_bytes_per_s": bw.host,
                    "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    save_entries(cache_file, entries)
    return bw


def read_bandwidth(probe: DeviceProbe | None = None, *,
                   on_measure: Callable[[], None] | None = None) -> ReadBandwidth:
    """This device's read bandwidth: measured once per (device, driver, ds4nb version), cached in the user cache dir.

    ``on_measure`` is called before a measurement (a second or two), e.g. to say so.
    """
    from ds4nb.model.default import cache_dir

    def measure() -> ReadBandwidth:
        if on_measure is not None:
            on_measure()
        return measure_read_bandwidth()

    probe = probe or probe_device()
    return cached_read_bandwidth(bandwidth_key(probe), cache_dir() / BANDWIDTH_CACHE_FILE, measure)


def _positive(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
