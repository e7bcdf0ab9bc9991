"""Placement options: sizes, --gpu-budget, flags vs environment, expert usage profiles (one-line errors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ds4nb.cache.options import ENV_GPU_BUDGET, ENV_PLACEMENT, GpuBudget, PlacementOptions, parse_size
from ds4nb.cache.usage import ExpertUsage
from ds4nb.errors import Ds4Error, UsageError


@pytest.fixture
def rng():
    seed = int(os.environ.get("DS4NB_TEST_SEED", np.random.SeedSequence().entropy % 2**32))
    print(f"DS4NB_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("text, nbytes", [
    ("24G", 24 * 2**30), ("24GiB", 24 * 2**30), ("24gib", 24 * 2**30), ("24 G", 24 * 2**30), ("24GB", 24 * 10**9),
    ("512M", 512 * 2**20), ("512MiB", 512 * 2**20), ("512mb", 512 * 10**6), ("1.5G", 3 * 2**29), (".5K", 512),
    ("1048576", 2**20), ("7B", 7), ("0", 0), ("2T", 2 * 2**40), (" 3KiB ", 3072), ("1.", 1),
])
def test_sizes(text: str, nbytes: int) -> None:
    assert parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "G", "24Q", "-1G", "1e9", "24 G B", "nan", "inf", "1,5G", "24GiBs", "0x10"])
def test_malformed_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
    with pytest.raises(UsageError) as e:
        GpuBudget.parse(text)
    assert str(e.value).startswith(f"--gpu-budget {text}: not a size") and "\n" not in str(e.value)


def test_random_sizes(rng) -> None:
    units = {"": 1, "K": 2**10, "KiB": 2**10, "KB": 10**3, "M": 2**20, "MiB": 2**20, "MB": 10**6,
             "G": 2**30, "GiB": 2**30, "GB": 10**9, "T": 2**40, "TiB": 2**40, "TB": 10**12}
    for _ in range(50):
        unit = str(rng.choice(list(units)))
        n = int(rng.integers(0, 10**6))
        assert parse_size(f"{n}{unit.lower() if rng.random() < 0.3 else unit}") == n * units[unit]


def test_shares_of_device_memory(rng) -> None:
    total = int(rng.integers(1 << 30, 1 << 40))
    pct = int(rng.integers(1, 101))
    b = GpuBudget.parse(f"{pct}%")
    assert b.share == pct / 100 and b.nbytes is None and b.resolve(total) == int(pct / 100 * total)
    assert GpuBudget.parse("24G").resolve(total) == 24 << 30
    for bad in ("0%", "101%", "-5%", "%"):
        with pytest.raises(UsageError):
            GpuBudget.parse(bad)


def test_flags_beat_the_environment() -> None:
    env = {ENV_PLACEMENT: "direct", ENV_GPU_BUDGET: "70%"}
    opts = PlacementOptions.from_cli(env=env)
    assert opts.policy == "direct" and opts.gpu_budget == GpuBudget("70%", share=0.7)
    opts = PlacementOptions.from_cli("partial", "24G", env=env)
    assert opts.policy == "partial" and opts.gpu_budget is not None and opts.gpu_budget.nbytes == 24 << 30
    assert PlacementOptions.from_cli(env={ENV_PLACEMENT: "  ", ENV_GPU_BUDGET: ""}) == PlacementOptions()
    assert PlacementOptions.from_cli("rules:/tmp/my.rules", env={}) == PlacementOptions("rules", "/tmp/my.rules")


@pytest.mark.parametrize("flag, env, message", [
    (None, {ENV_GPU_BUDGET: "lots"}, "DS4NB_GPU_BUDGET=lots: not a size"),
    ("12Q", {}, "--gpu-budget 12Q: not a size"),
])
def test_budget_errors_name_their_source(flag, env, message) -> None:
    with pytest.raises(UsageError, match=message):
        PlacementOptions.from_cli(gpu_budget=flag, env=env)


@pytest.mark.parametrize("spec", ["full:", "bad name", ":x", "a/b"])
def test_bad_policy_names(spec: str) -> None:
    with pytest.raises(UsageError, match="expected a policy name"):
        PlacementOptions.from_cli(spec, env={})
    with pytest.raises(UsageError, match=f"{ENV_PLACEMENT}="):
        PlacementOptions.from_cli(env={ENV_PLACEMENT: spec})


# ---------------------------------------------------------------------------
# expert usage profiles


def test_usage_round_trip(rng, tmp_path: Path) -> None:
    counts = rng.integers(0, 10**6, (int(rng.integers(1, 50)), int(rng.integers(1, 300))))
    usage = ExpertUsage("DeepSeek-V4-Flash", tuple(tuple(int(c) for c in row) for row in counts))
    path = tmp_path / "usage.json"
    usage.save(path)
    back = ExpertUsage.load(path)
    assert back == usage and back.source == str(path)
    il = int(rng.integers(len(counts)))
    k = int(rng.integers(1, 8))
    frac = np.array(back.token_fractions(il, k))
    n = counts.shape[1]
    want = np.minimum(k * counts[il] / counts[il].sum(), 1) if counts[il].sum() else np.full(n, min(k / n, 1))
    assert np.allclose(frac, want, rtol=1e-12)
    assert back.share(il, 0) == pytest.approx(counts[il, 0] / counts[il].sum() if counts[il].sum() else 0)
    assert json.loads(path.read_text()) == {"version": 1, "model": "DeepSeek-V4-Flash",
                                            "layers": {str(i): row.tolist() for i, row in enumerate(counts)}}


def test_a_layer_without_counts_reads_uniformly() -> None:
    usage = ExpertUsage("m", ((0, 0, 0, 0), (1, 3, 0, 0)))
    assert usage.token_fractions(0, 2) == (0.5,) * 4
    assert usage.token_fractions(1, 2) == (0.5, 1.0, 0.0, 0.0)
    assert usage.share(0, 1) == 0 and usage.share(1, 1) == 0.75


GOOD = {"model": "m", "layers": {"0": [1, 2], "1": [0, 5]}}


@pytest.mark.parametrize("doc, message", [
    ("[1, 2]", "expected a JSON object with keys model and layers"),
    ({**GOOD, "layer": {}}, "unknown key 'layer'"),
    ({**GOOD, "version": 2}, "version is 2, this ds4nb reads version 1"),
    ({**GOOD, "version": True}, "version is True"),
    ({"layers": GOOD["layers"]}, "'model' must be a string"),
    ({**GOOD, "model": 3}, "'model' must be a string"),
    ({"model": "m", "layers": []}, "'layers' must be an object"),
    ({"model": "m", "layers": {}}, "'layers' must be an object"),
    ({"model": "m", "layers": {"0": [1], "01": [1]}}, "layer key '01' is not a layer index"),
    ({"model": "m", "layers": {"x": [1]}}, "layer key 'x' is not a layer index"),
    ({"model": "m", "layers": {"-1": [1]}}, "layer key '-1'"),
    ({"model": "m", "layers": {"0": [1], "2": [1]}}, "layer 1 is missing"),
    ({"model": "m", "layers": {"0": "12"}}, "layers.0 must be a non-empty list"),
    ({"model": "m", "layers": {"0": []}}, "layers.0 must be a non-empty list"),
    ({"model": "m", "layers": {"0": [1, -1]}}, r"layers.0\[1\] is -1, expected a non-negative integer"),
    ({"model": "m", "layers": {"0": [1.5]}}, r"layers.0\[0\] is 1.5"),
    ({"model": "m", "layers": {"0": [False]}}, r"layers.0\[0\] is False"),
])
def test_malformed_usage_files(tmp_path: Path, doc, message: str) -> None:
    path = tmp_path / "u.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(Ds4Error, match=message) as e:
        PlacementOptions.from_cli(expert_usage=path, env={})
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_unreadable_usage_files(tmp_path: Path) -> None:
    with pytest.raises(Ds4Error, match="cannot read the expert usage file"):
        ExpertUsage.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"model": "m",\n "layers": }')
    with pytest.raises(Ds4Error, match=r"bad.json: not valid JSON \(line 2: "):
        ExpertUsage.load(tmp_path / "bad.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(Ds4Error, match="not a UTF-8 JSON file"):
        ExpertUsage.load(tmp_path / "bin.json")
    assert ExpertUsage.from_json(GOOD).counts == ((1, 2), (0, 5))
