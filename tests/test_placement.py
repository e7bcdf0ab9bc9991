"""Placement plans, the built-in policies, the chooser and the roofline, checked against independent sums.

Catalogs come from the tensor schema (``expected_tensors``), sized as the
synthetic writer would write them, so the real 43-layer flash shape costs no
file.  Budgets and usage profiles are fresh random draws (the seed is
printed, ``DS4NB_TEST_SEED`` pins it).
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

from ds4nb.cache.choose import choose_placement, default_policy, placement_request
from ds4nb.cache.options import GpuBudget, PlacementOptions
from ds4nb.cache.plan import DeviceMemory, PlacementPlan, ProvidedPolicy, engine_tensors
from ds4nb.cache.policies import BUILTIN_POLICIES
from ds4nb.cache.roofline import role_costs, roofline
from ds4nb.cache.usage import ExpertUsage
from ds4nb.errors import Ds4Error
from ds4nb.model import TensorInfo, expected_tensors
from ds4nb.model.presets import flash_config, small_config, tiny_config

POLICIES = {p.name: ProvidedPolicy(p, "ds4nb", builtin=True) for p in BUILTIN_POLICIES}
BIG_GPU = DeviceMemory("big GPU", 1 << 40, 1 << 40)

# partial's order, written out here independently of ds4nb.cache.policies
RESIDENT = {"norm", "hc", "router", "attn_sinks"}
CLASSES = [{"attn_q_a", "attn_q_b", "attn_kv", "attn_output"}, {"compressor", "indexer"}, {"shared_expert"},
           {"output"}, {"token_embd"}]


def spec_catalog(cfg, experts: tuple[Q, Q] = (Q.IQ2_XXS, Q.Q2_K)) -> list[TensorInfo]:
    """The tensors ``ds4nb synth`` writes for ``cfg``, sized from the schema (routed experts: gate/up, down types)."""
    out = []
    for spec in expected_tensors(cfg):
        if not spec.synth:
            continue
        q = spec.qtypes[0]
        if spec.role == "routed_expert":
            q = experts[1] if "down" in spec.name else experts[0]
        block, size = GGML_QUANT_SIZES[q]
        out.append(TensorInfo(spec.name, spec.role, spec.layer, q, spec.shape, math.prod(spec.shape) // block * size,
                              0, np.empty(0, np.uint8)))
    return out


@pytest.fixture
def rng():
    seed = int(os.environ.get("DS4NB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"DS4NB_TEST_SEED={seed}")
    return np.random.default_rng(seed)


def choose(catalog, policy=None, budget=None, usage=None, device=BIG_GPU, reserve=0):
    opts = PlacementOptions(policy=policy, gpu_budget=None if budget is None else GpuBudget(str(budget), nbytes=budget),
                            expert_usage=usage)
    return choose_placement(catalog, device, opts, reserve_bytes=reserve, policies=POLICIES)


def random_usage(rng, catalog, *, zero_layer: bool = False) -> ExpertUsage:
    layers = sorted({t.layer for t in catalog if t.role == "routed_expert"})
    n = next(t.shape[0] for t in catalog if t.role == "routed_expert")
    counts = rng.integers(0, 1000, (len(layers), n)) * (rng.random((len(layers), n)) < 0.7)
    if zero_layer:
        counts[rng.integers(len(layers))] = 0
    return ExpertUsage("test", tuple(tuple(int(c) for c in row) for row in counts))


# ---------------------------------------------------------------------------
# the plan


def test_routed_expert_tensors_split_into_whole_experts() -> None:
    for experts in ((Q.IQ2_XXS, Q.Q2_K), (Q.Q4_K, Q.Q4_K)):
        for t in spec_catalog(flash_config(), experts):
            if t.role == "routed_expert":
                assert len(t.shape) == 3 and t.nbytes % t.shape[0] == 0, t.name
                assert t.nbytes // t.shape[0] == t.shape[1] * t.row_bytes


def test_plan_bytes_are_exact_per_expert(rng) -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    placements, want_device = {}, 0
    for t in cat:
        if t.role == "routed_expert":
            ids = frozenset(int(e) for e in np.flatnonzero(rng.random(t.shape[0]) < 0.5))
            placements[t.name] = ids
            want_device += len(ids) * (t.shape[1] * t.row_bytes)
        else:
            placements[t.name] = "device" if rng.random() < 0.5 else "mapped"
            want_device += t.nbytes if placements[t.name] == "device" else 0
    plan = PlacementPlan.build("test", cat, placements)
    assert plan.device_bytes == want_device
    assert plan.device_bytes + plan.mapped_bytes == sum(t.nbytes for t in cat)
    for t in cat:
        if t.role == "routed_expert":
            ids = placements[t.name]
            assert plan.device_experts(t) == ids
            assert plan.where(t.name) == ("device" if len(ids) == t.shape[0] else "split" if ids else "mapped")
        else:
            assert plan.where(t.name) == placements[t.name]


def test_plan_build_refuses_bad_placements() -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    ok = {t.name: "device" for t in cat}
    exps = next(t for t in cat if t.role == "routed_expert")
    norm = next(t for t in cat if t.role == "norm")
    cases = [
        ({k: v for k, v in ok.items() if k != norm.name}, f"left 1 tensor unplaced (e.g. {norm.name})"),
        ({**ok, "blk.99.nope.weight": "device"}, "placed 1 tensor that the model does not have (e.g. 'blk.99.nope.weight')"),
        ({**ok, norm.name: "gpu"}, f"placed {norm.name} as 'gpu'"),
        ({**ok, norm.name: frozenset({0})}, f"split {norm.name} by expert, but it is not a routed-expert tensor"),
        ({**ok, exps.name: frozenset({exps.shape[0]})}, f"expert {exps.shape[0]} of {exps.name}"),
        ({**ok, exps.name: frozenset({True})}, "expert True"),
    ]
    for placements, message in cases:
        with pytest.raises(Ds4Error, match="^placement policy 'x' ") as e:
            PlacementPlan.build("x", cat, placements)
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(Ds4Error, match="expected a mapping"):
        PlacementPlan.build("x", cat, [("a", "device")])  # type: ignore[arg-type]
    every = PlacementPlan.build("x", cat, {**ok, exps.name: frozenset(range(exps.shape[0]))})
    none = PlacementPlan.build("x", cat, {**ok, exps.name: frozenset()})
    assert every.where(exps.name) == "device" and none.where(exps.name) == "mapped"


# ---------------------------------------------------------------------------
# the policies


def reference_partial(cat, budget, usage=None) -> dict[str, object]:
    """partial's plan, recomputed the plain way: classes in order, first fit, then (layer, expert) units."""
    place: dict[str, object] = {t.name: "mapped" for t in cat}
    left = budget
    order = [t for t in cat if t.role in RESIDENT or len(t.shape) == 1]
    for roles in CLASSES:
        order += [t for t in cat if t.role in roles and not (t.role in RESIDENT or len(t.shape) == 1)]
    for t in order:
        if t.nbytes <= left:
            place[t.name] = "device"
            left -= t.nbytes
    by_layer = defaultdict(list)
    for t in cat:
        if t.role == "routed_expert":
            by_layer[t.layer].append(t)
    hashed = {t.layer for t in cat if "tid2eid" in t.name}
    layers = [il for il in sorted(by_layer) if il not in hashed] + [il for il in sorted(by_layer) if il in hashed]
    units = [(il, e) for il in layers for e in range(by_layer[il][0].shape[0])]
    if usage is not None:
        counts = np.array(usage.counts, dtype=np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
        units.sort(key=lambda u: (-share[u], u[0], u[1]))
    chosen = defaultdict(set)
    for il, e in units:
        size = sum(t.nbytes // t.shape[0] for t in by_layer[il])
        if size <= left:
            left -= size
            for t in by_layer[il]:
                chosen[t.name].add(e)
    for name, ids in chosen.items():
        n = next(t.shape[0] for t in cat if t.name == name)
        place[name] = "device" if len(ids) == n else frozenset(ids)
    return place


@pytest.mark.parametrize("cfg", [tiny_config(n_vocab=512), small_config(n_vocab=129280), flash_config()],
                         ids=["tiny", "small", "flash"])
def test_partial_fills_the_budget_in_priority_order(rng, cfg) -> None:
    cat = spec_catalog(cfg)
    total = sum(t.nbytes for t in cat)
    resident = sum(t.nbytes for t in cat if t.role in RESIDENT or len(t.shape) == 1)
    for _ in range(6):
        budget = int(rng.integers(resident, total + 1))
        usage = random_usage(rng, cat) if rng.random() < 0.5 else None
        plan = choose(cat, "partial", budget, usage)
        assert dict(plan.placements) == reference_partial(cat, budget, usage), budget
        assert plan.device_bytes <= budget
        assert plan.device_bytes == sum(plan.tensor_device_bytes(t) for t in cat)


def test_partial_keeps_the_most_used_experts(rng) -> None:
    cat = spec_catalog(small_config(n_vocab=129280))
    usage = random_usage(rng, cat, zero_layer=True)
    experts = [t for t in cat if t.role == "routed_expert"]
    n_layer, n_expert = len(usage.counts), experts[0].shape[0]
    unit = sum(t.nbytes for t in experts) // (n_layer * n_expert)  # all layers share one quant mix here
    dense = sum(t.nbytes for t in cat if t.role != "routed_expert")
    m = int(rng.integers(1, n_layer * n_expert))
    plan = choose(cat, "partial", dense + m * unit + unit - 1, usage)
    counts = np.array(usage.counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    layer, expert = np.divmod(np.arange(n_layer * n_expert), n_expert)
    best = np.lexsort((expert, layer, -share.ravel()))[:m]
    want = {(int(layer[i]), int(expert[i])) for i in best}
    got = {(t.layer, e) for t in experts for e in plan.device_experts(t)}
    assert got == want
    assert all(plan.where(t.name) == "device" for t in cat if t.role != "routed_expert")


def test_partial_without_usage_goes_layer_by_layer_hash_layers_last() -> None:
    cfg = tiny_config(n_vocab=512)
    cat = spec_catalog(cfg)
    experts = [t for t in cat if t.role == "routed_expert"]
    per_layer = {t.layer: 0 for t in experts}
    for t in experts:
        per_layer[t.layer] += t.nbytes
    first, second = [il for il in sorted(per_layer) if not cfg.is_hash_layer(il)][:2]
    assert cfg.n_hash_layer >= 1 and first == cfg.n_hash_layer    # the hash layers come first in the model
    dense = sum(t.nbytes for t in cat if t.role != "routed_expert")
    n = experts[0].shape[0]
    plan = choose(cat, "partial", dense + per_layer[first] + 3 * per_layer[second] // n)
    ids = {il: set.intersection(*(set(plan.device_experts(t)) for t in experts if t.layer == il)) for il in per_layer}
    assert ids[first] == set(range(n)) and ids[second] == {0, 1, 2}
    assert not any(ids[il] for il in per_layer if il not in (first, second))
    assert {plan.where(t.name) for t in experts if t.layer == second} == {"split"}
    everything_else = sum(per_layer[il] for il in per_layer if cfg.is_hash_layer(il) is False)
    plan = choose(cat, "partial", dense + everything_else)
    assert {plan.where(t.name) for t in experts} == {"device", "mapped"}
    assert all((plan.where(t.name) == "mapped") == cfg.is_hash_layer(t.layer) for t in experts)


def test_partial_refuses_to_map_what_must_stay_resident() -> None:
    cat = spec_catalog(small_config(n_vocab=129280))
    resident = sum(t.nbytes for t in cat if t.role in RESIDENT or len(t.shape) == 1)
    plan = choose(cat, "partial", resident)
    assert {t.name for t in cat if plan.where(t.name) == "device"} == \
        {t.name for t in cat if t.role in RESIDENT or len(t.shape) == 1}
    with pytest.raises(Ds4Error, match="keeps norms, hyper-connections, router and other small tensors") as e:
        choose(cat, "partial", resident - 1)
    assert "\n" not in str(e.value) and "--placement direct" in str(e.value)
    with pytest.raises(Ds4Error, match="keeps norms"):  # no budget: free memory less the reserve decides
        choose(cat, "partial", device=DeviceMemory("small GPU", 1 << 30, resident + 1000), reserve=1001)


def test_full_and_direct() -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    total = sum(t.nbytes for t in cat)
    full = choose(cat, "full", total)
    assert full.device_bytes == total and full.mapped_bytes == 0 and full.policy == "full"
    direct = choose(cat, "direct", 0)
    assert direct.device_bytes == 0 and direct.mapped_bytes == total
    assert {direct.where(t.name) for t in cat} == {"mapped"}
    with pytest.raises(Ds4Error) as e:
        choose(cat, "full", total - 1)
    msg = str(e.value)
    assert "does not fit the GPU with the 'full' placement" in msg and "--placement partial" in msg
    assert "larger --gpu-budget" in msg and "\n" not in msg
    with pytest.raises(Ds4Error) as e:  # no budget given: nothing about --gpu-budget
        choose(cat, "full", device=DeviceMemory("small GPU", 1 << 30, total + 10), reserve=11)
    assert "small GPU has" in str(e.value) and "--gpu-budget" not in str(e.value)


def test_default_is_full_when_it_fits_else_partial(rng) -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    total = sum(t.nbytes for t in cat)
    assert choose(cat, budget=total).policy == "full"
    assert choose(cat, budget=total - 1).policy == "partial"
    free = int(rng.integers(total // 2, 2 * total))
    device = DeviceMemory("GPU", 2 * free, free)
    plan = choose(cat, device=device, reserve=1000)
    assert plan.policy == ("full" if total <= free - 1000 else "partial")
    assert default_policy(placement_request(cat, device, PlacementOptions(), reserve_bytes=1000)) == plan.policy


def test_budget_over_free_memory_and_shares(rng) -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    device = DeviceMemory("GPU", 10 << 30, 6 << 30)
    reserve = int(rng.integers(0, 1 << 30))
    assert choose(cat, "direct", (6 << 30) - reserve, device=device, reserve=reserve).policy == "direct"
    with pytest.raises(Ds4Error, match=r"is more than the GPU \(GPU\) can give weights") as e:
        choose(cat, "direct", (6 << 30) - reserve + 1, device=device, reserve=reserve)
    assert "\n" not in str(e.value)
    pct = int(rng.integers(1, 60))
    request = placement_request(cat, device, PlacementOptions(gpu_budget=GpuBudget.parse(f"{pct}%")),
                                reserve_bytes=0)
    assert request.weight_budget == (10 << 30) * pct // 100  # a share of total memory, not of free
    with pytest.raises(Ds4Error, match="more than the GPU"):
        placement_request(cat, device, PlacementOptions(gpu_budget=GpuBudget.parse("61%")), reserve_bytes=0)


def test_unknown_policy_and_argument() -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    with pytest.raises(Ds4Error, match=r"unknown placement policy 'nope' \(known: direct, full, partial\)"):
        choose(cat, "nope")
    with pytest.raises(Ds4Error, match="placement policy 'full' takes no argument"):
        choose_placement(cat, BIG_GPU, PlacementOptions(policy="full", policy_arg="x"), reserve_bytes=0,
                         policies=POLICIES)


def test_usage_profile_must_match_the_model(rng) -> None:
    cat = spec_catalog(tiny_config(n_vocab=512))
    usage = random_usage(rng, cat)
    with pytest.raises(Ds4Error, match="has 3 layers, the model has 4"):
        choose(cat, "partial", usage=ExpertUsage("m", usage.counts[:3], "u.json"))
    short = usage.counts[:2] + (usage.counts[2][:-1],) + usage.counts[3:]
    with pytest.raises(Ds4Error, match="u.json: layer 2 has 7 counts, the model has 8 experts"):
        choose(cat, "partial", usage=ExpertUsage("m", short, "u.json"))


# ---------------------------------------------------------------------------
# roofline


def test_roofline_against_an_independent_sum(rng) -> None:
    cfg = flash_config()
    cat = spec_catalog(cfg)
    k, n = cfg.n_expert_used, cfg.n_expert
    usage = random_usage(rng, cat, zero_layer=True) if rng.random() < 0.5 else None
    budget = int(rng.integers(sum(t.nbytes for t in cat) // 4, sum(t.nbytes for t in cat)))
    plan = choose(cat, "partial", budget, usage)
    dev = host = 0.0
    for t in cat:
        if t.role == "routed_expert":
            counts = np.array(usage.counts[t.layer], dtype=np.float64) if usage else np.ones(n)
            frac = np.minimum(k * counts / counts.sum(), 1) if counts.sum() else np.full(n, k / n)
            on = np.zeros(n, bool)
            on[list(plan.device_experts(t))] = True
            dev += float((frac * on).sum()) * t.nbytes / n
            host += float((frac * ~on).sum()) * t.nbytes / n
            continue
        read = t.nbytes
        if t.name == "token_embd.weight" or t.name.endswith("ffn_gate_tid2eid.weight"):
            read = t.nbytes // t.shape[0]  # one row per token
        if plan.where(t.name) == "device":
            dev += read
        else:
            host += read
    r = roofline(plan, cat, k, device_bw=3e12, host_bw=50e9, usage=usage)
    assert r.per_token.device == pytest.approx(dev, rel=1e-12)
    assert r.per_token.host == pytest.approx(host, rel=1e-12)
    assert r.tokens_per_second == pytest.approx(1 / (dev / 3e12 + host / 50e9), rel=1e-12)
    rows = role_costs(plan, cat, k, usage)
    assert sum(r.tensors for r in rows) == len(cat)
    assert sum(r.held.device for r in rows) == plan.device_bytes
    assert sum(r.held.host for r in rows) == plan.mapped_bytes
    assert sum(r.per_token.device for r in rows) == pytest.approx(dev, rel=1e-12)


def test_full_flash_reads_what_the_bench_counts() -> None:
    """Uniform routing, everything on the GPU: the per-token bytes bench/engine.py's token_bytes counts."""
    cfg = flash_config()
    cat = spec_catalog(cfg)
    want = sum(t.nbytes * cfg.n_expert_used // cfg.n_expert if t.role == "routed_expert" else
               t.row_bytes if t.role == "token_embd" or t.name.endswith("tid2eid.weight") else t.nbytes
               for t in cat)
    r = roofline(choose(cat, "full"), cat, cfg.n_expert_used, device_bw=1.0, host_bw=1.0)
    assert r.per_token.host == 0 and r.per_token.device == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------
# the engine reads what it is given, wherever it lives


def test_engine_with_experts_split_matches_the_oracle(tiny_model) -> None:
    """Under the simulator: a partial plan with split expert tensors gives the oracle's logits, bit for bit."""
    from ds4nb.engine.session import CudaEngine
    from ds4nb.reference.engine import CpuEngine

    cat = engine_tensors(tiny_model)
    experts = [t for t in cat if t.role == "routed_expert"]
    dense = sum(t.nbytes for t in cat if t.role != "routed_expert")
    budget = dense + sum(t.nbytes for t in experts) // 3
    options = PlacementOptions(policy="partial", gpu_budget=GpuBudget(str(budget), nbytes=budget))
    engine = CudaEngine(tiny_model, ctx=16, chunk=2, placement=options)
    assert engine.plan.policy == "partial" and "split" in {engine.plan.where(t.name) for t in experts}
    cpu = CpuEngine(tiny_model)
    tokens = [7, 9]
    assert np.array_equal(engine.prefill(tokens), cpu.prefill(tokens))
    # a decode step: the hash layer's host-mapped experts copied as the step starts (the placement maps the
    # hash layers first), the split layer's copied after its router
    scratch = engine._step.scratch
    assert set(scratch.prefetch) == {il for il in range(tiny_model.config.n_layer)
                                     if tiny_model.config.is_hash_layer(il)} and scratch.stage
    assert np.array_equal(engine.decode(11), cpu.decode(11))
