"""ds4nb's hook specifications: the contract between ds4nb and its plugins.

This module is the one home of the pluggy markers (project ``ds4nb``) and of
every hookspec.  It imports no other ds4nb module, so any layer may import it
(built-in plugins do); the process-wide plugin manager that calls these hooks
lives in :mod:`ds4nb.plugins`.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose
names and argument names match the specs below; it may implement any subset.
Third-party plugins are found through the ``ds4nb`` entry-point group (see
:mod:`ds4nb.plugins`).
"""

from __future__ import annotations

import pluggy

PROJECT = "ds4nb"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def ds4nb_register_kernels(registry) -> None:
    """Add kernel implementations (and, if new, op specs) to ``registry``.

    ``registry`` is a :class:`ds4nb.kernels.registry.KernelRegistry`.  Call
    ``registry.define_op(OpSpec(...))`` for a new op and
    ``registry.register(op, name, fn, layout=..., requires=Requirements(...), priority=...)``
    (or ``registry.add_module(module)`` for functions marked with
    ``@ds4nb.kernels.registry.implementation``) for each implementation.
    Every implementation of an op takes the op's calling convention (see the
    op's ``OpSpec.signature``) and writes into caller-provided outputs.

    The built-in implementations are registered first.  A plugin's
    implementation is chosen over a built-in one only when its ``priority``
    is higher; at equal priority the built-in wins.  A plugin may not replace
    an implementation another provider registered.
    """


@hookspec
def ds4nb_placement_policies():
    """Return placement policies: a sequence of objects with a ``name`` and a ``plan`` method.

    A policy follows :class:`ds4nb.cache.plan.PlacementPolicy`: ``name`` is
    what ``--placement NAME`` selects (unique across plugins; the built-ins
    are ``full``, ``partial`` and ``direct``), and ``plan(request)`` gets a
    :class:`ds4nb.cache.plan.PlacementRequest` (tensor catalog, device memory,
    weight budget, optional expert usage, the ``ARG`` of ``--placement
    NAME:ARG``) and returns a :class:`ds4nb.cache.plan.PlacementPlan` built
    with ``PlacementPlan.build``.  A policy that accepts an ``ARG`` sets
    ``takes_arg = True``.  ds4nb checks every plan (each tensor placed once,
    device bytes within the budget) and reports a bad one as the plugin's
    error.
    """
