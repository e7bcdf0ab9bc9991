"""``ds4nb placement`` and the placement flags of ``generate``/``bench`` (no GPU: assumed device and bandwidths)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ds4nb.cache.plan import engine_tensors, format_bytes
from ds4nb.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def roofline_of(out: str) -> float:
    return float(re.search(r"^decode roofline +([0-9.]+) tokens/s", out, re.M).group(1))


def test_full_plan_and_its_roofline(capsys, tiny_model, tiny_gguf: Path) -> None:
    rc, out, err = run(capsys, "placement", "-m", str(tiny_gguf), "--device-bw", "1000", "--host-bw", "10")
    assert rc == 0, err
    cat = engine_tensors(tiny_model)
    cfg = tiny_model.config
    total = sum(t.nbytes for t in cat)
    per_token = sum(t.nbytes * cfg.n_expert_used // cfg.n_expert if t.role == "routed_expert" else
                    t.row_bytes if t.name == "token_embd.weight" or t.name.endswith("tid2eid.weight") else t.nbytes
                    for t in cat)
    assert f"full (default: the model fits): {format_bytes(total)} on the GPU, 0.00 MiB host-mapped" in out
    assert "80.00 GiB GPU (assumed: no GPU here" in out
    assert roofline_of(out) == pytest.approx(1e12 / per_token, rel=1e-3)
    assert "at 1000 GB/s (given)" in out and "at 10.0 GB/s (given)" in out
    n_layer, n_expert = cfg.n_layer, cfg.n_expert
    assert f"{n_layer * n_expert} of {n_layer * n_expert} on the GPU (per layer: {' '.join([str(n_expert)] * n_layer)})" \
        in out
    assert re.search(rf"│ total\s+│\s+{len(cat)} │\s+{re.escape(format_bytes(total))} │\s+0 B │", out)


def test_partial_budget_and_usage(capsys, tiny_model, tiny_gguf: Path, tmp_path: Path) -> None:
    cat = engine_tensors(tiny_model)
    dense = sum(t.nbytes for t in cat if t.role != "routed_expert")
    cfg = tiny_model.config
    counts = [[0] * cfg.n_expert for _ in range(cfg.n_layer)]
    counts[3][5] = 10  # the one expert ever used: the first routed expert partial keeps
    usage = tmp_path / "usage.json"
    usage.write_text(json.dumps({"model": "tiny", "layers": {str(i): c for i, c in enumerate(counts)}}))
    unit = sum(t.nbytes for t in cat if t.role == "routed_expert") // (cfg.n_layer * cfg.n_expert)
    rc, out, err = run(capsys, "placement", "-m", str(tiny_gguf), "--gpu-budget", str(dense + unit),
                       "--expert-usage", str(usage))
    assert rc == 0, err
    assert "partial (default: the model does not fit the budget)" in out
    assert "1 of 32 on the GPU (per layer: 0 0 0 1)" in out
    assert f"{usage} (recorded on tiny)" in out
    assert "at 2706 GB/s (assumed)" in out and "at 50.7 GB/s (assumed)" in out


def test_environment_and_flags(capsys, tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS4NB_PLACEMENT", "direct")
    rc, out, err = run(capsys, "placement", "-m", str(tiny_gguf))
    assert rc == 0 and "direct: 0.00 MiB on the GPU" in out and "0 of 32 on the GPU" in out
    rc, out, err = run(capsys, "placement", "-m", str(tiny_gguf), "--placement", "full", "--device-memory", "1G",
                       "--gpu-budget", "50%", "--reserve", "0")
    assert rc == 0 and "512.00 MiB (--gpu-budget 50%)" in out and "full: " in out
    monkeypatch.setenv("DS4NB_GPU_BUDGET", "many")
    one_line_error(*run(capsys, "placement", "-m", str(tiny_gguf))[::2], "DS4NB_GPU_BUDGET=many: not a size")


@pytest.mark.parametrize("argv, needles", [
    (["--gpu-budget", "24Q"], ["--gpu-budget 24Q: not a size"]),
    (["--placement", "nope"], ["unknown placement policy 'nope' (known: direct, full, partial)"]),
    (["--placement", "full:x"], ["placement policy 'full' takes no argument"]),
    (["--placement", "full", "--gpu-budget", "1M"], ["does not fit the GPU with the 'full' placement"]),
    (["--placement", "partial", "--gpu-budget", "100K"], ["keeps norms, hyper-connections, router"]),
    (["--device-memory", "1G", "--gpu-budget", "2G"], ["is more than the GPU (1.00 GiB GPU) can give weights"]),
    (["--expert-usage", "/nonexistent/usage.json"], ["cannot read the expert usage file"]),
    (["--device-bw", "0"], ["--device-bw", "positive bandwidth"]),
    (["--reserve", "lots"], ["--reserve", "not a size"]),
])
def test_bad_input_is_one_line(capsys, tiny_gguf: Path, argv: list[str], needles: list[str]) -> None:
    one_line_error(*run(capsys, "placement", "-m", str(tiny_gguf), *argv)[::2], *needles)


def test_usage_from_another_model_is_refused(capsys, tiny_gguf: Path, tmp_path: Path) -> None:
    usage = tmp_path / "u.json"
    usage.write_text(json.dumps({"model": "flash", "layers": {str(i): [1] * 256 for i in range(43)}}))
    one_line_error(*run(capsys, "placement", "-m", str(tiny_gguf), "--expert-usage", str(usage))[::2],
                   "has 43 layers, the model has 4")


@pytest.mark.parametrize("command", [["generate", "-n", "1"], ["bench", "--ctx-start", "8", "--ctx-max", "8",
                                                                "--gen-tokens", "1"]])
def test_generate_and_bench_take_the_placement_flags(capsys, tiny_gguf: Path, command: list[str]) -> None:
    one_line_error(*run(capsys, *command, "-m", str(tiny_gguf), "--backend", "cpu", "--gpu-budget", "12Q")[::2],
                   "--gpu-budget 12Q: not a size")
    # a policy no plugin provides fails before any work, even on the CPU backend (which places nothing)
    one_line_error(*run(capsys, *command, "-m", str(tiny_gguf), "--backend", "cpu", "--placement", "nope")[::2],
                   "unknown placement policy 'nope'")
