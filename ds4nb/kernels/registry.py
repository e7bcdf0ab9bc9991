"""The kernel registry: named ops, their implementations, and what each needs.

An **op** (``q8_0.matvec``, ``iq2_xxs.moe_gate_up``, ``norm.rms`` ...) is a
calling convention plus a numpy twin and a tolerance (:class:`OpSpec`, defined
beside its kernels).  An **implementation** is one host launcher for that op
with a capability predicate (:class:`Requirements`: compute capability, batch
range, CuPy, simulator) and metadata (the weight layout it reads, the plugin
that provided it).  Callers ask the registry for the best implementation that
can run here (:meth:`KernelRegistry.select`) once, at setup, and then call it
directly on the hot path.

Built-in implementations and third-party ones arrive the same way, through
the pluggy hook ``ds4nb_register_kernels(registry)`` (:mod:`ds4nb.hooks`);
the plugin manager fills the process-wide registry
(:func:`ds4nb.plugins.get_registry`).  Selection never depends on who
registered first or on name order between providers: a plugin's
implementation beats a built-in one only with a higher ``priority``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

#: Header of :meth:`KernelRegistry.table` rows.
KERNELS_TABLE_HEADER: tuple[str, ...] = ("op", "implementation", "layout", "requirements", "provider")

BUILTIN_PROVIDER = "ds4nb"


class KernelRegistryError(LookupError):
    """Unknown op or implementation, duplicate registration, or nothing can run here."""


# ---------------------------------------------------------------------------
# Device facts and requirements
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceInfo:
    """What capability predicates look at."""

    name: str
    cc: tuple[int, int]
    simulator: bool = False
    has_cupy: bool = False

    @classmethod
    def current(cls) -> DeviceInfo:
        """The current numba-cuda device (the simulator reports itself as cc 9.0)."""
        from ds4nb.kernels.intrinsics import SIMULATOR

        if SIMULATOR:
            return cls("cudasim", (9, 0), simulator=True, has_cupy=False)
        from numba import cuda

        dev = cuda.get_current_device()
        name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        return cls(name, tuple(dev.compute_capability), simulator=False, has_cupy=_has_cupy())


def _has_cupy() -> bool:
    try:
        import cupy  # noqa: F401
    except Exception:
        return False
    return True


@dataclass(frozen=True)
class Requirements:
    """Capability predicate of one implementation.

    ``min_cc`` defaults to 6.1, the first architecture with ``dp4a``.
    ``min_batch``/``max_batch`` bound the number of tokens (``None``: no upper
    bound).  ``simulator=False`` marks implementations that cannot run under
    ``NUMBA_ENABLE_CUDASIM`` (e.g. ones calling CuPy).
    """

    min_cc: tuple[int, int] = (6, 1)
    max_cc: tuple[int, int] | None = None
    min_batch: int = 1
    max_batch: int | None = None
    needs_cupy: bool = False
    simulator: bool = True

    def unmet(self, device: DeviceInfo, batch: int | None = None) -> list[str]:
        """Reasons this cannot run on ``device`` for ``batch`` tokens (empty: it can)."""
        why = []
        if device.simulator and not self.simulator:
            why.append("not runnable in the CUDA simulator")
        if not device.simulator:
            if tuple(device.cc) < self.min_cc:
                why.append(f"needs cc >= {self.min_cc[0]}.{self.min_cc[1]}")
            if self.max_cc is not None and tuple(device.cc) > self.max_cc:
                why.append(f"needs cc <= {self.max_cc[0]}.{self.max_cc[1]}")
        if self.needs_cupy and not device.has_cupy:
            why.append("needs CuPy")
        if batch is not None:
            if batch < self.min_batch:
                why.append(f"needs batch >= {self.min_batch}")
            if self.max_batch is not None and batch > self.max_batch:
                why.append(f"needs batch <= {self.max_batch}")
        return why

    def describe(self) -> str:
        parts = [f"cc>={self.min_cc[0]}.{self.min_cc[1]}"]
        if self.max_cc is not None:
            parts.append(f"cc<={self.max_cc[0]}.{self.max_cc[1]}")
        if self.min_batch != 1 or self.max_batch is not None:
            hi = "" if self.max_batch is None else str(self.max_batch)
            parts.append(f"batch {self.min_batch}..{hi}")
        if self.needs_cupy:
            parts.append("cupy")
        if not self.simulator:
            parts.append("no-sim")
        return ", ".join(parts)


# ---------------------------------------------------------------------------
# Ops and implementations
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    """One named op: its calling convention, numpy twin and tolerance.

    ``tolerance`` bounds ``||out - ref|| / ||ref||`` against the twin (0:
    outputs must be bit-identical).  ``make_case(rng, scale)`` builds a fresh
    random parity case (``scale`` is ``"tiny"`` for the simulator or
    ``"model"`` for real DS4 shapes); see ``ds4nb.kernels.parity``.
    """

    name: str
    summary: str
    signature: str
    twin: str
    tolerance: float
    make_case: Callable[..., Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Implementation:
    op: str
    name: str
    fn: Callable[..., Any] = field(compare=False, repr=False)
    layout: str
    requires: Requirements
    provider: str
    priority: int = 0
    summary: str = ""

    def unmet(self, device: DeviceInfo | None = None, batch: int | None = None) -> list[str]:
        return self.requires.unmet(device or DeviceInfo.current(), batch)

    def supports(self, device: DeviceInfo | None = None, batch: int | None = None) -> bool:
        return not self.unmet(device, batch)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


_MARK = "__ds4nb_kernel__"


def implementation(
    op: str,
    name: str,
    *,
    layout: str,
    requires: Requirements | None = None,
    priority: int = 0,
    summary: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a host launcher as an implementation of ``op`` (registered by ``add_module``).

    Marking has no side effect: the function joins a registry only when a
    plugin's ``ds4nb_register_kernels`` hands its module to
    ``registry.add_module``.
    """

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        marks = list(getattr(fn, _MARK, ()))
        marks.append(dict(op=op, name=name, layout=layout, requires=requires or Requirements(),
                          priority=priority, summary=summary or (fn.__doc__ or "").strip().split("\n")[0]))
        setattr(fn, _MARK, marks)
        return fn

    return mark


class KernelRegistry:
    """Op specs and implementations, filled by plugins."""

    def __init__(self) -> None:
        self._ops: dict[str, OpSpec] = {}
        self._impls: dict[str, dict[str, Implementation]] = {}
        self._provider = BUILTIN_PROVIDER
        self._lock = threading.RLock()

    # -- filling ---------------------------------------------------------

    def define_op(self, spec: OpSpec, *, replace: bool = False) -> OpSpec:
        with self._lock:
            if spec.name in self._ops and not replace:
                raise KernelRegistryError(f"op {spec.name!r} is already defined")
            self._ops[spec.name] = spec
            self._impls.setdefault(spec.name, {})
            return spec

    def register(
        self,
        op: str,
        name: str,
        fn: Callable[..., Any] | None = None,
        *,
        layout: str,
        requires: Requirements | None = None,
        provider: str | None = None,
        priority: int = 0,
        summary: str = "",
        replace: bool = False,
    ) -> Any:
        """Register ``fn`` as implementation ``name`` of ``op`` (or use as a decorator without ``fn``)."""
        if fn is None:
            def deco(f: Callable[..., Any]) -> Callable[..., Any]:
                self.register(op, name, f, layout=layout, requires=requires, provider=provider,
                              priority=priority, summary=summary, replace=replace)
                return f

            return deco
        with self._lock:
            if op not in self._ops:
                raise KernelRegistryError(f"unknown op {op!r}: define it with registry.define_op first")
            impls = self._impls[op]
            provider = provider or self._provider
            if name in impls and not (replace and impls[name].provider == provider):
                raise KernelRegistryError(f"{op}: implementation {name!r} is already registered "
                                          f"(by {impls[name].provider})")
            impl = Implementation(op, name, fn, layout, requires or Requirements(), provider,
                                  priority, summary or (fn.__doc__ or "").strip().split("\n")[0])
            impls[name] = impl
            return impl

    def add_module(self, module: ModuleType, *, provider: str | None = None) -> list[Implementation]:
        """Define the module's ``OPS`` (if any) and register its ``@implementation`` functions."""
        for spec in getattr(module, "OPS", ()):
            if spec.name not in self._ops:
                self.define_op(spec)
        added = []
        for value in vars(module).values():
            for mark in getattr(value, _MARK, ()):
                added.append(self.register(fn=value, provider=provider, **mark))
        return added

    @contextmanager
    def providing(self, provider: str) -> Iterator[KernelRegistry]:
        """Attribute what is registered inside the block to ``provider`` (the plugin manager uses this)."""
        with self._lock:
            previous, self._provider = self._provider, provider
            try:
                yield self
            finally:
                self._provider = previous

    # -- queries ---------------------------------------------------------

    def ops(self) -> list[str]:
        return sorted(self._ops)

    def op(self, name: str) -> OpSpec:
        try:
            return self._ops[name]
        except KeyError:
            raise KernelRegistryError(f"unknown op {name!r}") from None

    def implementations(self, op: str) -> list[Implementation]:
        """Implementations of ``op``, best first: higher priority, then built-in before plugin, then name."""
        self.op(op)
        return sorted(self._impls[op].values(),
                      key=lambda i: (-i.priority, i.provider != BUILTIN_PROVIDER, i.name))

    def get(self, op: str, name: str) -> Implementation:
        self.op(op)
        try:
            return self._impls[op][name]
        except KeyError:
            known = ", ".join(sorted(self._impls[op])) or "none"
            raise KernelRegistryError(f"{op}: no implementation {name!r} (known: {known})") from None

    def select(
        self,
        op: str,
        *,
        device: DeviceInfo | None = None,
        batch: int | None = None,
        prefer: Iterable[str] = (),
    ) -> Implementation:
        """The implementation to use: the first of ``prefer`` that can run, else the best that can."""
        device = device or DeviceInfo.current()
        impls = self.implementations(op)
        by_name = {i.name: i for i in impls}
        for name in prefer:
            impl = by_name.get(name)
            if impl is not None and impl.supports(device, batch):
                return impl
        for impl in impls:
            if impl.supports(device, batch):
                return impl
        reasons = "; ".join(f"{i.name}: {', '.join(i.unmet(device, batch))}" for i in impls) or "none registered"
        raise KernelRegistryError(f"{op}: nothing can run on {device.name} (batch={batch}): {reasons}")

    def table(self) -> list[tuple[str, ...]]:
        """One row per implementation: (op, implementation, layout, requirements, provider)."""
        rows = []
        for op in self.ops():
            for impl in self.implementations(op):
                rows.append((op, impl.name, impl.layout, impl.requires.describe(), impl.provider))
        return rows
