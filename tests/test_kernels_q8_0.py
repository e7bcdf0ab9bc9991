"""Q8_0 matvec / matmul at the shapes that matter beyond each op's default case."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

from ds4nb.kernels.parity import check_case
from ds4nb.kernels.q8_0 import MODEL_SHAPES, make_q8_0_case, q8_0_reference
from ds4nb.plugins import get_registry


@pytest.mark.parametrize(("rows", "k"), [(9, 32), (8, 96), (3, 4096 + 64)], ids=["one-block", "3-blocks", "tail"])
def test_matvec_odd_widths(rows: int, k: int, kernel_rng: np.random.Generator) -> None:
    """Rows narrower than a warp's 32 blocks, and a tail after whole 32-block steps."""
    reg = get_registry()
    result = check_case(reg.get("q8_0.matvec", "warp8"), make_q8_0_case(kernel_rng, rows, k, 1),
                        reg.op("q8_0.matvec").tolerance)
    assert result.ok, str(result)


def test_matvec_pair_equals_two_matvecs(kernel_rng: np.random.Generator) -> None:
    """Two matrices of one activation in one launch (``w2``): each output equals its own float64 twin (13
    rows: the second matrix starts inside a block of 8 warps)."""
    from numba import cuda

    from ds4nb.kernels.activation import q8_0_to_device
    from ds4nb.kernels.parity import CONTRACT_RATE, contract_error
    from ds4nb.quants import quantize_q8_0, random_blocks
    from ds4nb.quants.repack import repack

    rng, k = kernel_rng, 320
    x = rng.standard_normal((1, k)).astype(np.float32)
    ws, refs, outs = [], [], []
    for rows in (13, 6):
        raw = random_blocks(Q.Q8_0, (rows, k), rng, rms=0.02)
        ws.append(repack(raw, Q.Q8_0, (rows, k)).to_device())
        refs.append(q8_0_reference(raw, (rows, k), *quantize_q8_0(x)).reshape(-1).astype(np.float32))
        outs.append(cuda.to_device(np.full(rows, np.nan, np.float32)))
    impl = get_registry().get("q8_0.matvec", "warp8")
    xa = q8_0_to_device(x)
    impl(ws[0], xa, out=outs[0], w2=ws[1], out2=outs[1])
    for got, ref in zip(outs, refs):
        got = got.copy_to_host()
        assert np.isfinite(got).all() and contract_error(got, ref) <= CONTRACT_RATE
    other = repack(random_blocks(Q.Q8_0, (6, k + 32), rng, rms=0.02), Q.Q8_0, (6, k + 32)).to_device()
    with pytest.raises(ValueError, match="same row length"):
        impl(ws[0], xa, out=outs[0], w2=other, out2=outs[1])


@pytest.mark.gpu
def test_output_head_matvec(kernel_rng: np.random.Generator) -> None:
    """The output head: 4096 -> 129280 (563 MB of Q8_0)."""
    reg = get_registry()
    n, k = MODEL_SHAPES["output"]
    result = check_case(reg.get("q8_0.matvec", "warp8"), make_q8_0_case(kernel_rng, n, k, 1),
                        reg.op("q8_0.matvec").tolerance)
    print(result)
    assert result.ok, str(result)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["warp8_t8", "mmq"])
@pytest.mark.parametrize("tokens", [1, 7, 33, 300])
def test_matmul_batches(impl: str, tokens: int, kernel_rng: np.random.Generator) -> None:
    reg = get_registry()
    if tokens < reg.get("q8_0.matmul", impl).requires.min_batch:
        pytest.skip(f"{impl} starts at {reg.get('q8_0.matmul', impl).requires.min_batch} tokens")
    result = check_case(reg.get("q8_0.matmul", impl), make_q8_0_case(kernel_rng, 4096, 4096, tokens),
                        reg.op("q8_0.matmul").tolerance)
    print(result)
    assert result.ok, str(result)


def test_mmq_ragged_tiles(kernel_rng: np.random.Generator) -> None:
    """mmq where nothing divides: rows past the 64-row tile, tokens past 32, blocks past a 4-block stage."""
    reg = get_registry()
    rows, k, tokens = (int(kernel_rng.integers(65, 80)), 32 * int(kernel_rng.integers(5, 8)),
                       int(kernel_rng.integers(33, 40)))
    result = check_case(reg.get("q8_0.matmul", "mmq"), make_q8_0_case(kernel_rng, rows, k, tokens),
                        reg.op("q8_0.matmul").tolerance)
    assert result.ok, f"{rows}x{k}, {tokens} tokens: {result}"


@pytest.mark.gpu
def test_mmq_random_model_shapes(kernel_rng: np.random.Generator) -> None:
    """mmq on the tensor cores at random sizes around the model's (row and token counts off the tiles)."""
    reg = get_registry()
    for _ in range(4):
        rows = int(kernel_rng.integers(1, 9000))
        k = 32 * int(kernel_rng.integers(1, 260))
        tokens = int(kernel_rng.integers(2, 600))
        result = check_case(reg.get("q8_0.matmul", "mmq"), make_q8_0_case(kernel_rng, rows, k, tokens),
                            reg.op("q8_0.matmul").tolerance)
        assert result.ok, f"{rows}x{k}, {tokens} tokens: {result}"
