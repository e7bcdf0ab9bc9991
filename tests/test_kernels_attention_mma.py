"""``attn.decode`` on float64 MMAs (``attention_mma``, ``heads_mma``) against the oracle and ``split_heads8``.

A prefill step of T tokens at consecutive positions, as the engine builds it:
step records (``ds4nb.kernels.step.records``) over a window ring of ``n_swa + T
- 1`` F16 (or F32) rows, compressed rows of ratio 4 with or without the
indexer's per-token selection, per-head sinks, optionally the inverse RoPE.
Fresh random data per run (DS4NB_TEST_SEED pins it), outputs poisoned with
NaN.  docs/model.md "one rounding per value": outputs equal the oracle's and
``split_heads8``'s bit for bit but for rare one-ulp differences.

In the simulator the MMA kernel is asked for explicitly (``mma=True``; its
launcher takes ``split_heads8`` there by default) with tiny shapes: every MMA
costs a block barrier.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda

from ds4nb.kernels import attention as A
from ds4nb.kernels import attention_mma as M
from ds4nb.kernels.parity import CONTRACT_RATE, contract_error
from ds4nb.kernels.registry import DeviceInfo
from ds4nb.kernels.rope import make_test_rope
from ds4nb.kernels.step import N_RAW, NF, POS, ROWS, SELECT, VISIBLE, group_offset, one_record, records
from ds4nb.reference import ops

GRP = group_offset(1)


def poisoned(n: int):
    return cuda.to_device(np.full(n, np.nan, np.float32))


def check_bits(got, ref, what: str) -> float:
    """docs/model.md "one rounding per value": bit-identical but for rare one-ulp differences."""
    got = np.asarray(got, np.float32).reshape(np.shape(ref))
    assert np.isfinite(got).all(), f"{what}: unwritten (NaN) outputs"
    err = contract_error(got, np.asarray(ref, np.float32))
    print(f"{what}: {err:.3g} of the values differ (by one ulp)")
    assert err <= CONTRACT_RATE, f"{what}: {err:.3g} differ (> {CONTRACT_RATE:g} or > 1 ulp)"
    return err


def prefill_step(rng: np.random.Generator, *, n_head: int, head_dim: int, n_tok: int, pos0: int, n_swa: int,
                 top: int, dtype=np.float16, n_rot: int = 16) -> tuple[tuple, dict, np.ndarray]:
    """Device inputs, launcher keywords and the oracle's outputs (T, n_head, head_dim) of a prefill step.

    Compressed rows of ratio 4; ``top`` > 0: the indexer selects ``top`` of them per token (a random choice in a
    random order) once there are more.  ``n_rot`` 0: no inverse RoPE."""
    ring = n_swa + n_tok - 1
    steps = records(pos0, n_tok, n_swa, [(4, top)], ring=ring).reshape(n_tok, NF)
    n_comp = max(int(steps[-1, GRP + ROWS]), 1)
    raw = ops.f16_round(rng.standard_normal((ring, head_dim))).astype(np.float32)
    comp = ops.f16_round(rng.standard_normal((n_comp, head_dim))).astype(np.float32)
    q = (rng.standard_normal((n_tok, n_head, head_dim)) * 2).astype(np.float32)
    sinks = (0.5 * rng.standard_normal(n_head)).astype(np.float32)
    rp = make_test_rope(n_rot, True) if n_rot else None
    sel = np.zeros((n_tok, max(top, 1)), np.int32)
    ref = np.empty((n_tok, n_head, head_dim), np.float32)
    for t in range(n_tok):
        pos, n_raw, rows, k = (int(steps[t, f]) for f in (POS, N_RAW, GRP + ROWS, GRP + SELECT))
        window = raw[(pos - n_raw + 1 + np.arange(n_raw)) % ring]
        if k:
            sel[t] = rng.choice(rows, k, replace=False)
            seen = comp[sel[t]]
        else:
            seen = comp[:int(steps[t, GRP + VISIBLE])]
        out = ops.attention_with_sinks(q[t], np.concatenate([window, seen]), sinks)
        ref[t] = out if rp is None else ops.apply_rope_tail(out, rp, pos, inverse=True)
    inputs = (cuda.to_device(q), cuda.to_device(raw.astype(dtype)), cuda.to_device(comp.astype(dtype)),
              cuda.to_device(sinks), cuda.to_device(sel) if top else None)
    kwargs = dict(steps=cuda.to_device(steps.reshape(-1)), grp=GRP, max_rows=n_swa + (top or n_comp), rope=rp)
    return inputs, kwargs, ref


def run_both(inputs: tuple, kwargs: dict, **knobs) -> tuple[np.ndarray, np.ndarray]:
    """(the MMA kernel's outputs, split_heads8's) for the same step."""
    n = inputs[0].size
    mma, dec = poisoned(n), poisoned(n)
    M.attention_mma(*inputs, out=mma, mma=True, **knobs, **kwargs)
    A.attention_decode(*inputs, out=dec, **kwargs)
    return mma.copy_to_host(), dec.copy_to_host()


STEPS = {
    # (n_head, head_dim, T, pos0, n_swa, top, dtype, n_rot), knobs of the MMA kernel
    "window+compressed, rope": ((8, 64, 4, 30, 8, 0, np.float16, 16), dict(chunk=8)),       # 2 chunks, prefetched
    "indexer selection": ((8, 64, 3, 40, 8, 3, np.float16, 0), dict(chunk=16)),            # 11 of 16 rows
    "f32 rows, 16 heads, 2 warps": ((16, 64, 3, 25, 8, 0, np.float32, 16), dict(warps=2, chunk=8, prefetch=False)),
    "4 heads, first positions": ((4, 32, 5, 0, 8, 2, np.float16, 16), dict(chunk=8)),       # 4 dead heads
}


@pytest.mark.parametrize("case", list(STEPS))
def test_mma_prefill_step_matches_oracle_and_split_heads8(kernel_rng, case):
    (n_head, hd, n_tok, pos0, n_swa, top, dtype, n_rot), knobs = STEPS[case]
    inputs, kwargs, ref = prefill_step(kernel_rng, n_head=n_head, head_dim=hd, n_tok=n_tok, pos0=pos0, n_swa=n_swa,
                                       top=top, dtype=dtype, n_rot=n_rot)
    got, dec = run_both(inputs, kwargs, **knobs)
    check_bits(got, ref, f"heads_mma {case} vs oracle")
    check_bits(got, dec.reshape(ref.shape), f"heads_mma {case} vs split_heads8")


def test_mma_splits_and_a_token_without_rows(kernel_rng):
    """Token 0 has no rows (every split neutral, output 0); token 1's 6 window + 4 selected rows make 2 chunks of
    8 over 3 splits (the third empty), merged by the combine kernel."""
    rng = kernel_rng
    n_head, hd, k = 8, 32, 4
    steps = np.concatenate([one_record(0, n_raw=0), one_record(5, n_raw=6, rows=9, visible=k, select=k)])
    raw = ops.f16_round(rng.standard_normal((6, hd))).astype(np.float32)
    comp = ops.f16_round(rng.standard_normal((9, hd))).astype(np.float32)
    q = (rng.standard_normal((2, n_head, hd)) * 2).astype(np.float32)
    sinks = (0.5 * rng.standard_normal(n_head)).astype(np.float32)
    sel = np.zeros((2, k), np.int32)
    sel[1] = rng.choice(9, k, replace=False)
    ref = np.stack([np.zeros((n_head, hd), np.float32),
                    ops.attention_with_sinks(q[1], np.concatenate([raw, comp[sel[1]]]), sinks)])
    inputs = (cuda.to_device(q), cuda.to_device(raw.astype(np.float16)), cuda.to_device(comp.astype(np.float16)),
              cuda.to_device(sinks), cuda.to_device(sel))
    kwargs = dict(steps=cuda.to_device(steps), grp=GRP, max_rows=6 + k)
    got, dec = run_both(inputs, kwargs, chunk=8, splits=3)
    got = got.reshape(ref.shape)
    assert np.array_equal(got[0], ref[0]), "a token without rows attends to nothing: output 0"
    check_bits(got[1], ref[1], "heads_mma 3 splits vs oracle")
    check_bits(got, dec.reshape(ref.shape), "heads_mma 3 splits vs split_heads8")


def test_launcher_takes_split_heads8_only_without_f64_mma(kernel_rng, monkeypatch):
    inputs, kwargs, ref = prefill_step(kernel_rng, n_head=8, head_dim=32, n_tok=M.MIN_TOKENS, pos0=12, n_swa=8,
                                       top=0)
    # the simulator has no float64 MMA (has_f64_mma() is False): the same kernels as attention_decode, same bits
    out, dec = poisoned(ref.size), poisoned(ref.size)
    M.attention_mma(*inputs, out=out, **kwargs)
    A.attention_decode(*inputs, out=dec, **kwargs)
    assert np.array_equal(out.copy_to_host(), dec.copy_to_host())
    # with float64 MMA: a decode step (one token, 8 heads a block) and a prefill step both take the MMA kernel
    calls = []
    decode = A.attention_decode
    monkeypatch.setattr(A, "attention_decode", lambda *a, **kw: calls.append(a[0].size) or decode(*a, **kw))
    monkeypatch.setattr(M, "has_f64_mma", lambda: True)
    q1 = cuda.to_device(inputs[0].copy_to_host()[:1])
    one = poisoned(ref[0].size)
    M.attention_mma(q1, *inputs[1:], out=one, **kwargs)
    out = poisoned(ref.size)
    M.attention_mma(*inputs, out=out, **kwargs)
    assert calls == []
    check_bits(one.copy_to_host(), ref[0], "heads_mma decode step by default with float64 MMA")
    check_bits(out.copy_to_host(), ref, "heads_mma by default with float64 MMA")


def test_registry_prefers_heads_mma_from_sm80():
    from ds4nb.plugins import get_registry

    reg = get_registry()
    assert reg.select("attn.decode", device=DeviceInfo("h200", (9, 0))).name == "heads_mma"
    assert reg.select("attn.decode", device=DeviceInfo("t4", (7, 5))).name == "split_heads8"


def test_geometry_defaults_and_limits():
    # flash: 16 heads a block, 16-row chunks of F16 rows in ~35 KiB; F32 rows need 8-row chunks
    g = M.mma_geometry(64, 512, 640, 2, 512, warps=8, splits=None)
    assert (g.hpb, g.chunk, g.warps) == (16, 16, 8)
    assert M.shared_bytes(16, 512, 16, 8, 2) <= A.SHARED_BYTES < M.shared_bytes(16, 512, 16, 8, 4)
    assert M.mma_geometry(64, 512, 640, 4, 512, warps=8).chunk == 8
    assert M.mma_geometry(4, 64, 20, 2, 3, warps=8).hpb == 8          # 4 live heads of an 8-head tile
    assert M.mma_geometry(64, 512, 640, 2, 1, warps=8).hpb == 8        # decode: 8 heads a block
    with pytest.raises(ValueError):
        M.mma_geometry(64, 48, 640, 2, 512)                            # head_dim not a multiple of 32
    with pytest.raises(ValueError):
        M.mma_geometry(64, 512, 640, 2, 512, warps=8, chunk=32)        # 32-row chunks overflow 48 KiB
    # a row starts 4 words (mod 32) after the previous one: conflict-free fragment loads
    for hd, isz in ((512, 2), (64, 2), (96, 2), (512, 4), (32, 4)):
        assert M.row_stride(hd, isz) * isz // 4 % 32 == 4 and M.row_stride(hd, isz) * isz % 8 == 0


@pytest.mark.gpu
@pytest.mark.parametrize("top", [512, 0])
def test_mma_flash_prefill_chunk(kernel_rng, top):
    """Flash shapes: 64 heads x 512, a 128-row window, a chunk of 64 tokens past 2048 (the indexer selects 512 of
    ~530 compressed rows, or all visible), F16 rows, inverse RoPE."""
    inputs, kwargs, ref = prefill_step(kernel_rng, n_head=64, head_dim=512, n_tok=64, pos0=2100, n_swa=128, top=top,
                                       n_rot=64)
    got, dec = run_both(inputs, kwargs)
    check_bits(got, ref, f"heads_mma flash top={top} vs oracle")
    check_bits(got, dec.reshape(ref.shape), f"heads_mma flash top={top} vs split_heads8")
