"""Placement never changes numerics: the same logits with every weight on the GPU, split, or host-mapped.

CI (simulator): ``tiny`` with a budget that splits the routed experts of the layers between GPU and
host-mapped memory.  GPU: ``small`` through prefill and decode steps, graphs on.
"""

from __future__ import annotations

import numpy as np
import pytest

from ds4nb.cache.options import GpuBudget, PlacementOptions
from ds4nb.cache.residency import SplitExperts
from ds4nb.engine.session import CudaEngine


def _placements(model) -> dict[str, PlacementOptions]:
    """full, partial with a budget that splits some layer's experts, direct."""
    total = sum(t.nbytes for t in model.catalog if t.role is not None)
    experts = sum(t.nbytes for t in model.catalog if t.role == "routed_expert")
    budget = total - experts // 2 - experts // 16      # a little under half the experts: a layer splits
    return {"full": PlacementOptions("full"),
            "partial": PlacementOptions("partial", gpu_budget=GpuBudget.parse(str(budget))),
            "direct": PlacementOptions("direct")}


def _logits(model, placement: PlacementOptions, prompt: list[int], steps: int, **kw) -> tuple[list, CudaEngine]:
    eng = CudaEngine(model, placement=placement, **kw)
    out = [eng.prefill(prompt)]
    for _ in range(steps):
        out.append(eng.decode(int(np.argmax(out[-1]))))
    return out, eng


def _check(model, prompt: list[int], steps: int, **kw) -> None:
    runs = {}
    for name, placement in _placements(model).items():
        runs[name], eng = _logits(model, placement, prompt, steps, **kw)
        kinds = {eng.plan.where(t.name) for t in model.catalog if t.role is not None}
        assert eng.plan.policy == name
        if name == "partial":                          # the case the split kernels exist for
            assert "split" in kinds
            assert any(isinstance(v, SplitExperts) for v in eng.res.tensors.values())
        if name == "direct":
            assert kinds == {"mapped"}
        # decode steps copy the selected host-mapped experts to GPU memory: gate, up and down, partial and direct;
        # the hash layers' (mapped first by partial) as the step starts
        scratch = eng._step.scratch
        roles = {key[0] for key in scratch.stage} | {key[0] for copies, _ in scratch.prefetch.values() for key in copies}
        assert roles == (set() if name == "full" else {"gate", "up", "down"})
        hashed = {il for il in range(model.config.n_layer) if model.config.is_hash_layer(il)}
        assert set(scratch.prefetch) == (set() if name == "full" else hashed)
    for name in ("partial", "direct"):
        for step, (a, b) in enumerate(zip(runs["full"], runs[name])):
            assert np.array_equal(a, b), f"{name}: logits differ from full at step {step}"


def test_placements_give_identical_logits_tiny(tiny_model, exact_prefill) -> None:
    prompt = np.random.default_rng().integers(0, tiny_model.config.n_vocab, 2).tolist()
    _check(tiny_model, prompt, 1, ctx=8, chunk=2)


@pytest.mark.gpu
def test_placements_give_identical_logits_small(small_gguf, exact_prefill) -> None:
    from ds4nb.model import load_model

    model = load_model(small_gguf)
    prompt = np.random.default_rng().integers(0, model.config.n_vocab, 150).tolist()
    _check(model, prompt, 16, ctx=256)
