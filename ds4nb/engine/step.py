"""What the host writes before each step: token ids, step records and the sampling record.

A step's launches never change (they are replayed, or captured as a CUDA
graph); what changes per token lives in one small device buffer that the host
fills in pinned memory and copies with a single asynchronous copy:

======================  =====================================================
``sp``                   float64 sampling record (``ds4nb.kernels.sample``)
``steps``                int32 step records, ``NF`` per token (``ds4nb.kernels.step``)
``ids``                  int32 token ids of the step's tokens
======================  =====================================================

The ids come last so that a chained decode step can upload everything but
them: its id is the one the previous step's sampler left in device memory
(``ds4nb.kernels.step.feed_token``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numba import cuda

from ds4nb.kernels.sample import SP_FIELDS, sampling_record
from ds4nb.kernels.step import NF, fill_records, group_offset
from ds4nb.model import ModelConfig
from ds4nb.sampling import GREEDY, SamplingParams


@dataclass(frozen=True)
class StepLayout:
    """How a model's layers map onto the step record: the window size and the compression groups."""

    n_swa: int
    groups: tuple[tuple[int, int], ...]    # (ratio, indexer top-k or 0) of group g = index + 1
    layer_group: tuple[int, ...]           # each layer's group (0: no compression)
    ring: int                              # rows of the window ring (n_swa + the longest step - 1)

    @classmethod
    def from_config(cls, cfg: ModelConfig, chunk: int = 1) -> StepLayout:
        """The layout of ``cfg`` for steps of up to ``chunk`` tokens."""
        groups: list[tuple[int, int]] = []
        layer_group = []
        for il in range(cfg.n_layer):
            ratio = cfg.compress_ratio(il)
            if ratio == 0:
                layer_group.append(0)
                continue
            key = (ratio, cfg.indexer_top_k if cfg.layer_kind(il) == "csa" else 0)
            if key not in groups:
                groups.append(key)
            layer_group.append(groups.index(key) + 1)
        return cls(cfg.n_swa, tuple(groups), tuple(layer_group), cfg.n_swa + max(chunk, 1) - 1)

    def field(self, il: int) -> int:
        """Offset of layer ``il``'s compression-group fields inside a record."""
        return group_offset(self.layer_group[il])


class StepInput:
    """Pinned host staging and the device buffer of a step's inputs, for up to ``capacity`` tokens."""

    def __init__(self, capacity: int, layout: StepLayout) -> None:
        self.capacity = capacity
        self.layout = layout
        n_sp = SP_FIELDS * 8
        n_steps = capacity * NF * 4
        self._n_no_ids = n_sp + n_steps
        nbytes = n_sp + n_steps + capacity * 4
        self.host = cuda.pinned_array(nbytes, np.uint8)
        self.device = cuda.device_array(nbytes, np.uint8)
        self._sp = self.host[:n_sp].view(np.float64)
        self._steps = self.host[n_sp:self._n_no_ids].view(np.int32).reshape(capacity, NF)
        self._ids = self.host[self._n_no_ids:].view(np.int32)
        self.sp = self.device[:n_sp].view(np.float64)                       # what kernels read
        self.steps = self.device[n_sp:self._n_no_ids].view(np.int32)
        self.ids = self.device[self._n_no_ids:].view(np.int32)
        self._sp[:] = sampling_record(GREEDY, 0.0, 1)

    def write(self, tokens: Sequence[int] | None, pos0: int, params: SamplingParams | None = None, u: float = 0.0,
              n_vocab: int = 1) -> None:
        """Host side of the next step: tokens at positions ``pos0 ...``, and the sampling record.  ``None``:
        one token whose id the device holds (a chained step: upload with ``ids=False``)."""
        n = 1 if tokens is None else len(tokens)
        if not 0 < n <= self.capacity:
            raise ValueError(f"a step takes 1..{self.capacity} tokens, got {n}")
        if tokens is not None:
            self._ids[:n] = tokens
        fill_records(self._steps[:n], pos0, self.layout.n_swa, self.layout.groups, self.layout.ring)
        if params is not None:
            sampling_record(params, u, n_vocab, out=self._sp)

    def upload(self, stream: Any, *, ids: bool = True) -> None:
        """One asynchronous copy of the buffer (a few KiB) on ``stream``; ``ids=False`` leaves the device's
        token ids as they are."""
        if ids:
            self.device.copy_to_device(self.host, stream=stream)
        else:
            self.device[:self._n_no_ids].copy_to_device(self.host[:self._n_no_ids], stream=stream)
