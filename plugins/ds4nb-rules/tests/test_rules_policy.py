"""The rule-file policy, alone and through ds4nb's chooser (no GPU, no model file)."""

from __future__ import annotations

import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES

from ds4nb.cache.choose import choose_placement
from ds4nb.cache.options import GpuBudget, PlacementOptions
from ds4nb.cache.plan import DeviceMemory, ProvidedPolicy
from ds4nb.errors import Ds4Error, PluginError
from ds4nb.model import TensorInfo, expected_tensors
from ds4nb.model.presets import tiny_config
from ds4nb_rules import RulesPolicy, parse_rules

GPU = DeviceMemory("test GPU", 1 << 30, 1 << 30)
POLICIES = {"rules": ProvidedPolicy(RulesPolicy(), "ds4nb-rules")}


def catalog() -> list[TensorInfo]:
    """The tensors of a tiny DS4 model, sized from the schema (no file)."""
    out = []
    for spec in expected_tensors(tiny_config(n_vocab=512)):
        if not spec.synth:
            continue
        q = spec.qtypes[0]
        block, size = GGML_QUANT_SIZES[q]
        out.append(TensorInfo(spec.name, spec.role, spec.layer, q, spec.shape, math.prod(spec.shape) // block * size,
                              0, np.empty(0, np.uint8)))
    return out


def plan_for(tmp_path: Path, text: str, budget: str | None = None):
    path = tmp_path / "my.rules"
    path.write_text(text)
    opts = PlacementOptions(policy="rules", policy_arg=str(path),
                            gpu_budget=GpuBudget.parse(budget) if budget else None)
    return choose_placement(catalog(), GPU, opts, reserve_bytes=0, policies=POLICIES)


def test_first_match_wins_then_the_default(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "# experts of layers 2+ and the embedding on the host\n"
                              r"blk\.[2-9]\.ffn_.*_exps  host" "\n"
                              r"blk\.\d+\.ffn_  gpu" "\n"
                              "token_embd host\n\n"
                              "default gpu\n")
    for t in catalog():
        if re.search(r"blk\.[2-9]\.ffn_.*_exps", t.name) or t.name == "token_embd.weight":
            want = "mapped"
        else:
            want = "device"
        assert plan.where(t.name) == want, t.name
    assert plan.device_bytes == sum(t.nbytes for t in catalog() if plan.where(t.name) == "device")


def test_random_rules_against_a_direct_evaluation(tmp_path: Path) -> None:
    rng = random.Random()
    fragments = ["attn", "ffn", "exps", "shexp", r"blk\.0\.", r"blk\.3\.", "norm", "hc_", "output", "indexer"]
    lines = [(rng.choice(fragments), rng.choice(["gpu", "host"])) for _ in range(rng.randint(1, 6))]
    default = rng.choice(["gpu", "host"])
    plan = plan_for(tmp_path, "\n".join(f"{p} {w}" for p, w in lines) + f"\ndefault {default}\n")
    for t in catalog():
        where = next((w for p, w in lines if re.search(p, t.name)), default)
        assert plan.where(t.name) == {"gpu": "device", "host": "mapped"}[where], (lines, t.name)


def test_no_default_line_means_gpu() -> None:
    rules = parse_rules("output host\n")
    assert rules.place("output.weight") == "mapped" and rules.place("blk.0.attn_norm.weight") == "device"


@pytest.mark.parametrize("text, message", [
    ("attn cpu\n", "my.rules:1: expected gpu or host, got 'cpu'"),
    ("# fine\nattn(  gpu\n", "my.rules:2: bad regex 'attn('"),
    ("gpu\n", "my.rules:1: expected 'REGEX gpu|host'"),
    ("default gpu\ndefault host\n", "my.rules:2: a second default line"),
])
def test_a_bad_rule_file_is_one_line_naming_the_plugin(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(PluginError) as e:
        plan_for(tmp_path, text)
    assert e.value.plugin == "ds4nb-rules" and message in str(e.value) and "\n" not in str(e.value)


def test_over_the_budget_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="over the weight budget of 1.00 MiB"):
        plan_for(tmp_path, "default gpu\n", budget="1M")
    assert plan_for(tmp_path, "default host\n", budget="1M").device_bytes == 0


def test_needs_a_rule_file(tmp_path: Path) -> None:
    with pytest.raises(Ds4Error, match="needs a rule file"):
        choose_placement(catalog(), GPU, PlacementOptions(policy="rules"), reserve_bytes=0, policies=POLICIES)
    with pytest.raises(Ds4Error, match="cannot read the rule file"):
        choose_placement(catalog(), GPU, PlacementOptions(policy="rules", policy_arg=str(tmp_path / "nope")),
                         reserve_bytes=0, policies=POLICIES)
