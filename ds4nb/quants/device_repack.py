"""Block-minor repacking on the GPU: raw GGUF blocks already in device memory -> the kernels' layout.

The same transformation as :func:`ds4nb.quants.repack.repack`, done where
the bytes land: the loader copies a tensor's raw bytes to the device (pinned
staging, one DMA) and one launch per field (``qs``, ``sc``, ``dm``) writes
output word ``i = (row, j, b)`` (word ``j`` of block ``b`` of ``row``) from
bytes ``[(row * nb + b) * block_bytes + offset + j * word_bytes, +word_bytes)``
of the raw rows, little endian.  Output words of a warp are consecutive; its
input bytes are one block apart: a one-time pass that runs far above the
PCIe rate that feeds it.  ``dm`` (float16 values) is written as its raw bits
through a ``uint16`` view.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType
from numba import config, cuda, uint16, uint32, uint64

from ds4nb.quants.formats import block_size, type_size
from ds4nb.quants.repack import Field, fields

THREADS = 8 if config.ENABLE_CUDASIM else 256     # the simulator pays for every thread it starts
MAX_BLOCKS = 4 if config.ENABLE_CUDASIM else 4096

_WORD = {2: (np.uint16, uint16), 4: (np.uint32, uint32), 8: (np.uint64, uint64)}


@functools.cache
def _kernel(word_bytes: int) -> Any:
    word_t = _WORD[word_bytes][1]

    @cuda.jit
    def repack_field(raw, n_rows, nb, block_bytes, offset, words, out, out0):
        n = n_rows * words * nb
        i = cuda.grid(1)
        stride = cuda.gridsize(1)
        while i < n:
            b = i % nb
            j = (i // nb) % words
            row = i // (nb * words)
            src = (row * nb + b) * block_bytes + offset + j * word_bytes
            v = uint64(0)
            for k in range(word_bytes):
                v |= uint64(raw[src + k]) << uint64(8 * k)
            out[out0 + i] = word_t(v)
            i += stride

    return repack_field


def word_view(arr: Any, field: Field) -> Any:
    """The flat device array a field's words are written to (``dm``: the float16 bits as uint16)."""
    dtype = _WORD[field.word_bytes][0]
    flat = arr.reshape(arr.size) if arr.ndim != 1 else arr
    return flat if np.dtype(flat.dtype) == dtype else flat.view(dtype)


def repack_rows(raw: Any, qtype: GGMLQuantizationType, n_cols: int, row0: int, n_rows: int, out: Any,
                stream: Any = 0) -> None:
    """Rows ``[row0, row0 + n_rows)`` of a block-minor ``PackedWeight`` ``out`` (device arrays) from ``raw``.

    ``raw``: device uint8 holding exactly those rows' GGUF bytes.
    """
    nb = n_cols // block_size(qtype)
    block_bytes = type_size(qtype)
    for f in fields(qtype):
        n = n_rows * f.words * nb
        grid = min(MAX_BLOCKS, max(1, -(-n // THREADS)))
        _kernel(f.word_bytes)[grid, THREADS, stream](raw, n_rows, nb, block_bytes, f.offset, f.words,
                                                     word_view(getattr(out, f.name), f), row0 * f.words * nb)

