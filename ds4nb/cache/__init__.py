"""Where weights live: placement options, policies and plans (and the residency that executes them).

The engine calls :func:`ds4nb.cache.choose.choose_placement` once per
session with a :class:`~ds4nb.cache.options.PlacementOptions` and the
policies of :func:`ds4nb.plugins.placement_policies`, and reads the
:class:`~ds4nb.cache.plan.PlacementPlan` it returns (``where``,
``device_experts``).  Policies: ``full``, ``partial``, ``direct``
(:mod:`ds4nb.cache.policies`) and any plugin's.
"""
