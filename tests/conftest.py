"""Shared fixtures: synthetic DS4 models written once per session, and GPU gating."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _real_gpu() -> bool:
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return False
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # numba-cuda missing or driver broken: no GPU for tests
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _real_gpu():      # tests of what happens without a GPU (or in the simulator) cannot run here
        skip = pytest.mark.skip(reason="checks the behaviour without a CUDA GPU")
        marker = "no_gpu"
    else:
        skip = pytest.mark.skip(reason="needs a real CUDA GPU (run through the device tool)")
        marker = "gpu"
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `tiny` preset model (seed 0), written once per test session."""
    from ds4nb.model.synth import write_synthetic

    path = tmp_path_factory.mktemp("models") / "tiny.gguf"
    write_synthetic(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `small` preset model (the embedded default's shape), written once per test session."""
    from ds4nb.model.synth import write_synthetic

    path = tmp_path_factory.mktemp("models") / "small.gguf"
    write_synthetic(path, "small", seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_gguf: Path):
    from ds4nb.model import load_model

    return load_model(tiny_gguf)


@pytest.fixture(scope="module")
def exact_prefill():
    """CUDA engines made in this module prefill with ``mmq``, the exact Q8_0 strategy (``auto`` may pick
    ``cublas``, whose results have a tolerance, not the oracle's bits)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DS4_CUDA_PREFILL_PATH", "mmq")
        yield


@pytest.fixture
def kernel_rng():
    """A fresh generator per test; the seed is printed (shown on failure), DS4NB_TEST_SEED pins it."""
    import numpy as np

    seed = int(os.environ.get("DS4NB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"DS4NB_TEST_SEED={seed}")
    return np.random.default_rng(seed)
