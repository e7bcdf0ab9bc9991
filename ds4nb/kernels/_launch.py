"""Host-side helpers shared by the kernel launchers (no device code here)."""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import cuda


def flat(a: Any) -> Any:
    """A 1-D view of a contiguous device array (kernels index flat buffers)."""
    return a if a.ndim == 1 else a.reshape(a.size)


def device_array(shape: tuple[int, ...] | int, dtype: Any, stream: Any = 0) -> Any:
    return cuda.device_array(shape, dtype=np.dtype(dtype), stream=stream)


def to_device_flat(a: np.ndarray, stream: Any = 0) -> Any:
    return cuda.to_device(np.ascontiguousarray(a).reshape(-1), stream=stream)


_PLACEHOLDERS: dict[str, Any] = {}


def placeholder(dtype: Any = np.float32) -> Any:
    """A one-element device array passed where a kernel's optional input is absent (flagged off)."""
    key = np.dtype(dtype).str
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = cuda.to_device(np.zeros(1, dtype=dtype))
    return _PLACEHOLDERS[key]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_at_least(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi]."""
    p = lo
    while p < n and p < hi:
        p *= 2
    return p
