"""Parity harness: run any registered implementation against its op's numpy twin.

Each op's :class:`~ds4nb.kernels.registry.OpSpec` has a ``make_case(rng,
scale)`` that draws fresh random inputs, uploads them in the device layout
the kernels read, and computes the expected outputs with the numpy twin
(``ds4nb.quants`` / inline numpy, float64 where it is an oracle).
:func:`run_parity` then

1. poisons every output (NaN for floats, a byte pattern for integers),
2. launches the implementation and synchronizes,
3. for integer outputs launches again over a second, different poison (an
   element the kernel never wrote would keep one of the two patterns and
   cannot match the twin both times),
4. reports per output, by how the case marks it (``Case.exact``):
   ``False``: ``||out - ref|| / ||ref||`` against the op's tolerance (any
   non-finite value, e.g. an unwritten NaN, is an infinite error);
   ``True``: the fraction of differing elements, which must be 0;
   :data:`CONTRACT` (float outputs under docs/model.md's "one rounding per
   value" numerics): the fraction of elements that are not bit-identical,
   at most :data:`CONTRACT_RATE`, and none more than one ulp away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ds4nb.kernels.registry import Implementation, KernelRegistry
from ds4nb.quants.repack import PackedWeight

SCALES = ("tiny", "model")

_INT_POISON = (0x5A, 0xA5)

#: ``Case.exact`` value of a float output computed under the "one rounding per value" contract.
CONTRACT = "contract"
#: Largest fraction of such an output that may differ from the twin (by one ulp each): two float64
#: evaluations in different orders round to different float32 values with probability ~1e-7.
CONTRACT_RATE = 1e-3


@dataclass
class Case:
    """One parity case: device inputs, device outputs, and what the twin expects.

    ``out`` is passed to the implementation as ``out=`` (one device array or a
    tuple/NamedTuple of them); ``expected`` has one host array per output
    array, in the same order; ``exact[i]`` says how output ``i`` is compared:
    ``False`` (tolerance), ``True`` (bit for bit) or :data:`CONTRACT`.  ``weight_bytes`` is what a matvec streams (for benchmarks).
    """

    inputs: tuple
    out: Any
    expected: tuple
    exact: tuple
    kwargs: dict = field(default_factory=dict)
    weight_bytes: int = 0
    info: dict = field(default_factory=dict)

    @property
    def outputs(self) -> tuple:
        return outputs_of(self.out)


@dataclass(frozen=True)
class ParityResult:
    op: str
    impl: str
    errors: tuple[float, ...]
    tolerance: float
    exact: tuple[bool, ...]
    info: dict

    @property
    def ok(self) -> bool:
        for err, ex in zip(self.errors, self.exact):
            if not np.isfinite(err):
                return False
            if ex is CONTRACT or ex == CONTRACT:
                if err > CONTRACT_RATE:
                    return False
            elif ex and err != 0:
                return False
            elif not ex and err > self.tolerance:
                return False
        return True

    @property
    def max_error(self) -> float:
        inexact = [e for e, ex in zip(self.errors, self.exact) if not ex]
        return max(inexact) if inexact else 0.0

    def __str__(self) -> str:
        errs = ", ".join(("exact" if e == 0 else f"{e:.3g} differ") if ex else f"{e:.3g}"
                         for e, ex in zip(self.errors, self.exact))
        status = "ok" if self.ok else "FAIL"
        return f"{self.op} [{self.impl}] {status}: error {errs} (tol {self.tolerance:g}) {self.info}"


def outputs_of(out: Any) -> tuple:
    """The output arrays of ``out``: itself, a tuple's given entries (optional outputs left None are not), or a
    ``PackedWeight``'s fields."""
    if isinstance(out, PackedWeight):
        return tuple(a for a in (out.qs, out.sc, out.dm) if a is not None)
    if isinstance(out, tuple):
        return tuple(o for o in out if o is not None)
    return (out,)


def poison(arr: Any, attempt: int = 0) -> None:
    """Fill a device array with NaN (floats) or a byte pattern (integers) that differs per attempt."""
    dt = np.dtype(arr.dtype)
    if dt.kind == "f":
        host = np.full(arr.shape, np.nan, dtype=dt)
    else:
        host = np.full(arr.size * dt.itemsize, _INT_POISON[attempt % 2], dtype=np.uint8).view(dt).reshape(arr.shape)
    arr.copy_to_device(host)


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64; inf if ``out`` has a non-finite value where ``ref`` is finite."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch {out.shape} vs {ref.shape}")
    if not np.all(np.isfinite(out[np.isfinite(ref)])):
        return float("inf")
    den = float(np.linalg.norm(ref))
    num = float(np.linalg.norm(out - ref))
    return num / den if den > 0 else num


def mismatch_fraction(out: np.ndarray, ref: np.ndarray) -> float:
    out = np.asarray(out)
    ref = np.asarray(ref)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch {out.shape} vs {ref.shape}")
    if out.size == 0:
        return 0.0
    return float(np.count_nonzero(out != ref)) / out.size


def contract_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of float32 values of ``out`` not bit-identical to ``ref``; inf if one is off by more than an ulp."""
    out = np.asarray(out, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch {out.shape} vs {ref.shape}")
    if out.size == 0:
        return 0.0
    if not np.array_equal(np.isfinite(out), np.isfinite(ref)):
        return float("inf")
    differ = (out != ref) & np.isfinite(ref)
    if not differ.any():
        return 0.0
    # ordered integer images of the floats: adjacent floats differ by 1 (and -0 == +0)
    a, b = (np.where(v.view(np.int32) < 0, np.int64(-2**31) - v.view(np.int32), v.view(np.int32)).astype(np.int64)
            for v in (out[differ], ref[differ]))
    if np.abs(a - b).max() > 1:
        return float("inf")
    return float(np.count_nonzero(differ)) / out.size


def check_case(impl: Implementation, case: Case, tolerance: float, *, stream: Any = 0) -> ParityResult:
    """Run ``impl`` on ``case`` (see module doc) and compare with the expected outputs."""
    from numba import cuda

    outs = case.outputs
    if len(outs) != len(case.expected) or len(outs) != len(case.exact):
        raise ValueError(f"{impl.op}: case has {len(outs)} outputs, {len(case.expected)} expected")
    attempts = 2 if any(ex is True for ex in case.exact) else 1   # bit-exact outputs: a second poison
    errors = [0.0] * len(outs)
    for attempt in range(attempts):
        for arr in outs:
            poison(arr, attempt)
        cuda.synchronize()
        impl.fn(*case.inputs, out=case.out, stream=stream, **case.kwargs)
        cuda.synchronize()
        for i, (arr, ref, exact) in enumerate(zip(outs, case.expected, case.exact)):
            got = arr.copy_to_host().reshape(np.shape(ref))
            if exact is CONTRACT or exact == CONTRACT:
                err = contract_error(got, ref)
            else:
                err = mismatch_fraction(got, ref) if exact else rel_error(got, ref)
            errors[i] = max(errors[i], err) if np.isfinite(err) else float("inf")
    return ParityResult(impl.op, impl.name, tuple(errors), tolerance, tuple(case.exact), dict(case.info))


def run_parity(
    op: str,
    impl: str | None = None,
    *,
    registry: KernelRegistry,
    rng: np.random.Generator | None = None,
    scale: str = "tiny",
    stream: Any = 0,
) -> ParityResult:
    """Check implementation ``impl`` of ``op`` in ``registry`` (default: the one ``select`` picks) on a fresh
    random case (the process-wide registry: :func:`ds4nb.plugins.get_registry`)."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    reg = registry
    spec = reg.op(op)
    if spec.make_case is None:
        raise ValueError(f"{op} has no parity case")
    chosen = reg.get(op, impl) if impl is not None else reg.select(op)
    rng = rng if rng is not None else np.random.default_rng()
    case = spec.make_case(rng, scale)
    return check_case(chosen, case, spec.tolerance, stream=stream)
