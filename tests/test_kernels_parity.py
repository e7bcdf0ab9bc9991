"""Every registered kernel implementation against its op's numpy twin.

Simulator (or any device): tiny shapes, fresh random inputs per run, outputs
poisoned before the launch (NaN / two byte patterns) so an unwritten element
fails.  ``@pytest.mark.gpu``: the same check at DS4's real shapes (q_b 1024 ->
32768, output head 4096 -> 129280, 6 of 8 experts 2048 x 4096 IQ2_XXS gate/up,
4096 x 2048 Q2_K down, ...).  Reproduce a failure with DS4NB_TEST_SEED=<seed>.
"""

from __future__ import annotations

import numpy as np
import pytest

from ds4nb.plugins import get_registry
from ds4nb.kernels.parity import Case, ParityResult, check_case, run_parity
from ds4nb.kernels.registry import Implementation, Requirements

REG = get_registry()
PAIRS = [(op, impl.name) for op in REG.ops() for impl in REG.implementations(op)]


def _ids(pairs):
    return [f"{op}[{impl}]" for op, impl in pairs]


def _runnable(op: str, impl: str) -> None:
    why = REG.get(op, impl).unmet()
    if why:
        pytest.skip(f"{op}[{impl}] cannot run here: {', '.join(why)}")


@pytest.mark.parametrize(("op", "impl"), PAIRS, ids=_ids(PAIRS))
def test_parity_tiny(op: str, impl: str, kernel_rng: np.random.Generator) -> None:
    _runnable(op, impl)
    result = run_parity(op, impl, registry=REG, rng=kernel_rng, scale="tiny")
    assert result.ok, str(result)


@pytest.mark.gpu
@pytest.mark.parametrize(("op", "impl"), PAIRS, ids=_ids(PAIRS))
def test_parity_model_shapes(op: str, impl: str, kernel_rng: np.random.Generator) -> None:
    _runnable(op, impl)
    result = run_parity(op, impl, registry=REG, rng=kernel_rng, scale="model")
    print(result)
    assert result.ok, str(result)


def test_every_op_has_a_case_and_an_implementation() -> None:
    for op in REG.ops():
        spec = REG.op(op)
        assert spec.make_case is not None, op
        assert spec.tolerance >= 0, op
        assert REG.implementations(op), op


# ---------------------------------------------------------------------------
# The harness itself must catch broken kernels
# ---------------------------------------------------------------------------


def _broken(fn, mutate):
    def launcher(*args, out, stream=0, **kw):
        fn(*args, out=out, stream=stream, **kw)
        mutate(out)

    return launcher


def _impl(fn) -> Implementation:
    return Implementation("q8_0.matvec", "broken", fn, "q8_0/block-minor", Requirements(), "test")


def _matvec_case(rng: np.random.Generator) -> tuple[Case, Implementation]:
    spec = REG.op("q8_0.matvec")
    return spec.make_case(rng, "tiny"), REG.select("q8_0.matvec")


def test_harness_flags_an_unwritten_element(kernel_rng: np.random.Generator) -> None:
    from numba import cuda

    case, good = _matvec_case(kernel_rng)

    def skip_last(out):  # the kernel "forgot" the last row: it keeps its poison
        host = out.copy_to_host()
        host[-1] = np.nan
        out.copy_to_device(host)
        cuda.synchronize()

    result = check_case(_impl(_broken(good.fn, skip_last)), case, REG.op("q8_0.matvec").tolerance)
    assert not result.ok and result.errors[0] == float("inf")


def test_harness_flags_a_small_numeric_error(kernel_rng: np.random.Generator) -> None:
    case, good = _matvec_case(kernel_rng)

    def perturb(out):  # one element off by 1%: far above the 2e-5 tolerance
        host = out.copy_to_host()
        host[0] *= np.float32(1.01)
        out.copy_to_device(host)

    result = check_case(_impl(_broken(good.fn, perturb)), case, REG.op("q8_0.matvec").tolerance)
    assert not result.ok, str(result)


def test_harness_flags_an_unwritten_integer_element(kernel_rng: np.random.Generator) -> None:
    spec = REG.op("act.quantize_q8_0")
    case = spec.make_case(kernel_rng, "tiny")
    good = REG.select("act.quantize_q8_0")
    keep = {}

    def restore_first_word(out):
        # the kernel "forgot" word 0: put back whatever the poison was before the launch
        host = out.qs.copy_to_host()
        host[0] = keep["first"]
        out.qs.copy_to_device(host)

    def launcher(x, *, out, stream=0):
        keep["first"] = out.qs.copy_to_host()[0]
        good.fn(x, out=out, stream=stream)
        restore_first_word(out)

    impl = Implementation("act.quantize_q8_0", "broken", launcher, "x", Requirements(), "test")
    result = check_case(impl, case, spec.tolerance)
    assert not result.ok and result.errors[0] > 0


def test_parity_result_reports_errors() -> None:
    r = ParityResult("op", "impl", (1e-7, 0.0), 1e-5, (False, True), {})
    assert r.ok and "ok" in str(r)
    assert not ParityResult("op", "impl", (float("nan"),), 1e-5, (False,), {}).ok
    assert not ParityResult("op", "impl", (0.5,), 0.0, (True,), {}).ok
