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
    if _real_gpu():
        return
    skip = pytest.mark.skip(reason="needs a real CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
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


@pytest.fixture
def kernel_rng():
    """A fresh generator per test; the seed is printed (shown on failure), DS4NB_TEST_SEED pins it."""
    import numpy as np

    seed = int(os.environ.get("DS4NB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"DS4NB_TEST_SEED={seed}")
    return np.random.default_rng(seed)
