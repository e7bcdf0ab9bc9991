"""Routed experts grouped by expert (ds4nb.kernels.moe_grouped) against the per-slot kernels and the twins.

``moe.group_slots`` must equal a numpy stable argsort; the grouped gate/up and
matvec must give the per-slot kernels' outputs bit for bit on the same inputs
(only which thread computes which slot changes), skip the slots whose id is
-1, and match the float64 twins under the "one rounding per value" contract.
The tensor-core tiles (ds4nb.kernels.moe_mma) must give the same bits again,
through their dp4a path and the int8 MMA (in the simulator its twin, so the
kernels' fragments and k order are checked there too).  The ``gpu`` tests repeat the
comparisons at the flash model's shapes (256 experts, n_embd 4096, n_ff_exp
2048, 6 slots a token, prefill chunks of 64 and 512 tokens), where the tiles
run on the int8 MMA, and print the timings of every path.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType
from numba import cuda

from ds4nb.kernels import moe as M
from ds4nb.kernels import moe_grouped as G
from ds4nb.kernels import moe_mma as T
from ds4nb.kernels.activation import alloc_q8_K, q8_K_to_device
from ds4nb.kernels.parity import CONTRACT_RATE, contract_error
from ds4nb.plugins import get_registry
from ds4nb.quants import random_blocks
from ds4nb.quants.repack import repack

Q = GGMLQuantizationType


def _nan_out(n: int):
    return cuda.to_device(np.full(n, np.nan, np.float32))


def _bits(a) -> np.ndarray:
    return a.copy_to_host().view(np.uint32)


def _device_groups(sel: np.ndarray, n_expert: int, room_k: int = 0) -> G.SlotGroups:
    """``sel`` grouped on the device; with ``room_k``, staging room for rows of ``room_k`` values (and 3 more slots
    than ``sel``, as the engine's scratch has room for a whole chunk)."""
    acts = G.alloc_staged_acts(sel.size + 3, room_k) if room_k else None
    out = G.SlotGroups(cuda.to_device(np.full(sel.size, 0x5A5A5A5A, np.int32)),
                       cuda.to_device(np.full(n_expert + 1, 0x5A5A5A5A, np.int32)), acts)
    return G.group_slots(cuda.to_device(sel.astype(np.int32)), out=out)


# ---------------------------------------------------------------------------
# group_slots
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "n_expert", "skipped"), [
    (1, 3, 0.0),      # one slot
    (15, 5, 0.2),     # a tiny prefill: T=5, n_used=3
    (45, 6, 0.3),     # several chunks of the simulator's 16 threads
    (33, 40, 0.1),    # more experts than threads: several counts a thread in the prefix sum
    (12, 4, 1.0),     # every slot skipped
])
def test_group_slots_is_a_stable_argsort(n: int, n_expert: int, skipped: float, kernel_rng) -> None:
    sel = kernel_rng.integers(0, n_expert, n)
    sel[kernel_rng.random(n) < skipped] = -1
    sel[kernel_rng.random(n) < 0.05] = n_expert + 2      # out of range: not in this tensor either
    groups = _device_groups(sel, n_expert)
    order, offsets = G.group_slots_ref(sel, n_expert)
    got_order, got_offsets = groups.order.copy_to_host(), groups.offsets.copy_to_host()
    assert np.array_equal(got_offsets, offsets), (sel, got_offsets, offsets)
    assert np.array_equal(got_order, order), (sel, got_order, order)
    # the twin is what the docs say: slots by expert, ascending within one, the skipped ones last as -1
    valid = (sel >= 0) & (sel < n_expert)
    assert np.array_equal(np.sort(order[:valid.sum()]), np.flatnonzero(valid))
    for e in range(n_expert):
        assert np.array_equal(order[offsets[e]:offsets[e + 1]], np.flatnonzero(sel == e))


def test_group_slots_ref_matches_numpy_stable_argsort(kernel_rng) -> None:
    sel = kernel_rng.integers(-1, 9, 200)
    order, offsets = G.group_slots_ref(sel, 9)
    valid = sel >= 0
    want = np.flatnonzero(valid)[np.argsort(sel[valid], kind="stable")]
    assert np.array_equal(order[:want.size], want) and (order[want.size:] == -1).all()
    assert offsets[-1] == want.size and np.array_equal(np.diff(offsets), np.bincount(sel[valid], minlength=9))


# ---------------------------------------------------------------------------
# grouped expert ops == per-slot expert ops, bit for bit (simulator: tiny shapes)
# ---------------------------------------------------------------------------


def _gate_up_both(rng, qtype, e, n, k, t, n_used, sel, lpr=None):
    """(grouped mid, per-slot mid, twin) on the same random experts, router weights and tokens."""
    graw, gw = M._experts(rng, qtype, e, n, k)
    uraw, uw = M._experts(rng, qtype, e, n, k)
    weights = rng.uniform(0.05, 1.0, sel.size).astype(np.float32)
    x = M._x(rng, t, k)
    xd = G._xdeq(x)
    g = G.grouped_ref(graw, qtype, (e, n, k), sel, xd)
    u = G.grouped_ref(uraw, qtype, (e, n, k), sel, xd)
    clamp = float(np.nanquantile(np.abs(np.concatenate([g.ravel(), u.ravel()])), 0.7))
    with np.errstate(invalid="ignore"):
        twin = M.gate_up_ref(g, u, weights, clamp).reshape(-1)
    w_dev = cuda.to_device(weights)
    grouped = _nan_out(sel.size * n)
    G._moe_gate_up_grouped(qtype, gw, uw, _device_groups(sel, e), w_dev, q8_K_to_device(x), clamp, out=grouped,
                           lpr=lpr)
    per_slot = _nan_out(sel.size * n)
    x_slots = q8_K_to_device(np.repeat(x, sel.size // t, axis=0))    # the expanded activation, one row a slot
    M._moe_gate_up(qtype, gw, uw, cuda.to_device(sel), w_dev, x_slots, clamp, out=per_slot, lpr=lpr)
    return grouped, per_slot, twin


# lanes per row: the simulator's one (a lane walks the row's 2 super-blocks) or 2 (one super-block a lane, as
# on the GPU, where each lane owns one: the kernels' loop-free branch and a 2-lane shuffle reduction)
LANES = pytest.mark.parametrize("lpr", [None, 2], ids=["lanes1", "lanes2"])


@LANES
@pytest.mark.parametrize("qtype", M.QTYPES, ids=lambda q: q.name)
def test_gate_up_grouped_equals_per_slot(qtype, lpr, kernel_rng) -> None:
    e, n, k, t, n_used = G._TINY["gate_up"]
    sel = G.tiny_sel(kernel_rng, e, t * n_used)            # an expert on > 8 slots, two experts on none, two -1
    grouped, per_slot, twin = _gate_up_both(kernel_rng, qtype, e, n, k, t, n_used, sel, lpr)
    assert np.array_equal(_bits(grouped), _bits(per_slot))
    got = grouped.copy_to_host().reshape(sel.size, n)
    assert np.isnan(got[sel < 0]).all() and np.isfinite(got[sel >= 0]).all()   # skipped slots untouched
    assert contract_error(got.reshape(-1), twin) <= CONTRACT_RATE


@LANES
@pytest.mark.parametrize("qtype", M.QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("x_per_slot", [True, False], ids=["x_per_slot", "x_per_token"])
def test_matvec_grouped_equals_per_slot(qtype, x_per_slot: bool, lpr, kernel_rng) -> None:
    rng = kernel_rng
    e, n, k, t, n_used = G._TINY["matvec"]
    raw, w = M._experts(rng, qtype, e, n, k)
    sel = G.tiny_sel(rng, e, t * n_used)
    x = M._x(rng, sel.size if x_per_slot else t, k)
    grouped = _nan_out(sel.size * n)
    G._moe_matvec_grouped(qtype, w, _device_groups(sel, e), q8_K_to_device(x), out=grouped, lpr=lpr)
    per_slot = _nan_out(sel.size * n)
    x_slots = x if x_per_slot else np.repeat(x, n_used, axis=0)
    M._moe_matvec(qtype, w, cuda.to_device(sel), q8_K_to_device(x_slots), out=per_slot, lpr=lpr)
    assert np.array_equal(_bits(grouped), _bits(per_slot))
    twin = G.grouped_ref(raw, qtype, (e, n, k), sel, G._xdeq(x)).astype(np.float32).reshape(-1)
    assert contract_error(grouped.copy_to_host(), twin) <= CONTRACT_RATE


def _gate_up_tiles_vs_per_slot(rng, qtype, lpr=None, room_k=0, **knobs) -> None:
    e, n, k, t, n_used = G._TINY["gate_up"]
    sel = G.tiny_sel(rng, e, t * n_used)
    _, gw = M._experts(rng, qtype, e, n, k)
    _, uw = M._experts(rng, qtype, e, n, k)
    weights = cuda.to_device(rng.uniform(0.05, 1.0, sel.size).astype(np.float32))
    x = M._x(rng, t, k)
    tiles, per_slot = _nan_out(sel.size * n), _nan_out(sel.size * n)
    T._moe_gate_up_tiles(qtype, gw, uw, _device_groups(sel, e, room_k), weights, q8_K_to_device(x), 0.5, out=tiles,
                         lpr=lpr, **knobs)
    M._moe_gate_up(qtype, gw, uw, cuda.to_device(sel), weights, q8_K_to_device(np.repeat(x, n_used, axis=0)), 0.5,
                   out=per_slot, lpr=lpr)
    assert np.array_equal(_bits(tiles), _bits(per_slot))
    got = tiles.copy_to_host().reshape(sel.size, n)
    assert np.isnan(got[sel < 0]).all() and np.isfinite(got[sel >= 0]).all()   # skipped slots untouched


def _matvec_tiles_vs_per_slot(rng, qtype, lpr=None, room_k=0, **knobs) -> None:
    e, n, k, t, n_used = G._TINY["matvec"]
    _, w = M._experts(rng, qtype, e, n, k)
    sel = G.tiny_sel(rng, e, t * n_used)
    x = M._x(rng, sel.size, k)                 # one row a slot, as the down projection's
    tiles, per_slot = _nan_out(sel.size * n), _nan_out(sel.size * n)
    T._moe_matvec_tiles(qtype, w, _device_groups(sel, e, room_k), q8_K_to_device(x), out=tiles, lpr=lpr, **knobs)
    M._moe_matvec(qtype, w, cuda.to_device(sel), q8_K_to_device(x), out=per_slot, lpr=lpr)
    assert np.array_equal(_bits(tiles), _bits(per_slot))
    assert np.isnan(tiles.copy_to_host().reshape(sel.size, n)[sel < 0]).all()


# the tiles reproduce per-slot kernels of 1, 2 and 4 lanes a row: K = 512 has 2 super-blocks, so with 4 lanes two
# of the pairwise tree's leaves are empty
TILE_LANES = pytest.mark.parametrize("lpr", [None, 2, 4], ids=["lanes1", "lanes2", "lanes4"])


@TILE_LANES
@pytest.mark.parametrize("qtype", T.QTYPES, ids=lambda q: q.name)
def test_gate_up_tiles_equal_per_slot(qtype, lpr, kernel_rng) -> None:
    _gate_up_tiles_vs_per_slot(kernel_rng, qtype, lpr)


@TILE_LANES
@pytest.mark.parametrize("qtype", T.QTYPES, ids=lambda q: q.name)
def test_matvec_tiles_equal_per_slot(qtype, lpr, kernel_rng) -> None:
    _matvec_tiles_vs_per_slot(kernel_rng, qtype, lpr)


# The tiles' other paths: the int8 MMA (through the simulator's twin: a block barrier a call, so the tiny shapes
# with few slots and one or two lanes a row) with each type's k order and IQ2_XXS's two sign selectors, and the
# arithmetic signs on the dp4a path.  The launchers' default (has_int8_mma) is the dp4a path in the simulator.
# Some stage into the groups' own room, larger than the call needs (the engine's case), the others into the
# launcher's.
TILE_PATHS = pytest.mark.parametrize(("qtype", "lpr", "knobs"), [
    (Q.IQ2_XXS, None, {"mma": True, "iq2_signs": "table", "room_k": 1024}),
    (Q.IQ2_XXS, 2, {"mma": True, "iq2_signs": "alu"}),
    (Q.Q2_K, 2, {"mma": True, "room_k": 1024}),
    (Q.IQ2_XXS, None, {"mma": False, "iq2_signs": "alu"}),
], ids=["IQ2_XXS-mma-table-room", "IQ2_XXS-mma-alu-lanes2", "Q2_K-mma-lanes2-room", "IQ2_XXS-dp4a-alu"])


@pytest.mark.parametrize(("t", "div", "k"), [(5, 3, 512), (7, 1, 256)], ids=["per-token", "per-slot"])
def test_stage_slot_acts_is_the_fragment_order(t, div, k, kernel_rng) -> None:
    """stage_slot_acts against numpy: grouped position p's Q8_K row (slot order[p] reads row order[p] // div) with
    word 4 grp + q of super-block b at ((8 b + grp) n + p) 4 + q, its scale at b n + p; skipped slots not staged."""
    n_expert, nb = 6, k // 256
    sel = G.tiny_sel(kernel_rng, n_expert, t * 3)
    x = M._x(kernel_rng, sel.size // div, k)
    xd = q8_K_to_device(x)
    xqs = xd.qs.copy_to_host().reshape(-1, 32, nb)
    xs = xd.d.copy_to_host().reshape(-1, nb)
    groups = _device_groups(sel, n_expert, room_k=k)
    acts = T.stage_slot_acts(groups, xd, nb, div, groups.acts)
    order, offsets = G.group_slots_ref(sel, n_expert)
    n, valid = sel.size, offsets[-1]
    qs = acts.qs.copy_to_host()[:8 * nb * n * 4].reshape(nb, 8, n, 4)
    d = acts.d.copy_to_host()[:nb * n].reshape(nb, n)
    rows = order[:valid] // div
    want_qs = xqs[rows].reshape(valid, 8, 4, nb).transpose(3, 1, 0, 2)    # (b, grp, p, q)
    assert np.array_equal(qs[:, :, :valid], want_qs)
    assert np.array_equal(d[:, :valid].view(np.uint32), xs[rows].T.view(np.uint32))
    with pytest.raises(ValueError, match="staged activations hold"):
        T.stage_slot_acts(groups, xd, nb + 1, div, groups.acts)


@TILE_PATHS
def test_gate_up_tile_paths_equal_per_slot(qtype, lpr, knobs, kernel_rng) -> None:
    _gate_up_tiles_vs_per_slot(kernel_rng, qtype, lpr, **knobs)


@TILE_PATHS
def test_matvec_tile_paths_equal_per_slot(qtype, lpr, knobs, kernel_rng) -> None:
    _matvec_tiles_vs_per_slot(kernel_rng, qtype, lpr, **knobs)


@cuda.jit
def _sign_nibbles_kernel(out):
    s = cuda.threadIdx.x
    out[s] = T.iq2_sign_nibbles(np.uint32(s))


def test_iq2_sign_nibbles_equal_the_sign_table() -> None:
    """The arithmetic sign selectors against the sign table (built with numpy from GGUF's sign bytes)."""
    out = cuda.to_device(np.zeros(128, np.uint32))
    _sign_nibbles_kernel[1, 128](out)
    np.testing.assert_array_equal(out.copy_to_host(), M.iq2_xxs_tables()[1])


@pytest.mark.parametrize("slots", [1, 3])
def test_batch_size_does_not_change_the_bits(slots: int, kernel_rng) -> None:
    """Batches of fewer slots (a tuning knob): the same outputs as batches of 8."""
    rng = kernel_rng
    e, n, k, t, n_used = G._TINY["gate_up"]
    sel = G.tiny_sel(rng, e, t * n_used)
    groups = _device_groups(sel, e)
    _, gw = M._experts(rng, Q.IQ2_XXS, e, n, k)
    _, dw = M._experts(rng, Q.Q2_K, e, n, k)
    weights = cuda.to_device(rng.uniform(0.05, 1.0, sel.size).astype(np.float32))
    x = q8_K_to_device(M._x(rng, t, k))
    outs = []
    for s in (G.SLOTS, slots):
        mid, down = _nan_out(sel.size * n), _nan_out(sel.size * n)
        G._moe_gate_up_grouped(Q.IQ2_XXS, gw, gw, groups, weights, x, 0.5, out=mid, slots=s)
        G._moe_matvec_grouped(Q.Q2_K, dw, groups, x, out=down, slots=s)
        outs.append((_bits(mid), _bits(down)))
    assert all(np.array_equal(a, b) for a, b in zip(*outs))


def test_split_placement_two_grouped_launches(kernel_rng) -> None:
    """Experts split between two copies: each copy's slots grouped on their own (the other's are -1), and the two
    grouped launches together give the one-launch result."""
    rng = kernel_rng
    qtype = Q.IQ2_XXS
    e, n, k, t, n_used = G._TINY["gate_up"]
    _, gw = M._experts(rng, qtype, e, n, k)
    _, uw = M._experts(rng, qtype, e, n, k)
    sel = rng.integers(0, e, t * n_used).astype(np.int32)
    weights = cuda.to_device(rng.uniform(0.05, 1.0, sel.size).astype(np.float32))
    x = q8_K_to_device(M._x(rng, t, k))
    want = _nan_out(sel.size * n)
    G._moe_gate_up_grouped(qtype, gw, uw, _device_groups(sel, e), weights, x, 1.0, out=want)
    mine = rng.random(sel.size) < 0.5
    got = _nan_out(sel.size * n)
    for part in (mine, ~mine):
        G._moe_gate_up_grouped(qtype, gw, uw, _device_groups(np.where(part, sel, -1), e), weights, x, 1.0, out=got)
    assert np.array_equal(_bits(got), _bits(want))


def _routed(reg, gate, up, down, sel, weights, x, clamp, n_expert, grouped: bool):
    """The prefill routed-expert chain, per slot (today's engine) or grouped; returns the routed rows (T, d)."""
    t, d = x.shape
    n_slots = sel.size
    f = gate.shape[1]
    quant = reg.select("act.quantize_q8_K")
    sel_d, w_d = cuda.to_device(sel), cuda.to_device(weights)
    mid = _nan_out(n_slots * f)
    if grouped:
        xk = alloc_q8_K(t, d)
        quant(cuda.to_device(x), out=xk)                      # once per token
        groups = G.alloc_slot_groups(n_slots, n_expert)
        reg.select("moe.group_slots")(sel_d, out=groups)
        reg.select(f"{gate.qtype.name.lower()}.moe_gate_up_grouped")(gate, up, groups, w_d, xk, clamp, out=mid)
    else:
        xk = alloc_q8_K(n_slots, d)
        quant(cuda.to_device(np.repeat(x, n_slots // t, axis=0)), out=xk)   # hc.expand, then once per slot
        reg.select(f"{gate.qtype.name.lower()}.moe_gate_up")(gate, up, sel_d, w_d, xk, clamp, out=mid)
    mk = alloc_q8_K(n_slots, f)
    quant(mid.reshape(n_slots, f), out=mk)
    slot_out = _nan_out(n_slots * d)
    if grouped:
        reg.select(f"{down.qtype.name.lower()}.moe_matvec_grouped")(down, groups, mk, out=slot_out)
    else:
        reg.select(f"{down.qtype.name.lower()}.moe_matvec")(down, sel_d, mk, out=slot_out)
    routed = _nan_out(t * d)
    reg.select("moe.slot_sum")(slot_out, t, n_slots // t, out=routed)
    return mid, routed


def test_routed_chain_grouped_equals_per_slot(kernel_rng) -> None:
    """IQ2_XXS gate/up and Q2_K down (the flash model's types) through the whole prefill chain."""
    rng, reg = kernel_rng, get_registry()
    n_expert, d, f, t, n_used = 5, 256, 256, 3, 2      # K = 256: the smallest rows; few slots (simulator time)
    gate, up = (repack(random_blocks(Q.IQ2_XXS, (n_expert, f, d), rng, rms=0.02), Q.IQ2_XXS,
                       (n_expert, f, d)).to_device() for _ in range(2))
    down = repack(random_blocks(Q.Q2_K, (n_expert, d, f), rng, rms=0.02), Q.Q2_K, (n_expert, d, f)).to_device()
    sel = np.stack([rng.permutation(n_expert)[:n_used] for _ in range(t)]).reshape(-1).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, sel.size).astype(np.float32)
    x = rng.standard_normal((t, d)).astype(np.float32)
    mid_g, routed_g = _routed(reg, gate, up, down, sel, weights, x, 0.05, n_expert, grouped=True)
    mid_s, routed_s = _routed(reg, gate, up, down, sel, weights, x, 0.05, n_expert, grouped=False)
    assert np.array_equal(_bits(mid_g), _bits(mid_s))
    assert np.array_equal(_bits(routed_g), _bits(routed_s)) and np.isfinite(routed_g.copy_to_host()).all()


# ---------------------------------------------------------------------------
# flash shapes on a GPU
# ---------------------------------------------------------------------------

FLASH = {"n_expert": 256, "n_embd": 4096, "n_ff": 2048, "n_used": 6}
#: (slots a batch, launch-bounds blocks per SM) of the grouped kernels timed at flash shapes
VARIANTS = [(8, 0), (8, 3)]
#: knobs of the tensor-core tiles timed at flash shapes (IQ2_XXS gate/up and Q2_K down; Q2_K has no sign knob)
TILE_VARIANTS = [{"min_blocks": 0}, {"min_blocks": 4}, {"min_blocks": 0, "iq2_signs": "alu"},
                 {"min_blocks": 4, "iq2_signs": "alu"}]


@pytest.fixture(scope="module")
def flash_experts():
    rng = np.random.default_rng(1234)
    e, d, f = FLASH["n_expert"], FLASH["n_embd"], FLASH["n_ff"]
    gate, up = (repack(random_blocks(Q.IQ2_XXS, (e, f, d), rng, rms=0.02), Q.IQ2_XXS, (e, f, d)).to_device()
                for _ in range(2))
    down = repack(random_blocks(Q.Q2_K, (e, d, f), rng, rms=0.02), Q.Q2_K, (e, d, f)).to_device()
    return gate, up, down


def _time_us(fn, reps: int = 20) -> float:
    fn()
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) * 1e3 / reps


@pytest.mark.gpu
@pytest.mark.parametrize("n_tok", [64, 512])
def test_flash_shapes_grouped_equals_per_slot(flash_experts, n_tok: int, kernel_rng) -> None:
    gate, up, down = flash_experts
    rng, reg = kernel_rng, get_registry()
    e, d, f, n_used = FLASH["n_expert"], FLASH["n_embd"], FLASH["n_ff"], FLASH["n_used"]
    sel = G.model_sel(rng, e, n_tok, n_used)
    n_slots = sel.size
    weights = cuda.to_device(rng.uniform(0.05, 1.0, n_slots).astype(np.float32))
    x = M._x(rng, n_tok, d)
    clamp = 1.0

    groups = G.alloc_slot_groups(n_slots, e)
    sel_d = cuda.to_device(sel)
    G.group_slots(sel_d, out=groups)
    order, offsets = G.group_slots_ref(sel, e)
    assert np.array_equal(groups.order.copy_to_host(), order)
    assert np.array_equal(groups.offsets.copy_to_host(), offsets)

    xk = q8_K_to_device(x)                                            # one row a token
    x_slots = q8_K_to_device(np.repeat(x, n_used, axis=0))          # one row a slot
    mid_g, mid_s = _nan_out(n_slots * f), _nan_out(n_slots * f)
    gate_up_g = lambda: G._moe_gate_up_grouped(Q.IQ2_XXS, gate, up, groups, weights, xk, clamp, out=mid_g)
    gate_up_s = lambda: M._moe_gate_up(Q.IQ2_XXS, gate, up, sel_d, weights, x_slots, clamp, out=mid_s)
    gate_up_g()
    gate_up_s()
    assert np.array_equal(_bits(mid_g), _bits(mid_s))
    assert np.isfinite(mid_g.copy_to_host()).all()

    mk = alloc_q8_K(n_slots, f)
    reg.select("act.quantize_q8_K")(mid_s.reshape(n_slots, f), out=mk)
    out_g, out_s = _nan_out(n_slots * d), _nan_out(n_slots * d)
    down_g = lambda: G._moe_matvec_grouped(Q.Q2_K, down, groups, mk, out=out_g)
    down_s = lambda: M._moe_matvec(Q.Q2_K, down, sel_d, mk, out=out_s)
    down_g()
    down_s()
    assert np.array_equal(_bits(out_g), _bits(out_s))
    assert np.isfinite(out_g.copy_to_host()).all()

    group_us = _time_us(lambda: G.group_slots(sel_d, out=groups))
    t = {"gate_up per-slot": _time_us(gate_up_s), "down per-slot": _time_us(down_s)}
    variants = {f"grouped slots={slots} min_blocks={mb}": (G._moe_gate_up_grouped, G._moe_matvec_grouped,
                                                            {"slots": slots, "min_blocks": mb})
                for slots, mb in VARIANTS}
    variants.update({"mma tiles " + " ".join(f"{k}={v}" for k, v in kw.items()):
                     (T._moe_gate_up_tiles, T._moe_matvec_tiles, kw) for kw in TILE_VARIANTS})
    for name, (gate_up, matvec, kw) in variants.items():   # the tuning knobs: each variant bit-identical, then timed
        mid_v, out_v = _nan_out(n_slots * f), _nan_out(n_slots * d)
        gu = functools.partial(gate_up, Q.IQ2_XXS, gate, up, groups, weights, xk, clamp, out=mid_v, **kw)
        dn = functools.partial(matvec, Q.Q2_K, down, groups, mk, out=out_v, **kw)
        gu()
        dn()
        assert np.array_equal(_bits(mid_v), _bits(mid_s)) and np.array_equal(_bits(out_v), _bits(out_s)), name
        t[f"gate_up {name}"] = _time_us(gu)
        t[f"down {name}"] = _time_us(dn)
    print(f"\nT={n_tok} ({n_slots} slots, {int((np.diff(offsets) > 0).sum())} experts used): group_slots "
          f"{group_us:.1f} us\n" + "\n".join(f"  {k:45s} {v:8.1f} us" for k, v in t.items()))
