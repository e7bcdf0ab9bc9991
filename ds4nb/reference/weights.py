"""Weight access for the numpy reference: memory-mapped tensors, dequantised lazily.

Nothing here holds a dequantised copy of the model.  Small tensors (norms, HC
controls, the router, compressor projections...) are converted to float32
once and kept; larger ones are converted in row chunks on every use; routed
experts are dequantised one expert at a time into a bounded LRU cache.

Products follow the reference CPU path (docs/model.md, "Activation
quantisation") with the numerics of docs/model.md, "Numerics": every product
is evaluated in float64 and rounded once to float32, so it depends neither on
the batch size nor on the BLAS kernel.

* Q8_0 weights take the activation quantised to Q8_0 and sum per 32-block
  ``(d_w * d_x) * sum_k q_w q_x`` (ds4.c:2958-3018); the integer block dots
  are exact (|sum| <= 32 * 128 * 128 < 2^24).
* F16 / F32 weights multiply the float32 activation directly.
* Routed experts (IQ2_XXS / Q2_K / Q4_K) multiply the exact values of the
  activation's Q8_K quantisation, one token and one expert at a time; experts
  are decoded to their exact (float64) values.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from gguf import GGMLQuantizationType as Q

from ds4nb.model.loader import TensorInfo
from ds4nb.quants import (
    BLOCK_DTYPE,
    dequantize,
    dequantize_q8_0_activation,
    dequantize_q8_K_activation,
    dequantize_rows,
    quantize_q8_0,
    quantize_q8_K,
)

QK8_0 = 32
CHUNK_BYTES = 2 << 20          # float32 bytes of weight converted per chunk
CACHE_TENSOR_BYTES = 4 << 20   # float32 size under which a 2-D tensor is converted once and kept


def q8_0_round_trip(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The values a Q8_0-quantised activation stands for (docs/model.md, "Activation quantisation").

    ``dtype=np.float64`` gives them exactly (``d * q`` needs up to 32 bits).
    """
    qs, d = quantize_q8_0(x)
    return dequantize_q8_0_activation(qs, d, dtype)


def q8_k_round_trip(x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """The values a Q8_K-quantised activation stands for (ds4.c:1729); float64: exactly."""
    qs, d, _ = quantize_q8_K(x)
    return dequantize_q8_K_activation(qs, d, dtype)


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
        return b["qs"].astype(np.float32), b["d"].astype(np.float64)

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
        xd64 = np.asarray(xd, dtype=np.float32).astype(np.float64)  # (T, nb)
        out = np.empty((n_tok, r1 - r0), dtype=np.float32)
        for c0 in range(r0, r1, self._chunk):
            c1 = min(c0 + self._chunk, r1)
            qs, d = self._rows(c0, c1)
            idot = np.einsum("cbk,tbk->tcb", qs, xqf).astype(np.float64)   # exact integer dots
            terms = (d[None, :, :] * xd64[:, None, :]) * idot                # (d_w * d_x) * dot, float64
            out[:, c0 - r0:c1 - r0] = terms.sum(axis=-1)                     # rounded once
        return out


class DenseMatrix:
    """An F16 / F32 weight ``(n_out, n_in)`` applied to float32 activations, in float64."""

    def __init__(self, t: TensorInfo):
        if t.qtype not in (Q.F16, Q.F32) or len(t.shape) != 2:
            raise ValueError(f"{t.name}: expected a 2-D F16/F32 tensor, got {t.qtype.name} {t.shape}")
        self.name = t.name
        self.n_out, self.n_in = t.shape
        self._values = t.data.view(np.float16 if t.qtype == Q.F16 else np.float32).reshape(t.shape)
        self._chunk = max(1, CHUNK_BYTES // (4 * self.n_in))
        self._cached: np.ndarray | None = None
        if self.n_out * self.n_in * 4 <= CACHE_TENSOR_BYTES:
            self._cached = self._values.astype(np.float64)

    def matmul64(self, x: np.ndarray) -> np.ndarray:
        """``x (..., n_in)`` float32 -> ``(..., n_out)`` float64, not rounded (for fused formulas)."""
        x = np.asarray(x, dtype=np.float32).astype(np.float64)
        if self._cached is not None:
            return x @ self._cached.T
        out = np.empty((*x.shape[:-1], self.n_out), dtype=np.float64)
        for r0 in range(0, self.n_out, self._chunk):
            r1 = min(r0 + self._chunk, self.n_out)
            out[..., r0:r1] = x @ self._values[r0:r1].astype(np.float64).T
        return out

    def matvec(self, x: np.ndarray) -> np.ndarray:
        """``x (n_in,)`` -> ``(n_out,)`` float32 (float64 products and sums, one rounding)."""
        return self.matmul64(x).astype(np.float32)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """``x (T, n_in)`` -> ``(T, n_out)`` float32."""
        return self.matmul64(x).astype(np.float32)

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
        w = dequantize_rows(t.data, t.qtype, n_in, expert * n_out, (expert + 1) * n_out, np.float64)
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
        """Routed expert ``e`` of a 3-D expert tensor, its exact values as float64 ``(n_out, n_in)``."""
        return self.experts.get(t, e)

    def embedding_row(self, t: TensorInfo, token: int) -> np.ndarray:
        """One row of the F16 token embedding as float32 (ds4.c:2756)."""
        n_vocab, n_embd = t.shape
        if not 0 <= token < n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{n_vocab - 1})")
        return dequantize_rows(t.data, t.qtype, n_embd, token, token + 1)[0]
