"""First use of the ``ds4nb`` command: errors, outputs, pipes, banners, progress and stats."""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_run import one_line_error as _one_line_error, run_cli as _run


TINY_GEN = ("--backend", "cpu", "-n", "1", "--temp", "0", "--nothink", "--system", "")




# ---------------------------------------------------------------------------
# errors are plain text


def test_error_text_is_never_markup_and_stays_on_one_line(capsys, tmp_path: Path) -> None:
    name = "a[bold]b[/]\nc\x1b[2J.gguf"
    code, _, err = _run(capsys, "info", str(tmp_path / name))
    line = _one_line_error(code, err, "not found")
    assert line.endswith("a[bold]b[/]\\nc\\x1b[2J.gguf")


# ---------------------------------------------------------------------------
# inputs and outputs checked before any work


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_prompt_file_that_is_not_utf8(capsys, tmp_path: Path, tiny_gguf: Path, command: str) -> None:
    prefix = "héllo ".encode()
    path = tmp_path / "latin1.txt"
    path.write_bytes(prefix + "café".encode("latin-1"))
    bad_at = len(prefix) + 3  # the latin-1 é
    code, _, err = _run(capsys, command, "-m", str(tiny_gguf), "--backend", "cpu", "--prompt-file", str(path))
    _one_line_error(code, err, "--prompt-file", "not UTF-8", "0xe9", f"offset {bad_at}")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_prompt_file_missing_or_a_directory(capsys, tmp_path: Path, tiny_gguf: Path, command: str) -> None:
    for path, words in ((tmp_path / "nope.txt", "No such file"), (tmp_path, "Is a directory")):
        code, _, err = _run(capsys, command, "-m", str(tiny_gguf), "--backend", "cpu", "--prompt-file", str(path))
        _one_line_error(code, err, "--prompt-file", words)


@pytest.mark.parametrize("flag", ["--csv", "--plot"])
def test_bench_outputs_are_checked_before_the_model_is_opened(capsys, tmp_path: Path, flag: str) -> None:
    missing_model = str(tmp_path / "not-loaded.gguf")  # the error must be about the output, not this
    code, _, err = _run(capsys, "bench", "-m", missing_model, "--backend", "cpu", flag, str(tmp_path / "no" / "x.out"))
    _one_line_error(code, err, flag, "does not exist")
    code, _, err = _run(capsys, "bench", "-m", missing_model, "--backend", "cpu", flag, str(tmp_path))
    _one_line_error(code, err, flag, "is a directory")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_bad_prefill_path_env_is_an_error_on_the_cpu_backend(capsys, monkeypatch, tiny_gguf: Path,
                                                             command: str) -> None:
    monkeypatch.setenv("DS4_CUDA_PREFILL_PATH", "bogus")
    code, _, err = _run(capsys, command, "-m", str(tiny_gguf), "--backend", "cpu")
    _one_line_error(code, err, "DS4_CUDA_PREFILL_PATH", "bogus", "mmq, cublas, warp8, auto")


def test_requested_strategy() -> None:
    from ds4nb.dispatch.select import ENV_VAR, requested_strategy
    from ds4nb.errors import UsageError

    assert requested_strategy({}) == "auto"
    assert requested_strategy({ENV_VAR: "  "}) == "auto"
    assert requested_strategy({ENV_VAR: " Warp8 "}) == "warp8"
    with pytest.raises(UsageError, match="warp9"):
        requested_strategy({ENV_VAR: "warp9"})


# ---------------------------------------------------------------------------
# bench


def test_bench_on_cpu_takes_a_small_default_sweep() -> None:
    from ds4nb.bench import CPU_SWEEP, GPU_SWEEP, Sweep
    from ds4nb.cli import _bench_sweep

    unset = argparse.Namespace(ctx_start=None, ctx_max=None, step_incr=None, gen_tokens=None)
    assert _bench_sweep(unset, "cpu") == CPU_SWEEP
    assert _bench_sweep(unset, "cuda") == GPU_SWEEP
    some = argparse.Namespace(ctx_start=None, ctx_max=512, step_incr=None, gen_tokens=3)
    assert _bench_sweep(some, "cpu") == Sweep(CPU_SWEEP.ctx_start, 512, CPU_SWEEP.step_incr, 3)
    assert CPU_SWEEP.ctx_max <= 512 and CPU_SWEEP.gen_tokens <= 16


def test_bench_csv_is_complete_or_absent(capsys, tmp_path: Path, tiny_gguf: Path) -> None:
    from ds4nb.bench import CPU_SWEEP

    out = tmp_path / "bench.csv"
    code, stdout, err = _run(capsys, "bench", "-m", str(tiny_gguf), "--backend", "cpu", "--ctx-start", "8",
                             "--ctx-max", "16", "--step-incr", "8", "--csv", str(out))
    assert code == 0, err
    assert "warning: the cpu backend" in err and "small sweep" in err
    rows = list(csv.DictReader(out.open()))
    assert [int(r["ctx_tokens"]) for r in rows] == [8, 16]
    assert [int(r["prefill_tokens"]) for r in rows] == [8, 8]
    assert {int(r["gen_tokens"]) for r in rows} == {CPU_SWEEP.gen_tokens}  # the flag left out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.csv"]  # no partial file left behind
    assert "ds4nb bench" in stdout


# ---------------------------------------------------------------------------
# generate: banner, progress, stats


def test_default_model_banner_says_random_weights(capsys, monkeypatch, tiny_gguf: Path) -> None:
    import ds4nb.model.default as default

    monkeypatch.setattr(default, "default_model_path", lambda: tiny_gguf)
    code, _, err = _run(capsys, "generate", *TINY_GEN, "-p", "hi")
    assert code == 0, err
    assert "random weights" in err and "-m FILE.gguf" in err
    code, _, err = _run(capsys, "generate", "-m", str(tiny_gguf), *TINY_GEN, "-p", "hi")
    assert code == 0 and "random weights" not in err


def test_stats_say_when_nothing_was_decoded(capsys, tiny_gguf: Path) -> None:
    code, _, err = _run(capsys, "generate", "-m", str(tiny_gguf), *TINY_GEN, "-p", "hi")
    assert code == 0, err
    assert "no decode step" in err and "0.00 t/s" not in err


def test_stats_line_numbers() -> None:
    from ds4nb.engine.generate import GenerationStats

    rng = np.random.default_rng()
    prompt, steps = int(rng.integers(1, 5000)), int(rng.integers(1, 500))
    pre_s, dec_s, first_s = (float(x) for x in rng.uniform(0.01, 30.0, 3))
    stats = GenerationStats(prompt, pre_s, steps + 1, steps, dec_s, first_s, "eos")
    line = stats.describe()
    assert f"prompt {prompt} tok, prefill {prompt / pre_s:.1f} t/s" in line
    assert f"generated {steps + 1} tok, decode {steps / dec_s:.2f} t/s" in line
    assert f"first token {first_s:.2f} s" in line and "stop: eos" in line
    idle = GenerationStats(prompt, pre_s, 1, 0, 0.0, first_s, "length").describe()
    assert "no decode step" in idle and "decode" not in idle.replace("no decode step", "")


def test_chunked_prefill_matches_one_prefill(tiny_model) -> None:
    from ds4nb.engine.generate import PREFILL_FIRST_CHUNK, prefill
    from ds4nb.reference.engine import CpuEngine

    rng = np.random.default_rng()
    tokens = rng.integers(0, tiny_model.config.n_vocab, int(rng.integers(2, 4) * PREFILL_FIRST_CHUNK + 5)).tolist()
    engine = CpuEngine(tiny_model)
    whole = engine.prefill(tokens)
    engine.reset()
    calls: list[tuple[int, int]] = []
    chunked = prefill(engine, tokens, lambda done, total: calls.append((done, total)))
    assert np.array_equal(chunked, whole)
    assert engine.position == len(tokens)
    done = [d for d, _ in calls]
    assert calls[0] == (0, len(tokens)) and done[-1] == len(tokens) and len(calls) >= 3
    assert all(a < b for a, b in zip(done, done[1:])) and {t for _, t in calls} == {len(tokens)}


def test_prefill_progress_shows_only_after_a_delay(monkeypatch) -> None:
    import io

    from ds4nb import cli

    terminal = cli._Console(file=io.StringIO(), force_terminal=True)
    monkeypatch.setattr(cli, "err_console", terminal)
    quick = cli._PrefillProgress()
    with quick as update:
        for done in (0, 5, 10):
            update(done, 10)
        assert quick.progress is None
    slow = cli._PrefillProgress()
    monkeypatch.setattr(cli._PrefillProgress, "DELAY", 0.0)
    with slow as update:
        update(0, 10)
        update(4, 10)
        assert slow.progress is not None and slow.progress.tasks[0].completed == 4
        update(10, 10)
        assert slow.progress is None
    drawn = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal.file.getvalue())
    assert "prefill" in drawn and "4/10 tokens" in drawn and "10/10 tokens" in drawn
    monkeypatch.setattr(cli, "err_console", cli._Console(file=io.StringIO()))  # not a terminal: no bar at all
    piped = cli._PrefillProgress()
    with piped as update:
        update(0, 10)
        update(4, 10)
        assert piped.progress is None


# ---------------------------------------------------------------------------
# pipes


def test_piped_tables_are_not_cut_to_80_columns(capsys, tiny_gguf: Path) -> None:
    code, out, _ = _run(capsys, "info", str(tiny_gguf))
    assert code == 0
    row = next(ln for ln in out.splitlines() if "rope / yarn" in ln)
    assert "beta 32/1" in row and len(row) > 80


def _cli_process(*argv: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ds4nb", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1", **env})


@pytest.mark.parametrize("command", ["info", "generate"])
def test_a_reader_that_stops_early_is_not_an_error(tiny_gguf: Path, command: str) -> None:
    """``ds4nb info MODEL | head -1``: exit 0, no broken-pipe noise."""
    argv = ["info", str(tiny_gguf)] if command == "info" else ["generate", "-m", str(tiny_gguf), "--backend", "cpu",
                                                                "-n", "40", "--seed", "1"]
    proc = _cli_process(*argv)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "Broken" not in err and "Exception ignored" not in err
    if command == "info":
        assert err == ""


def test_a_kernel_plugin_that_fails_to_import_is_one_line_naming_it(tmp_path: Path) -> None:
    """Never a traceback, never silently ignored (issue 11): one line naming the plugin, exit 2."""
    dist = tmp_path / "broken_kernels-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-kernels\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ds4nb]\nbroken_kernels = no_such_module_ds4nb_test.plugin\n")
    proc = _cli_process("kernels", PYTHONPATH=str(tmp_path))
    out, err = (s.decode() for s in proc.communicate(timeout=120))
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "plugin broken-kernels" in lines[0] and "no_such_module_ds4nb_test" in lines[0], err
    assert "Traceback" not in err


def test_generate_chains_device_sampled_steps_like_host_sampling(tiny_model) -> None:
    """``generate`` through an engine's ``decode_chain`` gives the tokens, stop and step count of host sampling
    over ``decode`` logits, asks the chain for the tokens it may still need, and closes it (EOS or not)."""
    from ds4nb.chat import StopCondition
    from ds4nb.engine.generate import generate
    from ds4nb.sampling import GREEDY
    from ds4nb.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(tiny_model)
    n_vocab = tiny_model.config.n_vocab
    rng = np.random.default_rng()
    a, b = (int(x) for x in rng.integers(1, n_vocab, 2))

    def successor(t: int) -> int:
        return (a * t + b) % n_vocab

    class HostSampled:
        def prefill(self, tokens):
            return np.eye(n_vocab, dtype=np.float32)[successor(tokens[-1])]

        def decode(self, token):
            return np.eye(n_vocab, dtype=np.float32)[successor(token)]

    class Chained(HostSampled):
        asked, closed = [], []

        def decode_chain(self, token, params, rng, n):
            Chained.asked.append(n)
            try:
                for _ in range(n):
                    token = successor(token)
                    yield token
            finally:
                Chained.closed.append(True)

    for _ in range(4):
        prompt = [int(x) for x in rng.integers(0, n_vocab, 3)]
        eos = successor(successor(successor(prompt[-1]))) if rng.random() < 0.5 else -1   # the 3rd token, or never
        stop = StopCondition(eos_id=eos)
        limit = int(rng.integers(1, 8))
        want = generate(HostSampled(), tok, prompt, max_new_tokens=limit, params=GREEDY, stop=stop,
                        on_text=lambda s: None, rng=np.random.default_rng(0))
        Chained.asked, Chained.closed = [], []
        got = generate(Chained(), tok, prompt, max_new_tokens=limit, params=GREEDY, stop=stop,
                       on_text=lambda s: None, rng=np.random.default_rng(0))
        assert got[0] == want[0] and got[1].stop == want[1].stop and got[1].decode_steps == want[1].decode_steps
        assert Chained.asked == ([limit - 1] if limit > 1 else []) and len(Chained.closed) == len(Chained.asked)
