"""Choosing a placement: the user's options, a device and the policies -> a checked plan.

The engine (and ``ds4nb placement``) call :func:`choose_placement` once per
session.  It resolves the GPU budget on the device (a share of total memory,
or bytes; refused when it is more than free memory less the engine's
reserve), checks an expert usage profile against the model, runs the chosen
policy (default: ``full`` when everything fits, else ``partial``) and checks
the plan it returns: every tensor placed once, device bytes within the
budget.  A third-party policy that raises or returns a bad plan is a
:class:`~ds4nb.errors.PluginError` naming its plugin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ds4nb.cache.options import PlacementOptions
from ds4nb.cache.plan import DeviceMemory, PlacementPlan, PlacementRequest, ProvidedPolicy, format_bytes, layers_of
from ds4nb.errors import Ds4Error, PluginError
from ds4nb.model import TensorInfo


def placement_request(catalog: Sequence[TensorInfo], device: DeviceMemory, options: PlacementOptions,
                      *, reserve_bytes: int) -> PlacementRequest:
    """What the policy will see: the budget resolved on ``device``, the usage profile checked."""
    budget = None
    if options.gpu_budget is not None:
        budget = options.gpu_budget.resolve(device.total_bytes)
        room = device.free_bytes - reserve_bytes
        if budget > room:
            raise Ds4Error(f"--gpu-budget {options.gpu_budget.text} ({format_bytes(budget)}) is more than the GPU "
                           f"({device.name}) can give weights: {format_bytes(device.free_bytes)} free, "
                           f"{format_bytes(reserve_bytes)} kept for KV cache and activations")
    if options.expert_usage is not None:
        options.expert_usage.check(layers_of(catalog))
    return PlacementRequest(catalog=tuple(catalog), device=device, reserve_bytes=reserve_bytes,
                            budget_bytes=budget, expert_usage=options.expert_usage, policy_arg=options.policy_arg)


def default_policy(request: PlacementRequest) -> str:
    """``full`` when every tensor fits the weight budget, else ``partial``."""
    return "full" if sum(t.nbytes for t in request.catalog) <= request.weight_budget else "partial"


def known_policy(name: str, policies: Mapping[str, ProvidedPolicy]) -> ProvidedPolicy:
    """The policy called ``name``; one clear error naming the known ones when there is none."""
    provided = policies.get(name)
    if provided is None:
        raise Ds4Error(f"unknown placement policy {name!r} (known: {', '.join(sorted(policies))})")
    return provided


def choose_placement(catalog: Sequence[TensorInfo], device: DeviceMemory, options: PlacementOptions, *,
                     reserve_bytes: int, policies: Mapping[str, ProvidedPolicy]) -> PlacementPlan:
    """The checked plan for ``catalog`` on ``device`` (``policies``: :func:`ds4nb.plugins.placement_policies`)."""
    request = placement_request(catalog, device, options, reserve_bytes=reserve_bytes)
    name = options.policy or default_policy(request)
    provided = known_policy(name, policies)
    if options.policy_arg is not None and not getattr(provided.policy, "takes_arg", False):
        raise Ds4Error(f"placement policy {name!r} takes no argument (got {name}:{options.policy_arg})")
    return run_policy(provided, request)


def run_policy(provided: ProvidedPolicy, request: PlacementRequest) -> PlacementPlan:
    """Run one policy and check its plan; a plugin's failure becomes its :class:`PluginError`."""
    name = provided.name
    try:
        plan = provided.policy.plan(request)
    except Ds4Error as e:
        if provided.builtin:
            raise
        raise PluginError(provided.provider, f"placement policy {name!r}: {e}") from None
    except Exception as e:
        if provided.builtin:
            raise
        raise PluginError(provided.provider, f"placement policy {name!r} raised {type(e).__name__}: {e}") from None
    return check_plan(provided, plan, request)


def check_plan(provided: ProvidedPolicy, plan: object, request: PlacementRequest) -> PlacementPlan:
    """``plan`` rebuilt from its placements against the catalog (so its byte counts are ds4nb's) and budgeted."""
    name, who = provided.name, provided.provider
    if not isinstance(plan, PlacementPlan):
        raise PluginError(who, f"placement policy {name!r} returned a {type(plan).__name__}, not a PlacementPlan")
    try:
        checked = PlacementPlan.build(name, request.catalog, plan.placements)
    except Ds4Error as e:
        raise PluginError(who, str(e)) from None
    if checked.device_bytes > request.weight_budget:
        raise PluginError(who, f"placement policy {name!r} put {format_bytes(checked.device_bytes)} on the GPU, "
                               f"over the weight budget of {format_bytes(request.weight_budget)}")
    return checked
