"""A fast reader for the GGUF v3 header (metadata and tensor directory).

``gguf.GGUFReader`` builds a numpy view per value: on DS4's 129280-token
vocabulary and 127741 merges that takes 14 s before the first tensor is
touched.  This reader walks the same bytes with ``struct`` and decodes string
arrays in one pass (about 0.2 s), and reports a short file as truncated.
Types and constants come from the ``gguf`` package; ``tests/test_model.py``
checks this reader against ``GGUFReader`` field by field.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGUFValueType

from ds4nb.errors import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


class _Truncated(Exception):
    pass


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dims: tuple[int, ...]   # GGUF order: dims[0] is contiguous
    ggml_type: int
    offset: int             # relative to the data section


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]              # arrays decoded to lists
    types: dict[str, GGUFValueType]       # for arrays: the element type
    tensors: list[TensorEntry]
    data_offset: int                      # absolute, aligned
    alignment: int


class _Cursor:
    """Reads from a file through a growing in-memory window."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0   # absolute position

    def _need(self, n: int) -> None:
        end = self.pos + n - self.base
        if end <= len(self.buf):
            return
        # keep only the unread tail, then read at least 1 MiB more
        keep = self.buf[self.pos - self.base:]
        more = self.fh.read(max(n - len(keep), 1 << 20))
        self.buf = keep + more
        self.base = self.pos
        if len(self.buf) < n:
            raise _Truncated

    def take(self, n: int) -> bytes:
        self._need(n)
        start = self.pos - self.base
        self.pos += n
        return self.buf[start:start + n]

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        start = self.pos - self.base
        self.pos += size
        return struct.unpack_from(fmt, self.buf, start)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        return self.take(n).decode("utf-8", errors="replace")

    def string_array(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            n = self.unpack("<Q")
            out.append(self.take(n).decode("utf-8", errors="replace"))
        return out

    def scalar_array(self, vtype: GGUFValueType, count: int) -> list[Any]:
        fmt = _SCALAR[vtype]
        size = struct.calcsize(fmt)
        raw = self.take(size * count)
        return list(struct.unpack(f"<{count}{fmt[1]}", raw))


def _value(c: _Cursor, vtype: GGUFValueType, key: str) -> tuple[Any, GGUFValueType]:
    if vtype == GGUFValueType.STRING:
        return c.string(), vtype
    if vtype in _SCALAR:
        return c.unpack(_SCALAR[vtype]), vtype
    if vtype == GGUFValueType.ARRAY:
        sub = GGUFValueType(c.unpack("<I"))
        count = c.unpack("<Q")
        if sub == GGUFValueType.STRING:
            return c.string_array(count), sub
        if sub in _SCALAR:
            return c.scalar_array(sub, count), sub
        raise ModelError(f"metadata key {key} holds nested arrays, which DS4 files do not use")
    raise ModelError(f"metadata key {key} has unknown value type {int(vtype)}")


def read_header(path: Path) -> GGUFHeader:
    """Parse the header of the GGUF at ``path``; raises :class:`ModelError` on bad input."""
    name = path.name
    try:
        with open(path, "rb") as fh:
            c = _Cursor(fh)
            if c.take(4) != MAGIC:
                raise ModelError(f"{name}: not a GGUF file (bad magic)")
            version = c.unpack("<I")
            if version != 3:
                raise ModelError(f"{name}: GGUF version {version} is not supported, expected 3")
            n_tensors, n_kv = c.unpack("<Q"), c.unpack("<Q")
            if n_tensors > 1 << 24 or n_kv > 1 << 24:
                raise ModelError(f"{name}: implausible GGUF header ({n_tensors} tensors, {n_kv} keys)")
            metadata: dict[str, Any] = {}
            types: dict[str, GGUFValueType] = {}
            for _ in range(n_kv):
                key = c.string()
                try:
                    vtype = GGUFValueType(c.unpack("<I"))
                except ValueError:
                    raise ModelError(f"{name}: metadata key {key} has an unknown value type") from None
                metadata[key], types[key] = _value(c, vtype, key)
            tensors = []
            for _ in range(n_tensors):
                tname = c.string()
                ndim = c.unpack("<I")
                if not 1 <= ndim <= 8:
                    raise ModelError(f"{name}: tensor {tname} has {ndim} dimensions, expected 1 to 8")
                dims = tuple(c.unpack("<Q") for _ in range(ndim))
                ggml_type = c.unpack("<I")
                offset = c.unpack("<Q")
                tensors.append(TensorEntry(tname, dims, ggml_type, offset))
            alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
            if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
                raise ModelError(f"{name}: general.alignment is {alignment!r}, expected a power of two")
            data_offset = -(-c.pos // alignment) * alignment
    except _Truncated:
        raise ModelError(f"{name}: file is truncated (it ends inside the GGUF header)") from None
    return GGUFHeader(version, metadata, types, tensors, data_offset, alignment)
