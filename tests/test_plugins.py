"""The plugin system: one home for hooks, layering, entry-point discovery, and every way a plugin can fail.

Plugins are "installed" for a test by writing a distribution's metadata
(``*.dist-info`` with ``entry_points.txt``) and its modules into a temporary
directory put on ``sys.path``: ``importlib.metadata`` then finds their
``ds4nb`` entry points exactly as it finds a pip-installed package's.  The
example plugin ``plugins/ds4nb-rules`` is installed that way from its own
``pyproject.toml``.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

import ds4nb
from ds4nb import hooks, plugins
from ds4nb.cache.choose import choose_placement
from ds4nb.cache.options import GpuBudget, PlacementOptions
from ds4nb.cache.plan import DeviceMemory, engine_tensors, format_bytes
from ds4nb.cli import main
from ds4nb.errors import PluginError

ROOT = Path(__file__).resolve().parents[1]
RULES_PLUGIN = ROOT / "plugins" / "ds4nb-rules"
GPU = DeviceMemory("test GPU", 1 << 30, 1 << 30)
_unique = itertools.count()


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``install(dist, entry_points, modules)``: a distribution on a temporary ``sys.path`` entry.

    Also gives the test a fresh process-wide plugin manager and kernel registry
    (the previous ones come back afterwards).
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugins, "_manager", None)
    monkeypatch.setattr(plugins, "_registry", None)

    def install(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None,
                version: str = "1.0") -> None:
        for name, source in (modules or {}).items():
            (site / f"{name}.py").write_text(textwrap.dedent(source))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("[ds4nb]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
        importlib.invalidate_caches()

    return install


def module_name() -> str:
    """A module name no other test uses (modules stay in sys.modules)."""
    return f"ds4nb_test_plugin_{next(_unique)}"


def install_rules_plugin(install) -> None:
    """The example plugin, with the entry points and version its pyproject.toml declares."""
    project = tomllib.loads((RULES_PLUGIN / "pyproject.toml").read_text())["project"]
    install(project["name"], project["entry-points"]["ds4nb"], version=project["version"])


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---------------------------------------------------------------------------
# one home for hooks; layering


def test_hooks_module_imports_no_other_ds4nb_module() -> None:
    code = "import sys, ds4nb.hooks; print(sorted(m for m in sys.modules if m.startswith('ds4nb')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['ds4nb', 'ds4nb.hooks']"


def test_every_hookspec_lives_in_ds4nb_hooks_and_plugins_reexport_the_markers() -> None:
    assert plugins.hookimpl is hooks.hookimpl and plugins.hookspec is hooks.hookspec
    pm = plugins.new_plugin_manager(load_entry_points=False)
    specs = {name for name in vars(hooks) if name.startswith("ds4nb_")}
    assert specs == {"ds4nb_register_kernels", "ds4nb_placement_policies"}
    for name in specs:
        assert getattr(pm.hook, name).spec.namespace is hooks
    found = []
    for path in (ROOT / "ds4nb").rglob("*.py"):
        tree = ast.parse(path.read_text())
        found += [path.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                  for d in node.decorator_list if isinstance(d, ast.Name) and d.id == "hookspec"]
    assert found == ["hooks.py"] * len(specs)


# who may import what: model -> cache -> dispatch -> kernels -> engine -> cli (plugins above the built-ins)
FORBIDDEN = {
    "model": ("ds4nb.cache", "ds4nb.dispatch", "ds4nb.kernels", "ds4nb.engine"),
    "cache": ("ds4nb.dispatch", "ds4nb.kernels", "ds4nb.engine"),
    "dispatch": ("ds4nb.kernels", "ds4nb.engine"),
    "kernels": ("ds4nb.engine",),
}
NEVER_BELOW = ("ds4nb.plugins", "ds4nb.cli", "ds4nb.bench")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer: str) -> None:
    bad = []
    for path in (ROOT / "ds4nb" / layer).rglob("*.py"):
        for name in _imports(path):
            if name.startswith(FORBIDDEN[layer] + NEVER_BELOW):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad


# ---------------------------------------------------------------------------
# discovery


def test_the_builtins_answer_the_same_hooks() -> None:
    pm = plugins.new_plugin_manager(load_entry_points=False)
    policies = plugins.placement_policies(pm)
    assert list(policies) == ["full", "partial", "direct"]
    assert {p.provider for p in policies.values()} == {"ds4nb"} and all(p.builtin for p in policies.values())
    infos = plugins.plugin_infos(pm)
    assert [(i.name, i.version, i.hooks) for i in infos] == [
        ("ds4nb", ds4nb.__version__, ("ds4nb_placement_policies", "ds4nb_register_kernels"))]


def test_an_installed_plugin_is_discovered_and_listed(install, capsys) -> None:
    install_rules_plugin(install)
    pm = plugins.new_plugin_manager()
    assert pm.has_plugin("ds4nb-rules")
    policies = plugins.placement_policies(pm)
    assert policies["rules"].provider == "ds4nb-rules" and not policies["rules"].builtin
    assert list(policies)[:3] == ["full", "partial", "direct"]
    assert ("ds4nb-rules", "0.1.0", ("ds4nb_placement_policies",)) in \
        [(i.name, i.version, i.hooks) for i in plugins.plugin_infos(pm)]
    rc, out, err = run_cli(capsys, "plugins")
    assert rc == 0, err
    assert re.search(r"│ ds4nb-rules\s+│ 0\.1\.0\s+│ ds4nb_placement_policies", out)
    assert re.search(r"│ rules\s+│ ds4nb-rules\s+│ Tensors placed by a rule file", out)
    assert re.search(r"│ q8_0\.matvec\s+│ warp8\s+│\s+10 │ ds4nb", out)


def test_an_installed_policy_runs_through_the_cli(install, capsys, tiny_model, tiny_gguf: Path,
                                                  tmp_path: Path) -> None:
    install_rules_plugin(install)
    rules = tmp_path / "my.rules"
    rules.write_text("ffn_(gate|up|down)_exps host\ndefault gpu\n")
    rc, out, err = run_cli(capsys, "placement", "-m", str(tiny_gguf), "--placement", f"rules:{rules}")
    assert rc == 0, err
    cat = engine_tensors(tiny_model)
    host = sum(t.nbytes for t in cat if t.role == "routed_expert")
    want = f"rules: {format_bytes(sum(t.nbytes for t in cat) - host)} on the GPU, {format_bytes(host)} host-mapped"
    assert want in out
    rules.write_text("ffn_ cpu\n")
    assert_one_line_error(*run_cli(capsys, "placement", "-m", str(tiny_gguf), "--placement", f"rules:{rules}")[::2],
                          "plugin ds4nb-rules:", "my.rules:1: expected gpu or host, got 'cpu'")


def test_one_distribution_with_two_entry_points(install) -> None:
    a, b = module_name(), module_name()
    src = "from ds4nb.hooks import hookimpl\n"
    install("acme-two", {"first": a, "second": b}, {a: src, b: src})
    pm = plugins.new_plugin_manager()
    assert pm.has_plugin("acme-two:first") and pm.has_plugin("acme-two:second")


# ---------------------------------------------------------------------------
# every way a plugin can fail: one line naming it, exit 2


POLICY_PLUGIN = """
from ds4nb.cache.plan import PlacementPlan
from ds4nb.hooks import hookimpl

class Policy:
    name = "{name}"

    def plan(self, request):
        {body}

@hookimpl
def ds4nb_placement_policies():
    return [Policy()]
"""

BAD_PLUGINS = {
    "fails to import": ({}, "raise RuntimeError('no CUDA toolkit here')",
                        "failed to import {mod}: RuntimeError: no CUDA toolkit here"),
    "missing module": ({"ep": "ds4nb_no_such_module_xyz"}, None,
                       "failed to import ds4nb_no_such_module_xyz: ModuleNotFoundError"),
    "misspelt hook": ({}, "from ds4nb.hooks import hookimpl\n@hookimpl\ndef ds4nb_placement_policy():\n    return []\n",
                      "implements 'ds4nb_placement_policy', which is not a ds4nb hook"),
    "wrong hook arguments": ({}, "from ds4nb.hooks import hookimpl\n@hookimpl\ndef ds4nb_register_kernels(reg):\n"
                                 "    pass\n", "does not fit ds4nb's hooks"),
    "kernel hook raises": ({}, "from ds4nb.hooks import hookimpl\n@hookimpl\ndef ds4nb_register_kernels(registry):\n"
                               "    raise ValueError('bad op table')\n",
                           "ds4nb_register_kernels raised ValueError: bad op table"),
    "policy hook raises": ({}, "from ds4nb.hooks import hookimpl\n@hookimpl\ndef ds4nb_placement_policies():\n"
                               "    raise KeyError('x')\n", "ds4nb_placement_policies raised KeyError"),
    "not a policy": ({}, "from ds4nb.hooks import hookimpl\n@hookimpl\ndef ds4nb_placement_policies():\n"
                         "    return ['greedy']\n", "returned 'greedy', which is not a placement policy"),
    "policy name taken": ({}, POLICY_PLUGIN.format(name="full", body="return None"),
                          "placement policy 'full' is already provided by ds4nb"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLUGINS))
def test_a_broken_plugin_is_one_line_naming_it(case: str, install, capsys) -> None:
    mod = module_name()
    eps, source, message = BAD_PLUGINS[case]
    install("acme-broken", eps or {"ep": mod}, {mod: source} if source else {})
    with pytest.raises(PluginError) as e:
        plugins.new_plugin_manager()
        plugins.build_registry(plugins.get_plugin_manager())
        plugins.placement_policies()
    assert e.value.plugin == "acme-broken" and message.format(mod=mod) in str(e.value), str(e.value)
    forget_process_plugins()
    assert_one_line_error(*run_cli(capsys, "plugins")[::2], "plugin acme-broken:", message.format(mod=mod))


def forget_process_plugins() -> None:
    """Forget the process-wide manager built in the test (the install fixture restores the original)."""
    plugins._manager = None
    plugins._registry = None


BAD_PLANS = {
    "raises": ("raise ZeroDivisionError('division by zero')",
               "placement policy 'acme' raised ZeroDivisionError: division by zero"),
    "raises a ds4nb error": ("from ds4nb.errors import Ds4Error\n        raise Ds4Error('no room')",
                             "placement policy 'acme': no room"),
    "wrong type": ("return {t.name: 'device' for t in request.catalog}",
                   "placement policy 'acme' returned a dict, not a PlacementPlan"),
    "a tensor missing": ("return PlacementPlan('acme', {t.name: 'device' for t in request.catalog[1:]}, 0, 0)",
                         "placement policy 'acme' left 1 tensor unplaced (e.g. token_embd.weight)"),
    "a made-up placement": ("return PlacementPlan('acme', {t.name: 'vram' for t in request.catalog}, 0, 0)",
                            "placed token_embd.weight as 'vram'"),
    "over budget": ("return PlacementPlan.build('acme', request.catalog, {t.name: 'device' for t in request.catalog})",
                    "placement policy 'acme' put "),
    "forged byte counts": ("return PlacementPlan('acme', {t.name: 'device' for t in request.catalog}, 0, 1)",
                           "over the weight budget of 1.00 MiB"),
}


@pytest.mark.parametrize("case", sorted(BAD_PLANS))
def test_a_bad_plan_is_one_line_naming_the_plugin(case: str, install, capsys, tiny_model, tiny_gguf) -> None:
    mod = module_name()
    body, message = BAD_PLANS[case]
    install("acme-placement", {"policy": mod}, {mod: POLICY_PLUGIN.format(name="acme", body=body)})
    options = PlacementOptions(policy="acme", gpu_budget=GpuBudget("1M", nbytes=1 << 20))
    with pytest.raises(PluginError) as e:
        choose_placement(engine_tensors(tiny_model), GPU, options, reserve_bytes=0,
                         policies=plugins.placement_policies())
    assert e.value.plugin == "acme-placement" and message in str(e.value), str(e.value)
    forget_process_plugins()
    assert_one_line_error(*run_cli(capsys, "placement", "-m", str(tiny_gguf), "--placement", "acme",
                                   "--gpu-budget", "1M")[::2], "plugin acme-placement:", message)


def test_a_good_plugin_plan_is_rebuilt_and_used(install, tiny_model) -> None:
    mod = module_name()
    body = ("return PlacementPlan.build('acme', request.catalog, "
            "{t.name: 'device' if t.role == 'norm' else 'mapped' for t in request.catalog})")
    install("acme-placement", {"policy": mod}, {mod: POLICY_PLUGIN.format(name="acme", body=body)})
    cat = engine_tensors(tiny_model)
    plan = choose_placement(cat, GPU, PlacementOptions(policy="acme"), reserve_bytes=0,
                            policies=plugins.placement_policies())
    assert plan.policy == "acme"
    assert plan.device_bytes == sum(t.nbytes for t in cat if t.role == "norm")
