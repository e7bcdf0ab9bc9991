"""Numba-CUDA kernels for ds4nb, found through a registry of named ops.

Use the process-wide registry (built-ins plus every plugin, filled by the
plugin manager) to pick an implementation once at setup, then call it on the
hot path::

    from ds4nb.plugins import get_registry
    matvec = get_registry().select("q8_0.matvec", batch=1)
    matvec(weight, x_q8, out=y)

Every op has a numpy twin and a tolerance (``registry.op(name)``) and a
parity check (``ds4nb.kernels.parity.run_parity``).  Weights are read in the
block-minor layout of ``ds4nb.quants.repack``.  Importing this package
compiles nothing; kernels are compiled on first launch.
"""

from ds4nb.kernels.registry import (
    KERNELS_TABLE_HEADER,
    DeviceInfo,
    Implementation,
    KernelRegistry,
    KernelRegistryError,
    OpSpec,
    Requirements,
    implementation,
)

__all__ = [
    "KERNELS_TABLE_HEADER",
    "DeviceInfo",
    "Implementation",
    "KernelRegistry",
    "KernelRegistryError",
    "OpSpec",
    "Requirements",
    "implementation",
]
