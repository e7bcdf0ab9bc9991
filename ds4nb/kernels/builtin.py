"""The built-in kernel plugin: registers ds4nb's own ops and implementations.

It goes through the same ``ds4nb_register_kernels`` hook as third-party
plugins (:mod:`ds4nb.plugins` registers it first), so built-ins have no
privileged path into the registry.  Every public module of
``ds4nb.kernels`` is a kernel module: its ``OPS`` are defined and its
``@implementation`` launchers registered, so a new op family is a new module
and nothing else.
"""

from __future__ import annotations

import importlib
import pkgutil

from ds4nb.hooks import hookimpl

#: Modules of ds4nb.kernels that hold no kernels.
NOT_KERNEL_MODULES = frozenset({"builtin", "intrinsics", "parity", "registry"})


def kernel_modules() -> list:
    import ds4nb.kernels as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                   if not m.name.startswith("_") and m.name not in NOT_KERNEL_MODULES)
    return [importlib.import_module(f"ds4nb.kernels.{name}") for name in names]


@hookimpl
def ds4nb_register_kernels(registry) -> None:
    for module in kernel_modules():
        registry.add_module(module)
