"""ds4nb's plugin system: one pluggy ``PluginManager`` for project ``ds4nb``.

Third-party packages extend ds4nb by exposing a module (or object) under the
``ds4nb`` entry-point group, e.g. in their ``pyproject.toml``::

    [project.entry-points.ds4nb]
    my_kernels = "my_pkg.ds4nb_plugin"

and implementing hooks marked with :data:`hookimpl`::

    from ds4nb.plugins import hookimpl

    @hookimpl
    def ds4nb_register_kernels(registry):
        registry.register("q8_0.matvec", "mine", my_launcher, layout="q8_0/block-minor")

Hook specifications live beside the subsystem that calls them (kernels:
``ds4nb.kernels.hookspecs``) and are all added here, so there is exactly one
manager per process.  Built-in implementations are registered through the
same hooks as third-party ones (``ds4nb.kernels.builtin``).
"""

from __future__ import annotations

import threading
import warnings
from importlib.metadata import entry_points

import pluggy

from ds4nb.errors import shown

PROJECT = "ds4nb"
ENTRY_POINT_GROUP = "ds4nb"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_lock = threading.Lock()
_manager: pluggy.PluginManager | None = None


def _hookspec_modules() -> list:
    from ds4nb.kernels import hookspecs as kernel_specs

    return [kernel_specs]


def _builtin_plugins() -> list:
    from ds4nb.kernels import builtin as builtin_kernels

    return [builtin_kernels]


def new_plugin_manager(*, load_entry_points: bool = True) -> pluggy.PluginManager:
    """A fresh manager with every hookspec and the built-in plugins (tests use this)."""
    pm = pluggy.PluginManager(PROJECT)
    for mod in _hookspec_modules():
        pm.add_hookspecs(mod)
    for plugin in _builtin_plugins():
        pm.register(plugin, name=f"{PROJECT}.builtin.{plugin.__name__.rsplit('.', 1)[-1]}")
    if load_entry_points:
        _load_entry_points(pm)
    return pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    """Register every ``ds4nb`` entry point; one that fails to import is skipped with a warning."""
    for name in sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}):
        try:
            pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
        except Exception as exc:  # a broken third-party package must not take ds4nb down
            warnings.warn(f"plugin {shown(name)} failed to load and is skipped: {type(exc).__name__}: "
                          f"{shown(exc, 200)}", stacklevel=2)


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide manager (created on first use, entry points loaded once)."""
    global _manager
    with _lock:
        if _manager is None:
            _manager = new_plugin_manager()
        return _manager


def plugin_name(pm: pluggy.PluginManager, plugin: object) -> str:
    """Distribution name of an entry-point plugin, else its registered name."""
    for p, dist in pm.list_plugin_distinfo():
        if p is plugin:
            return str(getattr(dist, "project_name", None) or dist.metadata["name"])
    return pm.get_name(plugin) or repr(plugin)
