"""The session state a DS4 decoder carries between calls (docs/model.md, "Session state").

One :class:`LayerState` per layer:

* ``raw``: the sliding window, the last ``n_swa`` KV rows (oldest first),
  each ``head_dim`` wide, after RoPE, the FP8 round trip and F16 storage;
* ``comp``: every compressed KV row emitted so far (ratio layers);
* ``attn_compressor``: the compressor's partial window (kv values and scores);
* ``index_comp`` / ``index_compressor``: the same for the indexer's own
  compressed stream (CSA layers only).

plus the position (number of tokens consumed).  Nothing else influences the
next token's logits: restoring a snapshot reproduces them bit for bit.

The arrays are plain numpy, so :meth:`State.to_bytes` / :meth:`State.from_bytes`
(an ``.npz`` archive) is a portable format other engines can read and write.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np

from ds4nb.model.config import ModelConfig
from ds4nb.reference.ops import NEG_INF


@dataclass
class CompressorState:
    """docs/model.md step 9: one compressor's rolling window.

    ``kv`` and ``score`` are ``(rows, width)``: ``rows = 2 * ratio`` with
    overlapping windows (previous window first, then the current one),
    ``ratio`` otherwise.  Slots not written in the current window hold
    ``kv = 0`` and ``score = -1e30``.
    """

    kv: np.ndarray
    score: np.ndarray

    @classmethod
    def empty(cls, rows: int, width: int) -> "CompressorState":
        return cls(np.zeros((rows, width), np.float32), np.full((rows, width), NEG_INF, np.float32))

    def copy(self) -> "CompressorState":
        return CompressorState(self.kv.copy(), self.score.copy())


@dataclass
class RowBuffer:
    """An append-only list of equal-width float32 rows with amortised growth."""

    width: int
    n: int = 0
    _buf: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self._buf is None:
            self._buf = np.zeros((16, self.width), np.float32)

    @property
    def rows(self) -> np.ndarray:
        """The live rows ``(n, width)`` (a view; do not keep it across appends)."""
        return self._buf[:self.n]

    def append(self, row: np.ndarray) -> None:
        if self.n == len(self._buf):
            grown = np.zeros((2 * len(self._buf), self.width), np.float32)
            grown[:self.n] = self._buf[:self.n]
            self._buf = grown
        self._buf[self.n] = row
        self.n += 1

    def copy(self) -> "RowBuffer":
        return RowBuffer.of(self.rows.copy())

    @classmethod
    def of(cls, rows: np.ndarray) -> "RowBuffer":
        rows = np.asarray(rows, np.float32)
        buf = np.zeros((max(16, len(rows)), rows.shape[1]), np.float32)
        buf[:len(rows)] = rows
        return cls(rows.shape[1], len(rows), buf)


@dataclass
class LayerState:
    """Everything one layer remembers (see the module docstring)."""

    raw: np.ndarray                                  # (<= n_swa, head_dim)
    comp: RowBuffer | None = None                    # compressed KV rows
    attn_compressor: CompressorState | None = None
    index_comp: RowBuffer | None = None              # indexer rows (CSA only)
    index_compressor: CompressorState | None = None

    def copy(self) -> "LayerState":
        return LayerState(
            raw=self.raw.copy(),
            comp=None if self.comp is None else self.comp.copy(),
            attn_compressor=None if self.attn_compressor is None else self.attn_compressor.copy(),
            index_comp=None if self.index_comp is None else self.index_comp.copy(),
            index_compressor=None if self.index_compressor is None else self.index_compressor.copy(),
        )


@dataclass
class State:
    """A whole session: the position plus one :class:`LayerState` per layer."""

    position: int
    layers: list[LayerState]

    @classmethod
    def empty(cls, cfg: ModelConfig) -> "State":
        """The state before the first token (docs/model.md, "Session state")."""
        layers = []
        for il in range(cfg.n_layer):
            ratio = cfg.compress_ratio(il)
            ls = LayerState(raw=np.zeros((0, cfg.head_dim), np.float32))
            if ratio:
                overlap = cfg.layer_kind(il) == "csa"
                rows = (2 if overlap else 1) * ratio
                ls.comp = RowBuffer(cfg.head_dim)
                ls.attn_compressor = CompressorState.empty(rows, cfg.compressor_width(il))
                if overlap:
                    ls.index_comp = RowBuffer(cfg.indexer_head_dim)
                    ls.index_compressor = CompressorState.empty(rows, 2 * cfg.indexer_head_dim)
            layers.append(ls)
        return cls(0, layers)

    def __repr__(self) -> str:
        comp = [ls.comp.n for ls in self.layers if ls.comp is not None]
        return f"State(position={self.position}, layers={len(self.layers)}, compressed_rows={comp})"

    def copy(self) -> "State":
        """A deep copy: later calls on either object do not affect the other."""
        return State(self.position, [ls.copy() for ls in self.layers])

    # ---- serialisation -------------------------------------------------
    _PARTS = ("raw", "comp", "attn_kv", "attn_score", "index_comp", "index_kv", "index_score")

    def arrays(self) -> dict[str, np.ndarray]:
        """Flat ``name -> array`` view: ``position`` and ``l{il}.{part}`` per layer."""
        out: dict[str, np.ndarray] = {"position": np.array(self.position, np.int64),
                                      "n_layer": np.array(len(self.layers), np.int64)}
        for il, ls in enumerate(self.layers):
            out[f"l{il}.raw"] = ls.raw
            if ls.comp is not None:
                out[f"l{il}.comp"] = ls.comp.rows
            if ls.attn_compressor is not None:
                out[f"l{il}.attn_kv"] = ls.attn_compressor.kv
                out[f"l{il}.attn_score"] = ls.attn_compressor.score
            if ls.index_comp is not None:
                out[f"l{il}.index_comp"] = ls.index_comp.rows
            if ls.index_compressor is not None:
                out[f"l{il}.index_kv"] = ls.index_compressor.kv
                out[f"l{il}.index_score"] = ls.index_compressor.score
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "State":
        n_layer = int(arrays["n_layer"])
        layers = []
        for il in range(n_layer):
            def get(part: str) -> np.ndarray | None:
                a = arrays.get(f"l{il}.{part}")
                return None if a is None else np.array(a, dtype=np.float32)

            ls = LayerState(raw=get("raw"))
            comp, akv, asc = get("comp"), get("attn_kv"), get("attn_score")
            if comp is not None:
                ls.comp = RowBuffer.of(comp)
            if akv is not None and asc is not None:
                ls.attn_compressor = CompressorState(akv, asc)
            icomp, ikv, isc = get("index_comp"), get("index_kv"), get("index_score")
            if icomp is not None:
                ls.index_comp = RowBuffer.of(icomp)
            if ikv is not None and isc is not None:
                ls.index_compressor = CompressorState(ikv, isc)
            layers.append(ls)
        return cls(int(arrays["position"]), layers)

    def to_bytes(self) -> bytes:
        """Serialise to an uncompressed ``.npz`` archive."""
        buf = io.BytesIO()
        np.savez(buf, **self.arrays())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "State":
        with np.load(io.BytesIO(data)) as z:
            return cls.from_arrays({k: z[k] for k in z.files})

    def save(self, path: str | os.PathLike[str]) -> None:
        with open(path, "wb") as fh:
            fh.write(self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "State":
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())

    def equals(self, other: "State") -> bool:
        """Bitwise equality of every array and the position."""
        a, b = self.arrays(), other.arrays()
        return a.keys() == b.keys() and all(
            a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
            for k in a)
