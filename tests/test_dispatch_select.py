"""The Q8_0 dispatcher: measured once per key and cached, the environment override and its downgrades, bad values.

Selection is pure logic (``ds4nb.dispatch.select``), tested with fake
``available`` / ``measure`` callables; the timer runs for real under the
simulator on tiny shapes; ``ds4nb dispatch`` and ``ds4nb info`` are driven
through the CLI, on this GPU-less machine and with a faked GPU.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import pytest

from ds4nb import __version__
from ds4nb.dispatch.device import DeviceProbe
from ds4nb.dispatch.select import (
    DISPATCH_CACHE_FILE,
    ENV_VAR,
    REGIMES,
    STRATEGIES,
    DispatchKey,
    Q8Dispatch,
    StrategyDowngrade,
    dispatch_cache_path,
    requested_strategy,
    select_q8_dispatch,
)
from ds4nb.errors import UsageError

from cli_run import one_line_error as _one_line_error, run_cli as _run

KEY = DispatchKey("NVIDIA H200", (9, 0), "12.8", "0.1.0", ((1024, 4096), (512, 4096), (32768, 1024)))
#: seconds per (strategy, regime): warp8 wins decode and small batches, mmq the large ones, cublas never
TIMES = {("warp8", 1): 1e-4, ("warp8", 8): 2e-4, ("warp8", 64): 9e-4, ("warp8", 512): 8e-3,
         ("mmq", 8): 3e-4, ("mmq", 64): 5e-4, ("mmq", 512): 2e-3,
         ("cublas", 8): 6e-4, ("cublas", 64): 7e-4, ("cublas", 512): 3e-3}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("DS4NB_CACHE_DIR", str(tmp_path / "user-cache"))


def can_run(*names: str):
    return lambda strategy: strategy in names


ALL = can_run(*STRATEGIES)


class FakeMeasure:
    """``measure(strategy, regime)`` from a table, recording its calls."""

    def __init__(self, times: dict = TIMES) -> None:
        self.times = times
        self.calls: list[tuple[str, int]] = []

    def __call__(self, strategy: str, regime: int) -> float | None:
        self.calls.append((strategy, regime))
        return self.times.get((strategy, regime))


def select(measure=None, key: DispatchKey = KEY, available=ALL, env=None, cache: Path | None = None, **kw):
    return select_q8_dispatch(available, measure, key, {} if env is None else env, cache, **kw)


# ---------------------------------------------------------------------------
# measured once per key, then cached


def test_a_miss_measures_every_candidate_picks_the_fastest_and_writes_the_cache(tmp_path: Path) -> None:
    m = FakeMeasure()
    d = select(m, cache=tmp_path)
    assert d.choices == ((1, "warp8"), (8, "warp8"), (64, "mmq"), (512, "mmq"))
    assert d.source == "measured" and d.reason == "measured on NVIDIA H200"
    # regime 1: only the matvec strategy; batches: every strategy that can run
    assert sorted(m.calls) == sorted([("warp8", 1)] + [(s, r) for r in REGIMES[1:] for s in STRATEGIES])
    assert d.seconds("mmq", 64) == 5e-4 and d.seconds("mmq", 1) is None and d.seconds("cublas", 1) is None
    saved = json.loads((tmp_path / DISPATCH_CACHE_FILE).read_text())
    entry = saved[KEY.text()]
    assert entry["choices"] == {"1": "warp8", "8": "warp8", "64": "mmq", "512": "mmq"}
    assert entry["available"] == list(STRATEGIES)
    assert not list(tmp_path.glob(".*tmp"))                      # written atomically: no temporary left


def test_a_hit_measures_nothing_and_keeps_the_timings(tmp_path: Path) -> None:
    first = select(FakeMeasure(), cache=tmp_path)
    m = FakeMeasure()
    again = select(m, cache=tmp_path)
    assert m.calls == []
    assert again.source == "cached" and again.choices == first.choices and again.timings == first.timings
    assert again.reason == f"cached ({tmp_path / DISPATCH_CACHE_FILE})"
    assert select(None, cache=tmp_path).source == "cached"        # a caller that must not measure reads it too


def test_remeasure_ignores_the_cache(tmp_path: Path) -> None:
    select(FakeMeasure(), cache=tmp_path)
    m = FakeMeasure({**TIMES, ("cublas", 512): 1e-3})
    d = select(m, cache=tmp_path, remeasure=True)
    assert m.calls and d.source == "measured" and d.strategy_for(512) == "cublas"
    assert select(FakeMeasure(), cache=tmp_path).strategy_for(512) == "cublas"   # rewritten


@pytest.mark.parametrize("change", [{"device": "NVIDIA H100 80GB HBM3"}, {"cc": (8, 0)}, {"driver": "13.0"},
                                    {"version": "0.2.0"}, {"shapes": ((1024, 4096), (512, 4096), (16384, 1024))}])
def test_another_device_driver_version_or_model_is_a_miss(tmp_path: Path, change: dict) -> None:
    select(FakeMeasure(), cache=tmp_path)
    other = replace(KEY, **change)
    assert other.text() != KEY.text()
    m = FakeMeasure()
    assert select(m, key=other, cache=tmp_path).source == "measured" and m.calls
    saved = json.loads((tmp_path / DISPATCH_CACHE_FILE).read_text())
    assert set(saved) == {KEY.text(), other.text()}                # both kept
    assert select(FakeMeasure(), cache=tmp_path).source == "cached"


def test_a_strategy_that_became_available_is_a_miss(tmp_path: Path) -> None:
    select(FakeMeasure(), available=can_run("mmq", "warp8"), cache=tmp_path)
    assert select(FakeMeasure(), available=can_run("mmq", "warp8"), cache=tmp_path).source == "cached"
    m = FakeMeasure()
    assert select(m, cache=tmp_path).source == "measured" and ("cublas", 64) in m.calls


def _entry(**change) -> dict:
    entry = {"choices": {"1": "warp8", "8": "warp8", "64": "mmq", "512": "mmq"}, "available": list(STRATEGIES),
             "timings": [["warp8", 1, 1e-4]]}
    entry.update(change)
    return entry


@pytest.mark.parametrize("content", [
    "not json", "", "\x00\xff", "[1, 2]", "null", json.dumps({KEY.text(): 3}),
    json.dumps({KEY.text(): _entry(choices=None)}),
    json.dumps({KEY.text(): _entry(choices={"1": "warp8", "8": "warp8"})}),             # a regime missing
    json.dumps({KEY.text(): _entry(choices={"1": "mmq", "8": "mmq", "64": "mmq", "512": "mmq"})}),   # no matvec
    json.dumps({KEY.text(): _entry(choices={"1": "warp8", "8": "warp9", "64": "mmq", "512": "mmq"})}),
    json.dumps({KEY.text(): _entry(timings=7)}),
    json.dumps({KEY.text(): _entry(timings=[["warp8", "1", 1e-4]])}),
    json.dumps({KEY.text(): _entry(timings=[["warp8", 1, -1]])}),
    json.dumps({KEY.text(): _entry(available="all")}),
])
def test_a_corrupt_cache_is_measured_over_and_rewritten(tmp_path: Path, content: str) -> None:
    (tmp_path / DISPATCH_CACHE_FILE).write_text(content, encoding="utf-8", errors="surrogateescape")
    m = FakeMeasure()
    d = select(m, cache=tmp_path)
    assert d.source == "measured" and m.calls
    assert select(FakeMeasure(), cache=tmp_path).source == "cached"


def test_a_cache_that_cannot_be_written_is_only_a_cache(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert select(FakeMeasure(), cache=blocker / "sub").source == "measured"


def test_without_a_measure_the_default_order_and_nothing_written(tmp_path: Path) -> None:
    d = select(None, cache=tmp_path)
    assert d.source == "default" and d.reason.startswith("not measured")
    assert d.choices == ((1, "warp8"), (8, "mmq"), (64, "mmq"), (512, "mmq")) and d.timings == ()
    assert select(None, available=can_run("cublas", "warp8"), cache=tmp_path).strategy_for(64) == "cublas"
    assert select(None, available=can_run("warp8"), cache=tmp_path).strategies() == {"warp8"}
    assert not (tmp_path / DISPATCH_CACHE_FILE).exists()


def test_failed_or_nonsense_timings_are_skipped(tmp_path: Path) -> None:
    times = {**TIMES, ("mmq", 64): None, ("mmq", 512): float("nan"), ("cublas", 512): -1.0, ("cublas", 8): True}
    d = select(FakeMeasure(times), cache=tmp_path)
    assert d.strategy_for(64) == "cublas" and d.strategy_for(512) == "warp8" and d.strategy_for(8) == "warp8"
    assert d.seconds("mmq", 512) is None and d.seconds("cublas", 8) is None
    nothing = select(FakeMeasure({}), cache=tmp_path / "other")      # no timing at all: the default order
    assert nothing.choices == ((1, "warp8"), (8, "mmq"), (64, "mmq"), (512, "mmq"))


def test_unavailable_strategies_are_never_measured(tmp_path: Path) -> None:
    m = FakeMeasure()
    d = select(m, available=can_run("cublas", "warp8"), cache=tmp_path)
    assert {s for s, _ in m.calls} == {"cublas", "warp8"} and "mmq" not in d.strategies()
    assert d.choices == ((1, "warp8"), (8, "warp8"), (64, "cublas"), (512, "cublas"))


def test_nothing_can_run_is_one_line(tmp_path: Path) -> None:
    for available in (can_run(), can_run("mmq", "cublas")):       # no matvec: not even decode can run
        with pytest.raises(UsageError, match="no Q8_0 matmul strategy can run on NVIDIA H200"):
            select(FakeMeasure(), available=available, cache=tmp_path)


def test_the_key_is_stable_text() -> None:
    text = KEY.text()
    assert text.startswith("NVIDIA H200 | cc 9.0 | driver 12.8 | ds4nb 0.1.0 | q8_0 shapes ")
    assert DispatchKey(*(KEY.device, KEY.cc, KEY.driver, KEY.version, KEY.shapes)).text() == text
    assert KEY.flops(8) == 2 * 8 * (1024 * 4096 + 512 * 4096 + 32768 * 1024)
    sim = DispatchKey.for_device(DeviceProbe("cudasim", (9, 0), 1, 1, 1, True), [(64, 256)])
    assert sim == DispatchKey("cudasim", (9, 0), "simulator", __version__, ((64, 256),))


# ---------------------------------------------------------------------------
# DS4_CUDA_PREFILL_PATH


@pytest.mark.parametrize("value", ["mmq", "cublas", "warp8", " MMQ "])
def test_the_override_forces_batches_and_measures_nothing(tmp_path: Path, value: str) -> None:
    m = FakeMeasure()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = select(m, env={ENV_VAR: value}, cache=tmp_path)
    name = value.strip().lower()
    assert m.calls == [] and d.source == "env" and d.reason == f"{ENV_VAR}={name}"
    assert d.choices == ((1, "warp8"), (8, name), (64, name), (512, name))   # decode stays the matvec
    assert not (tmp_path / DISPATCH_CACHE_FILE).exists()


def test_auto_and_unset_are_the_measured_choice(tmp_path: Path) -> None:
    for env in ({}, {ENV_VAR: "auto"}, {ENV_VAR: " "}):
        assert select(FakeMeasure(), env=env, cache=tmp_path).source in ("measured", "cached")


@pytest.mark.parametrize(("requested", "available", "used", "skipped"), [
    ("mmq", ("cublas", "warp8"), "cublas", "mmq"),
    ("mmq", ("warp8",), "warp8", "mmq and cublas"),
    ("cublas", ("mmq", "warp8"), "warp8", "cublas"),
])
def test_the_override_downgrades_with_one_warning(tmp_path: Path, requested, available, used, skipped) -> None:
    with pytest.warns(StrategyDowngrade) as caught:
        d = select(FakeMeasure(), env={ENV_VAR: requested}, available=can_run(*available), cache=tmp_path)
    assert len(caught) == 1
    line = str(caught[0].message)
    assert "\n" not in line and line == f"{ENV_VAR}={requested}: {skipped} cannot run on NVIDIA H200; using {used}"
    assert d.reason == f"{ENV_VAR}={requested}: {skipped} unavailable: downgraded to {used}"
    assert d.choices == ((1, "warp8"), (8, used), (64, used), (512, used))


def test_an_override_nothing_can_satisfy_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no Q8_0 matmul strategy can run"):
        select(FakeMeasure(), env={ENV_VAR: "mmq"}, available=can_run("mmq"), cache=tmp_path)


@pytest.mark.parametrize("value", ["bogus", "warp9", "mmq,cublas", "cuBLAS2", "a\nb"])
def test_bad_values_are_a_usage_error(tmp_path: Path, value: str) -> None:
    with pytest.raises(UsageError) as e:
        select(FakeMeasure(), env={ENV_VAR: value}, cache=tmp_path)
    assert "\n" not in str(e.value) and "expected one of mmq, cublas, warp8, auto" in str(e.value)
    with pytest.raises(UsageError):
        requested_strategy({ENV_VAR: value})


# ---------------------------------------------------------------------------
# Q8Dispatch


def test_strategy_for_takes_the_largest_regime_not_above_n() -> None:
    d = Q8Dispatch(((1, "warp8"), (8, "cublas"), (64, "mmq"), (512, "warp8")), "test")
    want = {1: "warp8", 2: "warp8", 7: "warp8", 8: "cublas", 63: "cublas", 64: "mmq", 511: "mmq", 512: "warp8",
            4096: "warp8"}
    assert {n: d.strategy_for(n) for n in want} == want
    with pytest.raises(ValueError):
        d.strategy_for(0)
    assert d.strategies() == {"warp8", "cublas", "mmq"}
    assert d.describe() == "q8_0 1:warp8 8:cublas 64:mmq 512:warp8 (test)"


def test_a_dispatch_is_well_formed() -> None:
    for choices in ((), ((8, "mmq"),), ((1, "warp8"), (1, "mmq")), ((1, "warp8"), (64, "mmq"), (8, "mmq")),
                    ((1, "warp8"), (8, "fast"))):
        with pytest.raises(ValueError):
            Q8Dispatch(choices, "bad")


# ---------------------------------------------------------------------------
# the engine side: shapes, the timer (simulator), q8_dispatch


def test_the_model_shapes_follow_the_step() -> None:
    from ds4nb.engine.q8_timing import model_q8_shapes
    from ds4nb.model.presets import flash_config

    assert model_q8_shapes(flash_config()) == [
        (1024, 4096), (512, 4096), (32768, 1024),      # attn_q_a, attn_kv, attn_q_b
        *[(1024, 4096)] * 8,                             # attn_output_a: 8 groups of (1024, 8 heads x 512)
        (4096, 8192),                                    # attn_output_b
        (2048, 4096), (2048, 4096), (4096, 2048)]        # shared expert gate, up, down


def _mini_cfg() -> SimpleNamespace:
    """model_q8_shapes' inputs at a few dozen rows (the simulator runs every thread)."""
    return SimpleNamespace(n_embd=64, q_lora_rank=32, head_dim=32, q_dim=64, out_lora_rank=16, out_group_dim=32,
                           n_out_group=2, out_low_dim=32, n_ff_exp=64)


def test_the_timer_runs_warp8_on_the_simulator() -> None:
    from ds4nb.engine.q8_timing import Q8Timer
    from ds4nb.kernels.registry import DeviceInfo

    timer = Q8Timer(_mini_cfg(), DeviceInfo.current(), reps=1)
    try:
        for n_tok in (1, 8):
            sec = timer("warp8", n_tok)
            assert isinstance(sec, float)          # the simulator's events say -1 ms: select skips it
        assert timer("nope", 8) is None
        assert len(timer._out) == 2 * len({n for n, _ in timer.shapes})
    finally:
        timer.close()
    assert timer._weights is None and not timer._out


@pytest.mark.no_gpu
def test_q8_dispatch_never_measures_in_the_simulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ds4nb.dispatch.device import probe_device
    from ds4nb.engine import q8_timing

    monkeypatch.setattr(q8_timing, "Q8Timer", lambda *a, **k: pytest.fail("measured in the simulator"))
    probe = probe_device()
    d = q8_timing.q8_dispatch(_mini_cfg(), probe, cache_dir=tmp_path)
    assert d.source == "default" and d.strategy_for(1) == "warp8"
    forced = q8_timing.q8_dispatch(_mini_cfg(), probe, env={ENV_VAR: "warp8"}, cache_dir=tmp_path)
    assert forced.source == "env" and forced.strategies() == {"warp8"}


@pytest.mark.no_gpu
def test_only_registered_strategies_are_available() -> None:
    from ds4nb.engine.q8_timing import available_strategies
    from ds4nb.kernels.registry import DeviceInfo

    available = available_strategies(DeviceInfo.current())
    assert available("warp8") and not available("cublas") and not available("nope")   # no CuPy in the simulator


# ---------------------------------------------------------------------------
# the CLI




@pytest.mark.no_gpu
def test_dispatch_without_a_gpu_is_one_line(capsys) -> None:
    code, out, err = _run(capsys, "dispatch")
    _one_line_error(code, err, "no", "GPU")
    assert out == ""


@pytest.mark.parametrize("argv", [("dispatch",), ("info", "MODEL"), ("generate", "-m", "MODEL", "--backend", "cpu"),
                                  ("bench", "-m", "MODEL", "--backend", "cpu")])
def test_a_bad_override_is_one_line_everywhere(capsys, monkeypatch, tiny_gguf: Path, argv: tuple) -> None:
    monkeypatch.setenv(ENV_VAR, "bogus")
    code, _, err = _run(capsys, *[str(tiny_gguf) if a == "MODEL" else a for a in argv])
    _one_line_error(code, err, ENV_VAR, "bogus", "mmq, cublas, warp8, auto")


@pytest.mark.no_gpu
def test_info_shows_the_decision_without_a_gpu(capsys, tiny_gguf: Path) -> None:
    code, out, err = _run(capsys, "info", str(tiny_gguf))
    assert code == 0, err
    assert "q8_0 dispatch: no CUDA GPU here" in out


class FakeTimer:
    """Q8Timer's interface with the TIMES table (warp8's decode time stands for any decode)."""

    made: ClassVar[list[FakeTimer]] = []

    def __init__(self, cfg, device, **kw) -> None:
        self.calls: list[tuple[str, int]] = []
        self.closed = False
        FakeTimer.made.append(self)

    def __call__(self, strategy: str, n_tok: int) -> float | None:
        self.calls.append((strategy, n_tok))
        return TIMES.get((strategy, n_tok))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> DeviceProbe:
    """A GPU for the CLI: a probe that is not the simulator, the fake timer; kernels as the simulator has them."""
    from ds4nb.dispatch import device
    from ds4nb.engine import backends, q8_timing

    probe = DeviceProbe("Fake GPU [x]", (9, 0), 132, 141 << 30, 140 << 30, False)
    monkeypatch.setattr(backends, "cuda_available", lambda: True)
    monkeypatch.setattr(device, "probe_device", lambda: probe)
    monkeypatch.setattr(device, "driver_version", lambda p: "12.8")
    monkeypatch.setattr(q8_timing, "Q8Timer", FakeTimer)
    FakeTimer.made.clear()
    return probe


def test_dispatch_measures_once_then_reads_the_cache(capsys, fake_gpu, tmp_path: Path) -> None:
    from ds4nb.engine.q8_timing import available_strategies
    from ds4nb.kernels.registry import DeviceInfo

    available = available_strategies(DeviceInfo.current())
    code, out, err = _run(capsys, "dispatch")
    assert code == 0, err
    assert "timing the Q8_0 strategies on Fake GPU [x]" in err
    assert len(FakeTimer.made) == 1 and FakeTimer.made[0].closed
    assert ("warp8", 1) in FakeTimer.made[0].calls and ("warp8", 512) in FakeTimer.made[0].calls
    assert "the 15 Q8_0 matmuls of one layer of the flash preset on Fake GPU [x]: ms, TFLOP/s" in out
    warp8_row = next(ln for ln in out.splitlines() if ln.strip("│ ").startswith("warp8"))
    assert "0.100 ms" in warp8_row and "8.000 ms" in warp8_row
    choice = next(ln for ln in out.splitlines() if ln.startswith("choice: "))
    best = "mmq" if available("mmq") else "warp8"
    assert choice == f"choice: q8_0 1:warp8 8:warp8 64:{best} 512:{best} (measured on Fake GPU [x])"
    cache = tmp_path / "user-cache" / DISPATCH_CACHE_FILE
    assert f"cache: {cache}" in out and cache.is_file() and dispatch_cache_path() == cache

    code, out, err = _run(capsys, "dispatch")                       # cached: no timing, the same table
    assert code == 0 and len(FakeTimer.made) == 2 and FakeTimer.made[1].calls == [] and "timing" not in err
    assert f"(cached ({cache}))" in out and "0.100 ms" in out

    code, out, err = _run(capsys, "dispatch", "--remeasure")
    assert code == 0 and FakeTimer.made[2].calls and "measured on Fake GPU" in out


@pytest.mark.no_gpu
def test_dispatch_shows_an_override_in_effect(capsys, monkeypatch, fake_gpu) -> None:
    from ds4nb.engine.q8_timing import available_strategies
    from ds4nb.kernels.registry import DeviceInfo

    monkeypatch.setenv(ENV_VAR, "cublas")
    code, out, err = _run(capsys, "dispatch")
    assert code == 0, err
    assert not available_strategies(DeviceInfo.current())("cublas")
    assert [ln for ln in err.splitlines() if ln.startswith("warning:")] == [
        f"warning: {ENV_VAR}=cublas: cublas cannot run on Fake GPU [x]; using warp8"]
    assert (f"in effect ({ENV_VAR}): q8_0 1:warp8 8:warp8 64:warp8 512:warp8 ({ENV_VAR}=cublas: cublas "
            f"unavailable: downgraded to warp8)") in out


def test_info_reads_the_decision_and_never_measures(capsys, fake_gpu, tiny_gguf: Path) -> None:
    code, out, err = _run(capsys, "info", str(tiny_gguf))
    assert code == 0, err
    assert f"q8_0 dispatch: not measured yet on Fake GPU [x]: run ds4nb dispatch -m {tiny_gguf}" in out
    assert FakeTimer.made == []
    assert _run(capsys, "dispatch", "-m", str(tiny_gguf))[0] == 0
    code, out, err = _run(capsys, "info", str(tiny_gguf))
    line = next(ln for ln in out.splitlines() if ln.startswith("q8_0 dispatch: "))
    assert line.startswith("q8_0 dispatch: q8_0 1:warp8 8:warp8 ") and "(cached (" in line
    assert len(FakeTimer.made) == 1                                  # only ds4nb dispatch measured
