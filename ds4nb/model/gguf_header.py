"""A fast, defensive reader for the GGUF v3 header (metadata and tensor directory).

``gguf.GGUFReader`` builds a numpy view per value: on DS4's 129280-token
vocabulary and 127741 merges that takes 14 s before the first tensor is
touched.  This reader walks the same bytes with ``struct`` and decodes string
arrays in one pass (about 0.2 s).  Types and constants come from the ``gguf``
package; ``tests/test_model.py`` checks this reader against ``GGUFReader``
field by field.

The file is untrusted.  Every length and count is checked against the bytes
the file still holds before anything is read or allocated; strings must be
UTF-8; keys and tensor names must be unique; and the tensor directory must
describe the data section exactly: known GGML types, whole blocks per row,
offsets aligned and packed in order (each tensor starts where the previous
one's bytes, padded to the alignment, end), the last one inside the file.
Any violation is a one-line :class:`ModelError`; ``tests/test_fuzz.py``
throws mutated files at it.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from ds4nb.errors import ModelError, shown

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<B", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_ITEM_BYTES = {vtype: struct.calcsize(fmt) for vtype, fmt in _SCALAR.items()} | {GGUFValueType.STRING: 8}
# The smallest possible metadata entry (key length, 1-byte key, type, 1-byte value)
# and tensor info (name length, 1-byte name, ndim, one dim, type, offset).
_MIN_KV_BYTES = 8 + 1 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8


class _Truncated(Exception):
    """A read would run past the end of the file."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dims: tuple[int, ...]          # GGUF order: dims[0] is contiguous
    qtype: GGMLQuantizationType
    offset: int                    # relative to the data section, aligned
    nbytes: int                    # from the shape and type


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]              # arrays decoded to lists
    types: dict[str, GGUFValueType]       # for arrays: the element type
    tensors: list[TensorEntry]            # in directory order, validated against the file
    data_offset: int                      # absolute, aligned
    alignment: int


class _Cursor:
    """Reads from a file of known size through a growing in-memory window."""

    def __init__(self, fh: BinaryIO, size: int) -> None:
        self.fh = fh
        self.size = size
        self.buf = b""
        self.base = 0  # file offset of buf[0]
        self.pos = 0   # absolute position
        self.where = "the file header"  # what is being read, for error messages

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int) -> None:
        end = self.pos + n - self.base
        if end <= len(self.buf):
            return
        if n > self.remaining:
            raise _Truncated
        # keep only the unread tail, then read at least 1 MiB more
        keep = self.buf[self.pos - self.base:]
        more = self.fh.read(max(n - len(keep), 1 << 20))
        self.buf = keep + more
        self.base = self.pos
        if len(self.buf) < n:  # the file shrank under us
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

    def count(self, item_bytes: int) -> int:
        """A u64 count of items of at least ``item_bytes`` each, bounded by what is left."""
        n = self.unpack("<Q")
        if n * item_bytes > self.remaining:
            raise _Truncated
        return n

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8")

    def string_array(self, count: int) -> list[str]:
        out = []
        for _ in range(count):
            n = self.unpack("<Q")
            out.append(self.take(n).decode("utf-8"))
        return out

    def scalar_array(self, vtype: GGUFValueType, count: int) -> list[Any]:
        fmt = _SCALAR[vtype]
        raw = self.take(_ITEM_BYTES[vtype] * count)
        return list(struct.unpack(f"<{count}{fmt[1]}", raw))


def _value_type(code: int, what: str) -> GGUFValueType:
    try:
        return GGUFValueType(code)
    except ValueError:
        raise ModelError(f"{what} has unknown value type {code}") from None


def _value(c: _Cursor, vtype: GGUFValueType, what: str) -> tuple[Any, GGUFValueType]:
    if vtype == GGUFValueType.STRING:
        return c.string(), vtype
    if vtype == GGUFValueType.BOOL:
        return _bool(c.unpack("<B"), what), vtype
    if vtype in _SCALAR:
        return c.unpack(_SCALAR[vtype]), vtype
    # an array
    sub = _value_type(c.unpack("<I"), f"{what} (array)")
    if sub == GGUFValueType.ARRAY:
        raise ModelError(f"{what} holds nested arrays, which DS4 files do not use")
    count = c.count(_ITEM_BYTES[sub])
    if sub == GGUFValueType.STRING:
        return c.string_array(count), sub
    values = c.scalar_array(sub, count)
    if sub == GGUFValueType.BOOL:
        values = [_bool(v, what) for v in values]
    return values, sub


def _bool(byte: int, what: str) -> bool:
    if byte > 1:
        raise ModelError(f"{what} holds a bool byte {byte}, expected 0 or 1")
    return bool(byte)


def _read_metadata(c: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, GGUFValueType]]:
    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    for i in range(n_kv):
        c.where = f"metadata entry {i}"
        key = c.string()
        c.where = f"metadata key {shown(key)}"
        if key in metadata:
            raise ModelError(f"metadata key {shown(key)} appears twice")
        vtype = _value_type(c.unpack("<I"), c.where)
        metadata[key], types[key] = _value(c, vtype, c.where)
    return metadata, types


def _read_tensor_infos(c: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        c.where = f"tensor info {i}"
        name = c.string()
        c.where = f"tensor {shown(name)}"
        if name in names:
            raise ModelError(f"tensor {shown(name)} appears twice in the tensor directory")
        names.add(name)
        ndim = c.unpack("<I")
        if not 1 <= ndim <= MAX_DIMS:
            raise ModelError(f"tensor {shown(name)} has {ndim} dimensions, expected 1 to {MAX_DIMS}")
        dims = tuple(c.unpack("<Q") for _ in range(ndim))
        infos.append((name, dims, c.unpack("<I"), c.unpack("<Q")))
    return infos


def _alignment(metadata: dict[str, Any], types: dict[str, GGUFValueType]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value, vtype = metadata["general.alignment"], types["general.alignment"]
    if vtype != GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
        raise ModelError(f"general.alignment is {shown(value)} ({vtype.name}), expected a power of two (UINT32)")
    return value


def _tensor_entry(name: str, dims: tuple[int, ...], code: int, offset: int, alignment: int,
                  data_size: int) -> TensorEntry:
    what = f"tensor {shown(name)}"
    try:
        qtype = GGMLQuantizationType(code)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise ModelError(f"{what} has unknown GGML type {code}") from None
    if min(dims) == 0:
        raise ModelError(f"{what} has a zero dimension {list(dims)}")
    if dims[0] % block:
        raise ModelError(f"{what} row length {dims[0]} is not a multiple of the {qtype.name} block size {block}")
    nbytes = math.prod(dims) // block * block_bytes
    if offset % alignment:
        raise ModelError(f"{what} starts at data offset {offset}, which is not a multiple of the "
                         f"alignment {alignment}")
    if offset + nbytes > data_size:
        raise ModelError(f"file is truncated or corrupt: {what} ({qtype.name} {list(dims)}, {nbytes} bytes at "
                         f"data offset {offset}) ends past the end of the data section ({data_size} bytes)")
    return TensorEntry(name, dims, qtype, offset, nbytes)


def _check_packing(tensors: list[TensorEntry], alignment: int) -> None:
    """In offset order, each tensor starts where the previous one's bytes, padded to the alignment, end."""
    expected_at, previous = 0, None
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset != expected_at:
            if previous is None:
                raise ModelError(f"the first tensor's data, {shown(t.name)}, starts at data offset {t.offset}, "
                                 f"expected 0")
            relation = "overlaps" if t.offset < expected_at else "leaves a gap after"
            raise ModelError(f"tensor {shown(t.name)} at data offset {t.offset} {relation} tensor "
                             f"{shown(previous.name)} ({previous.qtype.name} {list(previous.dims)}, which ends at "
                             f"{expected_at}): offsets and shapes or types do not match")
        expected_at = -(-(t.offset + t.nbytes) // alignment) * alignment
        previous = t


def read_header(path: Path) -> GGUFHeader:
    """Parse and validate the header of the GGUF at ``path``; raises :class:`ModelError` on bad input."""
    name = shown(path.name)
    try:
        with open(path, "rb") as fh:
            c = _Cursor(fh, os.fstat(fh.fileno()).st_size)
            if c.take(4) != MAGIC:
                raise ModelError("not a GGUF file (bad magic)")
            version = c.unpack("<I")
            if version != 3:
                raise ModelError(f"GGUF version {version} is not supported, expected 3")
            n_tensors = c.count(_MIN_TENSOR_BYTES)
            n_kv = c.count(_MIN_KV_BYTES)
            metadata, types = _read_metadata(c, n_kv)
            infos = _read_tensor_infos(c, n_tensors)
    except _Truncated:
        raise ModelError(f"{name}: file is truncated or corrupt ({c.where} runs past the end of the file)") from None
    except UnicodeDecodeError:
        raise ModelError(f"{name}: {c.where}: a string is not valid UTF-8") from None
    except ModelError as e:
        raise ModelError(f"{name}: {e}") from None
    except OSError as e:
        raise ModelError(f"{name}: cannot read the file: {e.strerror or e}") from None
    try:
        alignment = _alignment(metadata, types)
        data_offset = -(-c.pos // alignment) * alignment
        data_size = c.size - data_offset
        tensors = [_tensor_entry(*info, alignment, data_size) for info in infos]
        _check_packing(tensors, alignment)
    except ModelError as e:
        raise ModelError(f"{name}: {e}") from None
    return GGUFHeader(version, metadata, types, tensors, data_offset, alignment)
