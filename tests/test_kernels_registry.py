"""The kernel registry and the pluggy plugin path."""

from __future__ import annotations

import types

import pytest

from ds4nb.errors import PluginError
from ds4nb.kernels import KERNELS_TABLE_HEADER
from ds4nb.kernels.registry import (
    DeviceInfo,
    KernelRegistry,
    KernelRegistryError,
    OpSpec,
    Requirements,
    implementation,
)
from ds4nb.plugins import build_registry, get_registry, hookimpl, new_plugin_manager

H100 = DeviceInfo("H100", (9, 0))
VOLTA = DeviceInfo("V100", (7, 0))
SIM = DeviceInfo("cudasim", (9, 0), simulator=True)

BUILTIN_OPS = {
    "act.quantize_q8_0", "act.quantize_q8_K", "q8_0.matvec", "q8_0.matmul",
    "iq2_xxs.moe_matvec", "q2_k.moe_matvec", "q4_k.moe_matvec",
    "iq2_xxs.moe_gate_up", "q2_k.moe_down_sum", "norm.rms", "embed.gather", "sample.argmax",
}


def _op(name: str = "t.op") -> OpSpec:
    return OpSpec(name, "test op", "(x, *, out, stream)", "identity", 0.0)


def test_builtin_ops_are_registered() -> None:
    reg = get_registry()
    assert BUILTIN_OPS <= set(reg.ops())
    for op in BUILTIN_OPS:
        assert all(i.provider == "ds4nb" for i in reg.implementations(op)), op


def test_kernels_table_rows() -> None:
    rows = get_registry().table()
    assert all(len(r) == len(KERNELS_TABLE_HEADER) for r in rows)
    by_key = {(r[0], r[1]): r for r in rows}
    op, impl, layout, req, provider = by_key[("q8_0.matvec", "warp8")]
    assert layout == "q8_0/block-minor" and "cc>=6.1" in req and "batch 1..1" in req and provider == "ds4nb"
    assert {r[0] for r in rows} >= BUILTIN_OPS


def test_requirements_predicate() -> None:
    req = Requirements(min_cc=(8, 0), max_batch=8, needs_cupy=True)
    assert req.unmet(VOLTA, 1) == ["needs cc >= 8.0", "needs CuPy"]
    assert "needs batch <= 8" in req.unmet(H100, 9)
    assert not Requirements(min_cc=(8, 0)).unmet(H100, 4096)
    assert Requirements(simulator=False).unmet(SIM)
    assert req.describe() == "cc>=8.0, batch 1..8, cupy"


def test_select_prefers_priority_then_falls_back() -> None:
    reg = KernelRegistry()
    reg.define_op(_op())
    reg.register("t.op", "fast", lambda *a, **k: "fast", layout="l", priority=10,
                 requires=Requirements(min_cc=(9, 0)))
    reg.register("t.op", "batched", lambda *a, **k: "batched", layout="l", priority=5,
                 requires=Requirements(min_batch=2))
    reg.register("t.op", "portable", lambda *a, **k: "portable", layout="l")
    assert reg.select("t.op", device=H100, batch=1).name == "fast"
    assert reg.select("t.op", device=VOLTA, batch=1).name == "portable"
    assert reg.select("t.op", device=VOLTA, batch=4).name == "batched"
    assert reg.select("t.op", device=H100, batch=1, prefer=["portable"]).name == "portable"
    assert reg.select("t.op", device=H100, prefer=["missing"]).name == "fast"
    assert reg.select("t.op", device=H100)(out=None) == "fast"


def test_select_explains_when_nothing_runs() -> None:
    reg = KernelRegistry()
    reg.define_op(_op())
    reg.register("t.op", "hopper", lambda: None, layout="l", requires=Requirements(min_cc=(9, 0)))
    with pytest.raises(KernelRegistryError, match="hopper: needs cc >= 9.0"):
        reg.select("t.op", device=VOLTA)


def test_registration_errors() -> None:
    reg = KernelRegistry()
    with pytest.raises(KernelRegistryError, match="unknown op"):
        reg.register("nope", "x", lambda: None, layout="l")
    reg.define_op(_op())
    with pytest.raises(KernelRegistryError, match="already defined"):
        reg.define_op(_op())
    reg.register("t.op", "x", lambda: None, layout="l")
    with pytest.raises(KernelRegistryError, match="already registered"):
        reg.register("t.op", "x", lambda: None, layout="l")
    reg.register("t.op", "x", lambda: 1, layout="l2", replace=True)
    assert reg.get("t.op", "x").layout == "l2"
    with pytest.raises(KernelRegistryError, match="known: x"):
        reg.get("t.op", "y")


class _Plugin:
    """A third-party kernel plugin: a new op and an extra implementation of a built-in one."""

    @hookimpl
    def ds4nb_register_kernels(self, registry):
        registry.define_op(_op("plugin.op"))

        @implementation("plugin.op", "mine", layout="plugin-layout")
        def mine(x, *, out, stream=0):
            """A plugin kernel."""

        mod = types.ModuleType("acme_kernels")
        mod.mine = mine
        registry.add_module(mod)
        registry.register("q8_0.matvec", "plugin_warp", lambda *a, **k: None, layout="q8_0/block-minor",
                          priority=-1)


class _BrokenPlugin:
    @hookimpl
    def ds4nb_register_kernels(self, registry):
        raise RuntimeError("boom")


def test_plugins_register_through_the_hook() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(_Plugin(), name="acme-kernels")
    reg = build_registry(pm)
    assert reg.get("plugin.op", "mine").provider == "acme-kernels"
    assert reg.get("plugin.op", "mine").summary == "A plugin kernel."
    assert reg.get("q8_0.matvec", "plugin_warp").provider == "acme-kernels"
    assert reg.get("q8_0.matvec", "warp8").provider == "ds4nb"
    # the built-in stays first (higher priority)
    assert reg.select("q8_0.matvec", device=H100, batch=1).name == "warp8"
    assert ("plugin.op", "mine", "plugin-layout", "cc>=6.1", "acme-kernels") in reg.table()


def test_a_failing_plugin_is_an_error_naming_it() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(_BrokenPlugin(), name="broken-kernels")
    with pytest.raises(PluginError, match="^plugin broken-kernels: ds4nb_register_kernels raised RuntimeError: boom$"):
        build_registry(pm)


def _rival(priority: int, *, name: str = "aaa_first_by_name", replace: bool = False):
    class Rival:
        @hookimpl
        def ds4nb_register_kernels(self, registry):
            registry.register("q8_0.matvec", name, lambda *a, **k: "rival", layout="q8_0/block-minor",
                              priority=priority, replace=replace,
                              requires=Requirements(min_batch=1, max_batch=1))

    return Rival()


def test_a_plugin_beats_a_builtin_only_by_a_higher_priority() -> None:
    builtin = get_registry().get("q8_0.matvec", "warp8").priority
    for priority, winner in ((builtin, "warp8"), (builtin - 1, "warp8"), (builtin + 1, "aaa_first_by_name")):
        pm = new_plugin_manager(load_entry_points=False)
        pm.register(_rival(priority), name="rival-kernels")
        reg = build_registry(pm)
        assert reg.select("q8_0.matvec", device=H100, batch=1).name == winner, priority
        assert reg.implementations("q8_0.matvec")[0].name == winner


def test_a_plugin_cannot_replace_a_builtin_by_name() -> None:
    pm = new_plugin_manager(load_entry_points=False)
    pm.register(_rival(100, name="warp8", replace=True), name="rival-kernels")
    with pytest.raises(PluginError, match="rival-kernels: .*implementation 'warp8' is already registered \\(by ds4nb\\)"):
        build_registry(pm)


def test_a_provider_may_replace_its_own_implementation() -> None:
    reg = KernelRegistry()
    reg.define_op(_op())
    with reg.providing("acme"):
        reg.register("t.op", "x", lambda: 1, layout="l")
        reg.register("t.op", "x", lambda: 2, layout="l2", replace=True)
    with reg.providing("other"), pytest.raises(KernelRegistryError, match="already registered \\(by acme\\)"):
        reg.register("t.op", "x", lambda: 3, layout="l3", replace=True)
    assert reg.get("t.op", "x").layout == "l2" and reg.get("t.op", "x").provider == "acme"


def test_plugin_manager_reads_the_ds4nb_entry_point_group(monkeypatch) -> None:
    from importlib import metadata

    seen = []
    monkeypatch.setattr(metadata, "entry_points", lambda **kw: seen.append(kw) or [])
    new_plugin_manager()
    assert seen == [{"group": "ds4nb"}]
