"""Compile every kernel the parity cases launch for real GPUs, on a machine without one.

Run as a script in a process *without* ``NUMBA_ENABLE_CUDASIM`` (numba's CUDA
target, GPU geometry): device memory is replaced by numpy arrays and kernel
launches by a recorder, then every op's parity case (``tiny`` shapes) runs
every implementation through its real launcher.  Each distinct (kernel,
argument types) is compiled to PTX with NVVM for each ``--cc``.  Implementations
that call a library through CuPy (``Requirements.needs_cupy``: no numba kernel
of their own) are skipped and counted.  Prints one
line per failure (or per launcher that could not run) and exits 1 if any.
Used by tests/test_kernels_compile.py.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import numpy as np


CASES_PER_IMPL = 4


class FakeDeviceArray(np.ndarray):
    """Host memory standing in for a device array (numba types it as the same Array type)."""

    def copy_to_host(self, ary=None, stream=0):
        host = np.asarray(self).copy()
        if ary is not None:
            ary[...] = host
            return ary
        return host

    def copy_to_device(self, ary, stream=0):
        np.asarray(self)[...] = np.asarray(ary).reshape(self.shape)


def _fake_memory(cuda) -> None:
    def device_array(shape, dtype=np.float64, strides=None, order="C", stream=0):
        return np.zeros(shape, dtype=dtype, order=order).view(FakeDeviceArray)

    def to_device(obj, stream=0, copy=True, to=None):
        if to is not None:
            to.copy_to_device(obj)
            return to
        return np.array(obj, copy=True).view(FakeDeviceArray)

    cuda.device_array = device_array
    cuda.device_array_like = lambda a, stream=0: device_array(a.shape, a.dtype)
    cuda.to_device = to_device
    cuda.synchronize = lambda: None


def _no_device(cc: tuple[int, int]) -> None:
    """Device functions compile for "the current device": make that a GPU of compute capability ``cc``."""
    from types import SimpleNamespace

    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    cuda.get_current_device = dispatcher.get_current_device   # launchers that pick a variant by capability


def _record_launches(cuda, seen: dict) -> None:
    from numba.cuda.dispatcher import CUDADispatcher

    class Recorder:
        def __init__(self, dispatcher):
            self.dispatcher = dispatcher

        def __call__(self, *args):
            from numba import typeof

            fn = self.dispatcher.py_func
            sig = tuple(typeof(a) for a in args)
            # id(fn): factory-built kernels share a name but not their constants
            seen.setdefault((fn.__module__, fn.__qualname__, id(fn), str(sig)), (fn, sig))

    CUDADispatcher.__getitem__ = lambda self, config: Recorder(self)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cc", nargs="+", default=["8.6", "9.0"], help="compute capabilities to compile for")
    args = ap.parse_args(argv)
    ccs = [tuple(int(p) for p in cc.split(".")) for cc in args.cc]

    from numba import config, cuda

    if config.ENABLE_CUDASIM:
        print("run without NUMBA_ENABLE_CUDASIM: this compiles for the CUDA target")
        return 2
    _fake_memory(cuda)
    _no_device(max(ccs))
    seen: dict = {}
    _record_launches(cuda, seen)

    from ds4nb.plugins import get_registry

    reg = get_registry()
    rng = np.random.default_rng(0)
    problems = []
    ran = skipped = 0
    for op in reg.ops():
        spec = reg.op(op)
        if spec.make_case is None:
            continue
        for impl in reg.implementations(op):
            if impl.requires.needs_cupy:  # a library call (cuBLAS through CuPy): nothing to compile
                skipped += 1
                continue
            try:
                for _ in range(CASES_PER_IMPL):  # cases draw their variants (types, flags) at random
                    case = spec.make_case(rng, "tiny")
                    impl.fn(*case.inputs, out=case.out, stream=0, **case.kwargs)
                ran += 1
            except Exception as exc:  # a launcher that cannot run here: say so, keep going
                problems.append(f"{op} [{impl.name}]: launcher failed: {type(exc).__name__}: {exc}")
    for (module, name, _, _), (fn, sig) in sorted(seen.items(), key=lambda kv: kv[0]):
        for cc in ccs:
            try:
                cuda.compile_ptx(fn, sig, cc=cc)
            except Exception as exc:
                first = str(exc).strip().splitlines()
                problems.append(f"{module}.{name} sm_{cc[0]}{cc[1]} {sig}: {type(exc).__name__}: "
                                f"{first[0] if first else ''}\n{''.join(traceback.format_exception_only(exc))[-1500:]}")
    print(f"{ran} launchers ran, {len(seen)} (kernel, signature) pairs, {len(ccs)} targets, "
          f"{len(problems)} problems, {skipped} library launchers skipped")
    for p in problems:
        print(p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
