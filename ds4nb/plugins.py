"""ds4nb's plugin system: one pluggy ``PluginManager`` per process, and what it builds.

Third-party packages extend ds4nb by exposing a module (or object) under the
``ds4nb`` entry-point group, e.g. in their ``pyproject.toml``::

    [project.entry-points.ds4nb]
    my_kernels = "my_pkg.ds4nb_plugin"

and implementing hooks (specified in :mod:`ds4nb.hooks`) marked with
:data:`hookimpl`::

    from ds4nb.plugins import hookimpl   # or: from ds4nb.hooks import hookimpl

    @hookimpl
    def ds4nb_register_kernels(registry):
        registry.register("q8_0.matvec", "mine", my_launcher, layout="q8_0/block-minor", priority=20)

The built-in plugins (:mod:`ds4nb.kernels.builtin`, :mod:`ds4nb.cache.builtin`)
answer the same hooks and are registered first.  A plugin is named after its
distribution (``dist:entry_point`` when one distribution has several).  A
plugin that fails to import, fails validation, raises in a hook or returns
something invalid is a :class:`~ds4nb.errors.PluginError` naming it: the
CLI prints one line and exits 2; nothing is skipped silently.

The plugin manager and the kernel registry it fills (:func:`get_registry`)
are ds4nb's only process-wide mutable state.  This module sits above the
layers whose built-in plugins it imports (lazily); those layers import only
:mod:`ds4nb.hooks`.
"""

from __future__ import annotations

import importlib
import threading
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any

import pluggy

from ds4nb import hooks
from ds4nb.errors import PluginError
from ds4nb.hooks import PROJECT, hookimpl, hookspec

__all__ = [
    "BUILTIN", "BUILTIN_PLUGINS", "ENTRY_POINT_GROUP", "PROJECT", "PluginInfo", "build_registry", "check_hooks",
    "entry_point_plugins", "get_plugin_manager", "get_registry", "hookimpl", "hookspec", "is_builtin",
    "new_plugin_manager", "placement_policies", "plugin_infos", "provider", "register_entry_points",
]

if TYPE_CHECKING:
    from ds4nb.cache.plan import ProvidedPolicy
    from ds4nb.kernels.registry import KernelRegistry

ENTRY_POINT_GROUP = "ds4nb"

#: Provider name of everything built in.
BUILTIN = "ds4nb"

#: Built-in plugin modules, registered in this order before any entry point.
BUILTIN_PLUGINS = ("ds4nb.kernels.builtin", "ds4nb.cache.builtin")

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None
_registry: KernelRegistry | None = None


# ---------------------------------------------------------------------------
# the manager


def _builtin_name(module: str) -> str:
    return f"{BUILTIN}.builtin.{module.split('.')[1]}"


def is_builtin(pm: pluggy.PluginManager, plugin: object) -> bool:
    return (pm.get_name(plugin) or "").startswith(f"{BUILTIN}.builtin.")


def provider(pm: pluggy.PluginManager, plugin: object) -> str:
    """Who provides what ``plugin`` registers: ``ds4nb`` for built-ins, else the plugin's name."""
    return BUILTIN if is_builtin(pm, plugin) else (pm.get_name(plugin) or repr(plugin))


def _register(pm: pluggy.PluginManager, plugin: object, name: str) -> None:
    try:
        pm.register(plugin, name=name)
    except (pluggy.PluginValidationError, ValueError) as e:
        raise PluginError(name, f"does not fit ds4nb's hooks: {e}") from None


def entry_point_plugins() -> list[tuple[str, metadata.EntryPoint]]:
    """(plugin name, entry point) of every installed ``ds4nb`` entry point, in name order."""
    eps = list(metadata.entry_points(group=ENTRY_POINT_GROUP))
    per_dist = Counter(_dist_name(ep) for ep in eps)
    named = [(d if per_dist[d] == 1 else f"{d}:{ep.name}", ep) for ep in eps for d in [_dist_name(ep)]]
    return sorted(named, key=lambda x: x[0])


def _dist_name(ep: metadata.EntryPoint) -> str:
    return ep.dist.name if ep.dist is not None else ep.name


def register_entry_points(pm: pluggy.PluginManager) -> None:
    """Import and register every ``ds4nb`` entry point; the first failure is a :class:`PluginError`."""
    for name, ep in entry_point_plugins():
        if pm.has_plugin(name) or pm.is_blocked(name):
            continue
        try:
            plugin = ep.load()
        except Exception as e:
            raise PluginError(name, f"failed to import {ep.value}: {type(e).__name__}: {e}") from None
        _register(pm, plugin, name)


def new_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with every hookspec and the built-in plugins (tests use this)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hooks)
    for module in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module), name=_builtin_name(module))
    if load_entry_points:
        register_entry_points(pm)
        check_hooks(pm)
    return pm


def check_hooks(pm: pluggy.PluginManager) -> None:
    """Every hook a plugin implements must be one ds4nb specifies (catches misspelt hook names)."""
    for name, caller in sorted(vars(pm.hook).items()):
        if caller.spec is not None:
            continue
        for impl in caller.get_hookimpls():
            if not impl.optionalhook:
                specs = ", ".join(sorted(n for n in vars(hooks) if n.startswith(f"{PROJECT}_")))
                raise PluginError(provider(pm, impl.plugin),
                                  f"implements {name!r}, which is not a ds4nb hook (ds4nb's hooks: {specs})")


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (created on first use, entry points loaded once)."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = new_plugin_manager()
        return _manager


# ---------------------------------------------------------------------------
# what the hooks build


def _hookimpls(pm: pluggy.PluginManager, hook: str) -> list[Any]:
    """A hook's implementations, built-ins first, then by plugin name (a stable, documented order)."""
    impls = getattr(pm.hook, hook).get_hookimpls()
    return sorted(impls, key=lambda i: (not is_builtin(pm, i.plugin), provider(pm, i.plugin)))


def build_registry(pm: pluggy.PluginManager) -> KernelRegistry:
    """A kernel registry filled by every plugin of ``pm``, each addition attributed to its provider."""
    from ds4nb.kernels.registry import KernelRegistry

    reg = KernelRegistry()
    for impl in _hookimpls(pm, "ds4nb_register_kernels"):
        who = provider(pm, impl.plugin)
        with reg.providing(who):
            try:
                impl.function(registry=reg)
            except Exception as e:
                if is_builtin(pm, impl.plugin):
                    raise  # a ds4nb bug: the traceback helps
                raise PluginError(who, f"ds4nb_register_kernels raised {type(e).__name__}: {e}") from None
    return reg


def get_registry() -> KernelRegistry:
    """The process-wide kernel registry: built-ins plus every plugin's, built once."""
    global _registry
    pm = get_plugin_manager()
    with _lock:
        if _registry is None:
            _registry = build_registry(pm)
        return _registry


def placement_policies(pm: pluggy.PluginManager | None = None) -> dict[str, ProvidedPolicy]:
    """Every placement policy by name, with its provider (built-ins first)."""
    from ds4nb.cache.plan import ProvidedPolicy

    pm = pm or get_plugin_manager()
    out: dict[str, ProvidedPolicy] = {}
    for impl in _hookimpls(pm, "ds4nb_placement_policies"):
        who, builtin = provider(pm, impl.plugin), is_builtin(pm, impl.plugin)
        try:
            returned = impl.function()
            policies = list(returned) if returned is not None else []
        except Exception as e:
            raise PluginError(who, f"ds4nb_placement_policies raised {type(e).__name__}: {e}") from None
        for policy in policies:
            name = getattr(policy, "name", None)
            if not isinstance(name, str) or not name or not callable(getattr(policy, "plan", None)):
                raise PluginError(who, f"ds4nb_placement_policies returned {policy!r}, which is not a placement "
                                       f"policy (it needs a string 'name' and a 'plan(request)' method)")
            if name in out:
                raise PluginError(who, f"placement policy {name!r} is already provided by {out[name].provider}")
            out[name] = ProvidedPolicy(policy, who, builtin)
    return out


# ---------------------------------------------------------------------------
# listing


@dataclass(frozen=True)
class PluginInfo:
    """One registered plugin, for ``ds4nb plugins``."""

    name: str
    version: str
    hooks: tuple[str, ...]


def plugin_infos(pm: pluggy.PluginManager | None = None) -> list[PluginInfo]:
    """Every plugin: built-ins (as ``ds4nb``) first, then by name."""
    from ds4nb import __version__

    pm = pm or get_plugin_manager()
    versions = {name: ep.dist.version for name, ep in entry_point_plugins() if ep.dist is not None}
    merged: dict[str, set[str]] = {}
    for plugin in pm.get_plugins():
        hooknames = {c.name for c in pm.get_hookcallers(plugin) or ()}
        merged.setdefault(provider(pm, plugin), set()).update(hooknames)
    infos = [PluginInfo(name, __version__ if name == BUILTIN else versions.get(name, "-"), tuple(sorted(h)))
             for name, h in merged.items()]
    return sorted(infos, key=lambda i: (i.name != BUILTIN, i.name))

