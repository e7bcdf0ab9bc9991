"""Weight access for the numpy reference: memory-mapped tensors, dequantised lazily.

Nothing here holds a dequantised copy of the model.  Small tensors (norms, HC
controls, the router, compressor projections...) are converted to float32
once and kept; larger ones are converted in row chunks on every use; routed
experts are dequantised one expert at a time into a bounded LRU cache.

Products follow the reference CPU path (docs/model.md, "Activation
quantisation"):

* Q8_0 weights take the activation quantised to Q8_0 and sum per 32-block
  ``(d_w * d_x) * sum_k q_w q_x`` over the blocks in order (ds4.c:2958-3018).
  The integer block dots are exact in float32 (|sum| <= 32 * 128 * 128 <
  2^24), so the result does not depend on the batch size or BLAS kernel.
* F16 / F32 weights multiply the float32 activation directly, one token at a
  time (so a prefill batch computes exactly what sequential decode computes).
* Routed experts (IQ2_XXS / Q2_K / Q4_K) multiply the activation after a Q8_K
  round trip, one token and one expert at a time.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from gguf import GGMLQuantizationType as Q

from ds4nb.model.loader import TensorInfo
from ds4nb.quants import (
    BLOCK_DTYPE,
    dequantize,
    dequantize_q8_K_activation,
    dequantize_rows,
    quantize_q8_0,
    quantize_q8_K,
)

QK8_0 = 32
CHUNK_BYTES = 2 << 20          # float32 bytes of weight converted per chunk
CACHE_TENSOR_BYTES = 4 << 20   # float32 size under which a 2-D tensor is converted once and kept


def q8_0_round_trip(x: np.ndarray) -> np.ndarray:
    """The float values a Q8_0-quantised activation stands for (docs/model.md, "Activation quantisation")."""
    qs, d = quantize_q8_0(x)
    return (qs.reshape(*qs.shape[:-1], -1, QK8_0).astype(np.float32) * d[..., None]).reshape(qs.shape)


def q8_k_round_trip(x: np.ndarray) -> np.ndarray:
    """The float values a Q8_K-quantised activation stands for (ds4.c:1729)."""
    qs, d, _ = quantize_q8_K(x)
    return dequantize_q8_K_activation(qs, d)


class Q8Matrix:
    """A Q8_0 weight ``(n_out, n_in)``: ``matmul`` applies it to Q8_0-quantised activations."""

    def __init__(self, t: TensorInfo):
        if t.qtype != Q.Q8_0 or len(t.shape) != 2:
            raise ValueError(f"{t.name}: expected a 2-D Q8_0 tensor, got {t.qtype.name} {t.shape}")
        self.name = t.name
        self.n_out, self.n_in = t.shape
        self.n_blocks = self.n_in // QK8_0
        self._blocks = t.data.view(BLOCK_DTYPE[Q.Q8_0]).reshape(self.n_out, self.n_blocks)
        self._chunk = max(1, CHUNK_BYTES // (4 * self.n_in))
        self._cached: tuple[np.ndarray, np.ndarray] | None = None
        if self.n_out * self.n_in * 4 <= CACHE_TENSOR_BYTES:
            self._cached = self._convert(0, self.n_out)

    def _convert(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        b = self._blocks[r0:r1]
        return b["qs"].astype(np.float32), b["d"].astype(np.float32)

    def _rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cached is not None:
            qs, d = self._cached
            return qs[r0:r1], d[r0:r1]
        return self._convert(r0, r1)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x (T, n_in)`` float32 -> ``(T, n_out)``: Q8_0 activation x Q8_0 weight per block."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[-1] != self.n_in:
            raise ValueError(f"{self.name}: input width {x.shape[-1]}, expected {self.n_in}")
        xq, xd = quantize_q8_0(x)
        return self.matmul_quantized(xq, xd)

    def matmul_quantized(self, xq: np.ndarray, xd: np.ndarray, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows ``[r0, r1)`` of the product with an activation already quantised to Q8_0.

        ``xq (T, n_in)`` int8, ``xd (T, n_in / 32)`` float32; returns ``(T, r1 - r0)``.
        """
        r1 = self.n_out if r1 is None else r1
        n_tok = xq.shape[0]
        xqf = xq.reshape(n_tok, self.n_blocks, QK8_0).astype(np.float32)
        xd_t = np.ascontiguousarray(xd.T)  # (nb, T)
        out = np.empty((n_tok, r1 - r0), dtype=np.float32)
        for c0 in range(r0, r1, self._chunk):
            c1 = min(c0 + self._chunk, r1)
            qs, d = self._rows(c0, c1)
            idot = np.einsum("cbk,tbk->btc", qs, xqf)                  # exact integer dots
            terms = (d.T[:, None, :] * xd_t[:, :, None]) * idot          # (d_w * d_x) * dot
            out[:, c0 - r0:c1 - r0] = np.add.accumulate(terms, axis=0)[-1]  # blocks in order
        return out


class DenseMatrix:
    """An F16 / F32 weight ``(n_out, n_in)`` applied to float32 activations, one token at a time."""

    def __init__(self, t: TensorInfo):
        if t.qtype not in (Q.F16, Q.F32) or len(t.shape) != 2:
            raise ValueError(f"{t.name}: expected a 2-D F16/F32 tensor, got {t.qtype.name} {t.shape}")
        self.name = t.name
        self.n_out, self.n_in = t.shape
        self._values = t.data.view(np.float16 if t.qtype == Q.F16 else np.float32).reshape(t.shape)
        self._chunk = max(1, CHUNK_BYTES // (4 * self.n_in))
        self._cached: np.ndarray | None = None
        if self.n_out * self.n_in * 4 <= CACHE_TENSOR_BYTES:
            self._cached = self._values.astype(np.float32)

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``x (n_in,)`` -> ``(n_out,)`` in float32."""
        x = np.asarray(x, dtype=np.float32)
        if self._cached is not None:
            return self._cached @ x
        out = np.empty(self.n_out, dtype=np.float32)
        for r0 in range(0, self.n_out, self._chunk):
            r1 = min(r0 + self._chunk, self.n_out)
            out[r0:r1] = self._values[r0:r1].astype(np.float32) @ x
        return out

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x (T, n_in)`` -> ``(T, n_out)``, computed token by token (batch-invariant)."""
        x = np.asarray(x, dtype=np.float32)
        return np.stack([self.matvec(row) for row in x]) if len(x) else np.zeros((0, self.n_out), np.float32)

    def rows(self, r0: int, r1: int) -> np.ndarray:
        return self._values[r0:r1].astype(np.float32)


class ExpertCache:
    """Dequantised routed experts, least recently used first out, within a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget = int(budget_bytes)
        self.used = 0
        self._items: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()

    def get(self, t: TensorInfo, expert: int) -> np.ndarray:
        key = (t.name, expert)
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            return hit
        _, n_out, n_in = t.shape
        w = dequantize_rows(t.data, t.qtype, n_in, expert * n_out, (expert + 1) * n_out)
        if w.nbytes <= self.budget:
            while self.used + w.nbytes > self.budget and self._items:
                _, old = self._items.popitem(last=False)
                self.used -= old.nbytes
            self._items[key] = w
            self.used += w.nbytes
        return w


class Tensors:
    """Typed, cached views of a model's tensors for the reference forward pass."""

    def __init__(self, expert_cache_bytes: int = 256 << 20):
        self._vectors: dict[str, np.ndarray] = {}
        self._q8: dict[str, Q8Matrix] = {}
        self._dense: dict[str, DenseMatrix] = {}
        self.experts = ExpertCache(expert_cache_bytes)

    def vector(self, t: TensorInfo) -> np.ndarray:
        """A small tensor (norm weight, HC scale/base, sinks, bias, ape...) as float32 (int32 for I32)."""
        v = self._vectors.get(t.name)
        if v is None:
            v = dequantize(t.data, t.qtype, t.shape)
            v.setflags(write=False)
            self._vectors[t.name] = v
        return v

    def q8(self, t: TensorInfo) -> Q8Matrix:
        m = self._q8.get(t.name)
        if m is None:
            m = self._q8[t.name] = Q8Matrix(t)
        return m

    def dense(self, t: TensorInfo) -> DenseMatrix:
        m = self._dense.get(t.name)
        if m is None:
            m = self._dense[t.name] = DenseMatrix(t)
        return m

    def expert(self, t: TensorInfo, e: int) -> np.ndarray:
        """Routed expert ``e`` of a 3-D expert tensor as float32 ``(n_out, n_in)``."""
        return self.experts.get(t, e)

    def embedding_row(self, t: TensorInfo, token: int) -> np.ndarray:
        """One row of the F16 token embedding as float32 (ds4.c:2756)."""
        n_vocab, n_embd = t.shape
        if not 0 <= token < n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{n_vocab - 1})")
        return dequantize_rows(t.data, t.qtype, n_embd, token, token + 1)[0]
