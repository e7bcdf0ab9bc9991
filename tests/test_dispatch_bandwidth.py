"""Read-bandwidth measurement (the kernel under the simulator, tiny sizes) and its per-device cache."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from numba import cuda

from ds4nb import __version__
from ds4nb.dispatch.device import (
    BANDWIDTH_CACHE_FILE,
    ReadBandwidth,
    bandwidth_key,
    cached_read_bandwidth,
    measure_read_bandwidth,
    probe_device,
    read_bandwidth,
    xor_read,
)


@pytest.fixture
def rng():
    seed = int(os.environ.get("DS4NB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"DS4NB_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def test_the_read_kernel_reads_every_word_once(rng) -> None:
    """Device and host-mapped buffers, random sizes and grids (the 4-wide loop, its tail, idle threads)."""
    for _ in range(3):
        n = int(rng.integers(1, 700))
        words = rng.integers(0, 2**64, n, dtype=np.uint64)
        blocks, threads = int(rng.integers(1, 4)), int(rng.integers(1, 33))
        mapped = cuda.mapped_array(n, dtype=np.uint64)
        mapped[:] = words
        want = int(np.bitwise_xor.reduce(words))
        assert xor_read(cuda.to_device(words), blocks=blocks, threads=threads) == want
        assert xor_read(mapped, blocks=blocks, threads=threads) == want


def test_measure_returns_rates() -> None:
    bw = measure_read_bandwidth(device_bytes=8 * 256, host_bytes=8 * 128, blocks=2, threads=8, repeats=2)
    assert bw.source == "measured"
    assert math.isfinite(bw.device) and bw.device > 0 and math.isfinite(bw.host) and bw.host > 0


def test_measured_once_per_key_then_cached(tmp_path: Path) -> None:
    calls = []

    def measure() -> ReadBandwidth:
        calls.append(1)
        return ReadBandwidth(3.0e12 + len(calls), 5.0e10, "measured")

    path = tmp_path / "cache" / BANDWIDTH_CACHE_FILE
    first = cached_read_bandwidth("H200 | driver 13.0 | ds4nb 0.1.0", path, measure)
    again = cached_read_bandwidth("H200 | driver 13.0 | ds4nb 0.1.0", path, measure)
    assert first == ReadBandwidth(3.0e12 + 1, 5.0e10, "measured") and len(calls) == 1
    assert again == ReadBandwidth(first.device, first.host, "cached")
    other = cached_read_bandwidth("H200 | driver 13.1 | ds4nb 0.1.0", path, measure)
    assert other.source == "measured" and len(calls) == 2
    saved = json.loads(path.read_text())
    assert saved["H200 | driver 13.0 | ds4nb 0.1.0"]["device_bytes_per_s"] == first.device
    assert saved["H200 | driver 13.1 | ds4nb 0.1.0"]["device_bytes_per_s"] == other.device


@pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"k": {"device_bytes_per_s": -1, "host_bytes_per_s": 1}}',
                                     '{"k": {"device_bytes_per_s": "fast", "host_bytes_per_s": 1}}'])
def test_a_bad_cache_is_measured_over(tmp_path: Path, content: str) -> None:
    path = tmp_path / BANDWIDTH_CACHE_FILE
    path.write_text(content)
    bw = cached_read_bandwidth("k", path, lambda: ReadBandwidth(1e12, 1e10, "measured"))
    assert bw.source == "measured"
    assert cached_read_bandwidth("k", path, lambda: pytest.fail("measured twice")).source == "cached"


def test_an_unwritable_cache_still_measures(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    bw = cached_read_bandwidth("k", blocker / "sub" / BANDWIDTH_CACHE_FILE, lambda: ReadBandwidth(1, 1, "measured"))
    assert bw.source == "measured"


def test_the_key_and_the_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = probe_device()
    key = bandwidth_key(probe)
    assert key == f"cudasim | driver simulator | ds4nb {__version__}"
    monkeypatch.setenv("DS4NB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr("ds4nb.dispatch.device.measure_read_bandwidth", lambda: ReadBandwidth(2e12, 4e10, "measured"))
    said = []
    assert read_bandwidth(probe, on_measure=lambda: said.append(1)).source == "measured"
    assert read_bandwidth(probe, on_measure=lambda: said.append(2)) == ReadBandwidth(2e12, 4e10, "cached")
    assert said == [1]
    assert key in json.loads((tmp_path / BANDWIDTH_CACHE_FILE).read_text())
