"""The routed-expert kernels chained the way a decode step uses them.

x -> act.quantize_q8_K -> iq2_xxs.moe_gate_up (clamped SwiGLU x router weight)
  -> act.quantize_q8_K (per-slot mids) -> q2_k.moe_down_sum
against the reference's routed MoE math (``ds4nb.reference``: exact Q8_K
round trips, ``swiglu_clamped`` with the router weight, the expert sum), both
under docs/model.md's "one rounding per value" numerics: gate / up / each
expert's down product rounded to float32, the mid rounded once, the slot sum
in float64 rounded once.  The mids are then the same float32 values on both
sides (but for a ~1e-7-per-value one-ulp difference, which could move a Q8_K
step), so the routed output must be bit-identical up to the contract's rare
one-ulp differences (``parity.contract_error``).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.plugins import get_registry
from ds4nb.kernels.activation import alloc_q8_K
from ds4nb.kernels.parity import CONTRACT_RATE, contract_error, rel_error
from ds4nb.quants import dequantize, random_blocks
from ds4nb.quants.repack import repack
from ds4nb.reference.ops import swiglu_clamped
from ds4nb.reference.weights import q8_k_round_trip

Q = GGMLQuantizationType


def _routed_moe(rng: np.random.Generator, n_expert: int, d: int, f: int, n_used: int) -> tuple[float, float, float]:
    reg = get_registry()
    graw, uraw = (random_blocks(Q.IQ2_XXS, (n_expert, f, d), rng, rms=0.02) for _ in range(2))
    draw = random_blocks(Q.Q2_K, (n_expert, d, f), rng, rms=0.02)
    gate, up = (repack(r, Q.IQ2_XXS, (n_expert, f, d)).to_device() for r in (graw, uraw))
    down = repack(draw, Q.Q2_K, (n_expert, d, f)).to_device()
    ids = rng.permutation(n_expert)[:n_used].astype(np.int32)
    weights = rng.uniform(0.1, 1.0, n_used).astype(np.float32)
    x = rng.standard_normal(d).astype(np.float32)

    # reference math, expert by expert, from exactly decoded weights and activations
    def expert(raw, e, n, k, qtype):
        per = raw.size // n_expert
        return dequantize(raw[e * per:(e + 1) * per], qtype, (n, k), dtype=np.float64)

    x8 = q8_k_round_trip(x, np.float64)
    gu = [((expert(graw, e, f, d, Q.IQ2_XXS) @ x8).astype(np.float32),
           (expert(uraw, e, f, d, Q.IQ2_XXS) @ x8).astype(np.float32)) for e in ids.tolist()]
    # a clamp that bites: ~30% of the |gate| / |up| values are above it (float32: the kernels' value)
    clamp = float(np.float32(np.quantile(np.abs(np.concatenate([np.concatenate(p) for p in gu])), 0.7)))
    ref = np.zeros(d)
    for (g, u), e, w in zip(gu, ids.tolist(), weights):
        m = swiglu_clamped(g, u, clamp, weight=w)                       # one rounding
        ref += (expert(draw, e, d, f, Q.Q2_K) @ q8_k_round_trip(m, np.float64)).astype(np.float32)
    ref = ref.astype(np.float32)                                        # the slot sum, rounded once

    # device chain
    xq = alloc_q8_K(1, d)
    midq = alloc_q8_K(n_used, f)
    mid = cuda.to_device(np.full(n_used * f, np.nan, np.float32))
    out = cuda.to_device(np.full(d, np.nan, np.float32))
    reg.select("act.quantize_q8_K")(cuda.to_device(x), out=xq)  # one row
    reg.select("iq2_xxs.moe_gate_up")(gate, up, cuda.to_device(ids), cuda.to_device(weights), xq, clamp, out=mid)
    reg.select("act.quantize_q8_K")(mid.reshape(n_used, f), out=midq)
    reg.select("q2_k.moe_down_sum")(down, cuda.to_device(ids), midq, out=out)
    got = out.copy_to_host()
    return contract_error(got, ref), rel_error(got, ref), float(np.abs(got).max())


def test_routed_moe_chain_tiny(kernel_rng: np.random.Generator) -> None:
    differ, err, peak = _routed_moe(kernel_rng, n_expert=4, d=256, f=256, n_used=3)
    assert differ <= CONTRACT_RATE and peak > 0, (differ, err)


@pytest.mark.gpu
def test_routed_moe_chain_model_shapes(kernel_rng: np.random.Generator) -> None:
    differ, err, peak = _routed_moe(kernel_rng, n_expert=16, d=4096, f=2048, n_used=6)
    print(f"routed MoE chain: {differ:.3g} of the values differ (rel error {err:.3g})")
    assert differ <= CONTRACT_RATE and peak > 0, (differ, err)


def test_split_placement_skips_the_other_copys_slots(kernel_rng):
    """Experts split between two copies: each launch writes only its slots, and the two give the whole result."""
    from ds4nb.kernels import moe as M
    from ds4nb.kernels.activation import q8_K_to_device
    from ds4nb.kernels.parity import contract_error

    rng = kernel_rng
    qtype = Q.IQ2_XXS
    e, n, k, n_used = M._TINY["gate_up"]
    graw, gw = M._experts(rng, qtype, e, n, k)
    uraw, uw = M._experts(rng, qtype, e, n, k)
    ids = M._ids(rng, e, n_used)
    weights = rng.uniform(0.05, 1.0, n_used).astype(np.float32)
    x = q8_K_to_device(M._x(rng, 1, k))
    want = cuda.device_array(n_used * n, np.float32)
    M._moe_gate_up(qtype, gw, uw, cuda.to_device(ids), cuda.to_device(weights), x, 1.0, out=want)
    mine = np.zeros(n_used, bool)
    mine[rng.permutation(n_used)[:n_used // 2]] = True
    got = cuda.to_device(np.full(n_used * n, np.nan, np.float32))
    for part in (mine, ~mine):                       # two launches, -1 marking the other launch's slots
        M._moe_gate_up(qtype, gw, uw, cuda.to_device(np.where(part, ids, -1).astype(np.int32)),
                       cuda.to_device(weights), x, 1.0, out=got)
        if part is mine:
            rows = got.copy_to_host().reshape(n_used, n)
            assert np.isnan(rows[~mine]).all() and np.isfinite(rows[mine]).all()
    assert contract_error(got.copy_to_host(), want.copy_to_host()) == 0.0


def test_expert_counts_accumulate(kernel_rng):
    from ds4nb.kernels import moe as M

    counts = cuda.to_device(np.zeros(16, np.int32))
    total = np.zeros(16, np.int64)
    for _ in range(3):
        ids = kernel_rng.integers(0, 16, 6).astype(np.int32)
        M.count_experts(cuda.to_device(ids), out=counts)
        total += np.bincount(ids, minlength=16)
    assert np.array_equal(counts.copy_to_host(), total)


def test_hash_selection_is_the_table_row_of_each_token(kernel_rng):
    """``router.hash_selection`` (a hash layer's experts before its router runs) = ``tid2eid[tokens]``, the
    experts ``router.hash`` selects."""
    from ds4nb.kernels.router import hash_selection

    n_vocab, k, n_tok = 50, 6, 3
    table = kernel_rng.integers(0, 256, (n_vocab, k)).astype(np.int32)
    tokens = kernel_rng.integers(0, n_vocab, n_tok).astype(np.int32)
    out = cuda.to_device(np.full((n_tok, k), -7, np.int32))
    hash_selection(cuda.to_device(table), cuda.to_device(tokens), out=out, k=k)
    assert np.array_equal(out.copy_to_host(), table[tokens])
