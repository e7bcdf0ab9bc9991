"""The step record: what changes from one token to the next, read by kernels from device memory.

A decode step replayed as a CUDA graph keeps every launch argument fixed, so
per-token values cannot be launch arguments.  The host writes one int32
*record* per token into a device buffer before the step (one small copy), and
the kernels that need a position, a window row or a row count read it there
(``steps[rec + FIELD]``, ``rec`` = the token's record offset, ``t * NF`` for
token ``t`` of a step).  Kernels whose work depends on such a count are
launched with grids sized for the session's context and exit early.

Fields of a record (docs/model.md, "Session state" and steps 8-11):

==========  ================================================================
``POS``      the token's position
``RAW_ROW``  its row in the sliding-window ring, ``pos % ring``
``N_RAW``    window rows attention reads, ``min(pos + 1, n_swa)``: the ring rows of positions
             ``pos - N_RAW + 1 .. pos``
==========  ================================================================

then one group of fields per *compression group* (the layers that share a
compression ratio and indexer: DS4 has CSA, ratio 4 with the indexer, and
HCA, ratio 128), at ``GROUP0 + GROUP_FIELDS * g``; group 0 is the layers
without compression and stays all zero:

==========  ================================================================
``EMIT``     1 when this token closes a window: the compressors emit row ``ROWS - 1``
``ROWS``     compressed rows after this token, ``(pos + 1) // ratio``
``VISIBLE``  compressed rows attention reads: ``top_k`` while the indexer selects, else ``ROWS``
``SELECT``   the indexer's ``k`` while it selects (``ROWS > top_k``), else 0
==========  ================================================================

:func:`fill_records` is the one place these values are computed.

A *chained* decode step takes its token id from device memory too: the
previous step's sampler wrote it there (:func:`feed_token`, the last launch of
a sampling decode step), so the host can enqueue the next step before the
sampled id reaches it (``CudaEngine.decode_chain``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import wait_prior_grid

POS, RAW_ROW, N_RAW = 0, 1, 2
GROUP0 = 4
GROUP_FIELDS = 4
EMIT, ROWS, VISIBLE, SELECT = 0, 1, 2, 3
MAX_GROUPS = 5
#: int32 fields of one record (fixed: kernels index records with it)
NF = GROUP0 + GROUP_FIELDS * MAX_GROUPS


def group_offset(g: int) -> int:
    """Offset of compression group ``g``'s fields inside a record (0: the uncompressed layers)."""
    if not 0 <= g < MAX_GROUPS:
        raise ValueError(f"compression group {g} outside 0..{MAX_GROUPS - 1}")
    return GROUP0 + GROUP_FIELDS * g


def fill_records(out: np.ndarray, pos0: int, n_swa: int, groups: Sequence[tuple[int, int]],
                 ring: int | None = None) -> np.ndarray:
    """Records of the tokens at positions ``pos0 .. pos0 + len(out) - 1`` into ``out`` (int32 (T, NF)).

    ``groups[g - 1] = (ratio, top_k)`` for compression group ``g >= 1``
    (``top_k`` 0: no indexer, every compressed row visible).  ``ring``: rows
    of the window ring (default ``n_swa``; a step of ``T`` tokens stores all
    its rows before attending, so its ring needs ``n_swa + T - 1`` rows).
    """
    ring = n_swa if ring is None else ring
    if ring < n_swa:
        raise ValueError(f"a window ring of {ring} rows cannot hold the {n_swa}-token window")
    if len(groups) >= MAX_GROUPS:
        raise ValueError(f"{len(groups)} compression groups, at most {MAX_GROUPS - 1} fit a step record")
    pos = pos0 + np.arange(len(out), dtype=np.int64)
    out[:] = 0
    out[:, POS] = pos
    out[:, RAW_ROW] = pos % ring
    out[:, N_RAW] = np.minimum(pos + 1, n_swa)
    for g, (ratio, top_k) in enumerate(groups, start=1):
        base = group_offset(g)
        rows = (pos + 1) // ratio
        select = (top_k > 0) & (rows > top_k)
        out[:, base + EMIT] = (pos + 1) % ratio == 0
        out[:, base + ROWS] = rows
        out[:, base + VISIBLE] = np.where(select, top_k, rows)
        out[:, base + SELECT] = np.where(select, top_k, 0)
    return out


def records(pos0: int, n_tok: int, n_swa: int = 1 << 30, groups: Sequence[tuple[int, int]] = (),
            ring: int | None = None) -> np.ndarray:
    """A fresh flat int32 array of ``n_tok`` records (tests and one-off launches)."""
    return fill_records(np.zeros((n_tok, NF), np.int32), pos0, n_swa, groups, ring).reshape(-1)


def one_record(pos: int = 0, *, n_raw: int = 0, emit: int = 0, rows: int = 0, visible: int = 0, select: int = 0,
               group: int = 1) -> np.ndarray:
    """One record with chosen fields (compression group ``group``): for direct kernel calls in tests and benchmarks.

    The window is ring rows ``0 .. n_raw - 1`` (the token's own row last).
    """
    rec = records(pos, 1)
    rec[RAW_ROW] = max(n_raw - 1, 0)
    rec[N_RAW] = n_raw
    base = group_offset(group)
    rec[base + EMIT], rec[base + ROWS], rec[base + VISIBLE], rec[base + SELECT] = emit, rows, visible, select
    return rec


@cuda.jit
def _feed_token_kernel(sampled, ids):
    wait_prior_grid()
    if cuda.grid(1) == 0:
        ids[0] = sampled[0]


def feed_token(sampled: Any, ids: Any, stream: Any = 0) -> None:
    """``ids[0] = sampled[0]`` on the device: the sampled id (``sample.draw``'s ``(token, status)``) becomes
    the next step's input id.  A step whose host upload leaves the ids out (``StepInput.upload(ids=False)``)
    decodes it; a full upload overwrites it."""
    L.launch(_feed_token_kernel, 1, 32, stream, sampled, ids)
