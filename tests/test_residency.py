"""Loading weights: the GPU repack kernel and the pinned, pipelined loader against numpy's repack."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from numba import cuda

from ds4nb.cache import residency as R
from ds4nb.cache.plan import PlacementPlan
from ds4nb.quants import random_blocks
from ds4nb.quants.device_repack import repack_rows
from ds4nb.quants.repack import REPACKABLE, PackedWeight, repack


def _same(want: PackedWeight | np.ndarray, got) -> None:
    if isinstance(want, PackedWeight):
        for field in ("qs", "sc", "dm"):
            a, b = getattr(want, field), getattr(got, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                                      b.copy_to_host().view(np.uint8)), field
    else:
        assert np.array_equal(want, got.copy_to_host())


@pytest.mark.parametrize("qtype", REPACKABLE, ids=[q.name for q in REPACKABLE])
def test_device_repack_equals_numpy(qtype: Q, kernel_rng) -> None:
    """Random blocks, repacked on the device in two row ranges, equal the numpy layout word for word."""
    rows, cols = int(kernel_rng.integers(2, 5)), 256 * int(kernel_rng.integers(1, 3))
    raw = random_blocks(qtype, (rows, cols), kernel_rng)
    want = repack(raw, qtype, (rows, cols))
    blocks = raw.size // rows
    out = R.empty_packed(qtype, (rows, cols))
    split = int(kernel_rng.integers(1, rows))
    for r0, r1 in ((0, split), (split, rows)):
        repack_rows(cuda.to_device(raw[r0 * blocks:r1 * blocks]), qtype, cols, r0, r1 - r0, out)
    _same(want, out)


def test_pipelined_load_equals_host_layout(tiny_model) -> None:
    """Small pieces (many per tensor, several in flight) through the device path: every tensor as numpy lays it out."""
    names = []
    for qtype in (Q.F16, Q.F32, Q.I32, Q.Q8_0, Q.IQ2_XXS, Q.Q2_K):
        names += [t.name for t in tiny_model.catalog if t.role and t.qtype == qtype][:2]
    names = [n for n in names if tiny_model.tensor(n).nbytes < 400_000]
    plan = PlacementPlan.build("full", [tiny_model.tensor(n) for n in names], {n: "device" for n in names})
    pieces, stages = R.PIECE_BYTES, R.STAGES
    R.PIECE_BYTES, R.STAGES = 8192, 3
    try:
        seen = []
        res = R.load_residency(tiny_model, plan, names, progress=lambda d, t: seen.append((d, t)),
                               repack_on_device=True)
    finally:
        R.PIECE_BYTES, R.STAGES = pieces, stages
    total = sum(tiny_model.tensor(n).nbytes for n in names)
    assert seen[-1] == (total, total) and len(seen) > len(names)         # pieces, not whole tensors
    for n in names:
        _same(R.host_layout(tiny_model.tensor(n)), res[n])
