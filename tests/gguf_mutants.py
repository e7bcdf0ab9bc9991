"""Seeded, structure-aware mutations of a GGUF file and a harness that runs the CLI on them.

``tests/test_fuzz.py`` drives this over the ``tiny`` synthetic model.  Run it
directly to print outcome counts (the before/after numbers of a reader change):

    NUMBA_ENABLE_CUDASIM=1 python tests/gguf_mutants.py --count 600 --seed 0 [--generate-all]

The layout walk here is deliberately independent of ``ds4nb.model.gguf_header``:
it only has to understand the pristine file, and it records where every field
lies so that a mutation can aim at one (a count, a length, a type, a tensor
offset, a metadata value) instead of flipping bytes blindly.

Each :class:`Mutant` says what it must do: ``expect="reject"`` (corrupt: every
command must fail with one clean line), ``expect="load"`` (a legal edit: it
must load and generate), or ``expect="any"`` (either, but an accepted file
must pass :func:`plausibility_problems`, an independent validity check).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import re
import signal
import struct
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

# GGUF value types (the spec's numbering; not imported from ds4nb or gguf on purpose)
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
        U64: "<Q", I64: "<q", F64: "<d"}
# GGML types the DS4 files use: block elements, block bytes
_QSIZE = {0: (1, 4), 1: (1, 2), 8: (32, 34), 10: (256, 84), 12: (256, 144), 16: (256, 66), 26: (1, 4)}

Expect = Literal["reject", "load", "any"]


# ---------------------------------------------------------------------------
# layout of a (pristine) GGUF file


@dataclass(frozen=True)
class KV:
    key: str
    key_at: int          # the u64 key length
    type_at: int         # the u32 value type
    value_at: int        # the value; for arrays the u32 element type, then the u64 count
    end: int
    vtype: int
    value: object        # scalars decoded; arrays: list; strings: str
    item_at: tuple[int, ...] = ()  # arrays: where each item starts (strings: their u64 length)


@dataclass(frozen=True)
class TensorField:
    name: str
    name_at: int
    ndim_at: int
    dims: tuple[int, ...]
    type_at: int
    ggml_type: int
    offset_at: int
    offset: int

    @property
    def nbytes(self) -> int:
        block, size = _QSIZE[self.ggml_type]
        return math.prod(self.dims) // block * size


@dataclass(frozen=True)
class Layout:
    size: int
    n_tensors_at: int
    n_kv_at: int
    kvs: dict[str, KV]
    tensors: tuple[TensorField, ...]
    header_end: int
    alignment: int
    data_offset: int

    @property
    def data_size(self) -> int:
        return self.size - self.data_offset


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.data):
            raise ValueError("truncated")
        s = self.data[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s


def walk(data: bytes) -> Layout:
    """Where every header field of a GGUF v3 file lies; raises ValueError on anything odd."""
    r = _Reader(data)
    if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] != 3:
        raise ValueError("not GGUF v3")
    r.pos = 8
    n_tensors_at = r.pos
    n_tensors = r.unpack("<Q")
    n_kv_at = r.pos
    n_kv = r.unpack("<Q")
    if n_tensors > len(data) // 32 or n_kv > len(data) // 13:
        raise ValueError("counts")
    kvs: dict[str, KV] = {}
    for _ in range(n_kv):
        key_at = r.pos
        key = r.string()
        type_at = r.pos
        vtype = r.unpack("<I")
        value_at = r.pos
        items: list[int] = []
        if vtype == STRING:
            value: object = r.string()
        elif vtype == ARRAY:
            etype, count = r.unpack("<I"), r.unpack("<Q")
            if count > len(data):
                raise ValueError("count")
            value = []
            for _ in range(count):
                items.append(r.pos)
                value.append(r.string() if etype == STRING else r.unpack(_FMT[etype]))
        elif vtype in _FMT:
            value = r.unpack(_FMT[vtype])
        else:
            raise ValueError(f"type {vtype}")
        if key in kvs:
            raise ValueError(f"duplicate key {key}")
        kvs[key] = KV(key, key_at, type_at, value_at, r.pos, vtype, value, tuple(items))
    tensors = []
    for _ in range(n_tensors):
        name_at = r.pos
        name = r.string()
        ndim_at = r.pos
        ndim = r.unpack("<I")
        if not 1 <= ndim <= 8:
            raise ValueError("ndim")
        dims = tuple(r.unpack("<Q") for _ in range(ndim))
        type_at = r.pos
        ggml_type = r.unpack("<I")
        offset_at = r.pos
        offset = r.unpack("<Q")
        tensors.append(TensorField(name, name_at, ndim_at, dims, type_at, ggml_type, offset_at, offset))
    align_kv = kvs.get("general.alignment")
    alignment = align_kv.value if align_kv is not None else 32
    if align_kv is not None and align_kv.vtype != U32 or not isinstance(alignment, int) or alignment <= 0 \
            or alignment & (alignment - 1):
        raise ValueError("alignment")
    data_offset = -(-r.pos // alignment) * alignment
    return Layout(len(data), n_tensors_at, n_kv_at, kvs, tuple(tensors), r.pos, alignment, data_offset)


# ---------------------------------------------------------------------------
# what a valid DS4 file looks like (independent of ds4nb.model.config)

_F32_RANGES = {  # key: (exclusive low, inclusive high)
    "attention.layer_norm_rms_epsilon": (0.0, 1e-2),
    "hyper_connection.epsilon": (0.0, 1e-2),
    "rope.freq_base": (1.0, 1e12),
    "attention.compress_rope_freq_base": (1.0, 1e12),
    "rope.scaling.factor": (0.999, 1e6),
    "rope.scaling.yarn_beta_fast": (0.0, 1e6),
    "rope.scaling.yarn_beta_slow": (0.0, 1e6),
    "expert_weights_scale": (0.0, 1e6),
}


def plausibility_problems(data: bytes) -> list[str]:
    """Why an accepted mutant is not a valid DS4 file (empty when it is)."""
    try:
        lay = walk(data)
    except (ValueError, KeyError, UnicodeDecodeError, struct.error) as e:
        return [f"unparseable: {e}"]
    out = []
    meta = {k: kv.value for k, kv in lay.kvs.items()}
    ds = {k[len("deepseek4."):]: v for k, v in meta.items() if k.startswith("deepseek4.")}
    for key, (lo, hi) in _F32_RANGES.items():
        v = ds.get(key)
        if not isinstance(v, float) or not (lo < v <= hi):
            out.append(f"{key}={v!r}")
    if isinstance(ds.get("rope.scaling.yarn_beta_fast"), float) and isinstance(ds.get("rope.scaling.yarn_beta_slow"), float) \
            and not ds["rope.scaling.yarn_beta_fast"] > ds["rope.scaling.yarn_beta_slow"]:
        out.append("yarn betas not fast > slow")
    n_layer = ds.get("block_count", 0)
    for key in ("attention.compress_ratios", "swiglu_clamp_exp"):
        arr = ds.get(key)
        if not isinstance(arr, list) or len(arr) < n_layer:
            out.append(f"{key} shorter than block_count")
    for v in ds.get("swiglu_clamp_exp", [])[:n_layer]:
        if not (isinstance(v, float) and math.isfinite(v) and v > 0):
            out.append(f"swiglu_clamp_exp {v}")
    for key, lo, hi in (("attention.sliding_window", 1, 1 << 20), ("hyper_connection.sinkhorn_iterations", 1, 1000),
                        ("attention.indexer.top_k", 1, 1024), ("rope.scaling.original_context_length", 1, 1 << 32),
                        ("context_length", 1, 1 << 24)):
        v = ds.get(key, 1)
        if not (isinstance(v, int) and lo <= v <= hi):
            out.append(f"{key}={v}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) != ds.get("vocab_size"):
        out.append("vocabulary size differs from the token table")
    # tensor data: aligned, inside the file, packed without overlap
    spans = []
    for t in lay.tensors:
        if t.ggml_type not in _QSIZE:
            out.append(f"{t.name}: type {t.ggml_type}")
            continue
        if t.offset % lay.alignment:
            out.append(f"{t.name}: misaligned")
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            out.append(f"{an} overlaps {bn}")
        elif b0 - a1 >= lay.alignment:
            out.append(f"gap after {an}")
    if spans and spans[-1][1] > lay.data_size:
        out.append("past the end")
    if len({t.name for t in lay.tensors}) != len(lay.tensors):
        out.append("duplicate tensor names")
    return out


# ---------------------------------------------------------------------------
# mutations


@dataclass(frozen=True)
class Mutant:
    kind: str       # the operator: truncate, offset, metadata-range, ...
    detail: str     # what exactly changed
    data: bytes
    expect: Expect

    @property
    def name(self) -> str:
        return f"{self.kind}: {self.detail}"


def _put(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def _splice(data: bytes, start: int, end: int, new: bytes) -> bytes:
    return data[:start] + new + data[end:]


_HUGE = (1 << 31, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)

# Out-of-range values per deepseek4.* key (f32 keys get floats, integer keys integers).
BAD_VALUES: dict[str, tuple] = {
    "attention.layer_norm_rms_epsilon": (0.0, -1e-6, math.nan, math.inf, 0.5, 1.0),
    "hyper_connection.epsilon": (0.0, -1e-6, math.nan, -math.inf, 0.25),
    "rope.freq_base": (0.0, -1e4, 1.0, 0.5, math.nan, math.inf),
    "attention.compress_rope_freq_base": (0.0, -1.0, 1.0, math.nan, math.inf),
    "rope.scaling.factor": (0.0, -16.0, 0.5, math.nan, math.inf),
    "rope.scaling.yarn_beta_fast": (0.0, -32.0, 1.0, 0.5, math.nan, math.inf),
    "rope.scaling.yarn_beta_slow": (0.0, -1.0, 32.0, 64.0, math.nan, math.inf),
    "rope.scaling.original_context_length": (0, 1 << 40, (1 << 64) - 1),
    "context_length": (0, 1 << 40, (1 << 64) - 1),
    "expert_weights_scale": (0.0, -1.5, math.nan, math.inf, 1e30),
    "attention.sliding_window": (0, 1 << 31, (1 << 32) - 1),
    "attention.indexer.top_k": (0, 4096, (1 << 32) - 1),
    "hyper_connection.sinkhorn_iterations": (0, 10**6, (1 << 32) - 1),
    "attention.head_count_kv": (0, 2),
    "expert_used_count": (0, 9),
    "hash_layer_count": (5, (1 << 32) - 1),
    "expert_shared_count": (0, 2),
    "rope.dimension_count": (0, 3, 64, 128),
    "attention.value_length": (32, 0),
    "block_count": (0, 5, (1 << 32) - 1),
    "vocab_size": (0, 4538, 4540, (1 << 32) - 1),
    "expert_count": (0, 1 << 31),
    "attention.head_count": (0, 3, 1 << 31),
    "attention.output_group_count": (0, 3),
    "embedding_length": (0, 255, 1 << 31),
    "hyper_connection.count": (0, 1 << 31),
    "attention.indexer.head_count": (0, 1 << 31),
    "attention.indexer.key_length": (0, 48, 16),
    "attention.key_length": (0, 1 << 31),
}
BAD_ARRAY_VALUES: dict[str, tuple] = {
    "swiglu_clamp_exp": (0.0, -10.0, math.nan, math.inf),
    "attention.compress_ratios": (1, 3, 1 << 31, (1 << 32) - 1),
}
# Legal edits, some at the edge of what is valid: each must load and generate.
GOOD_VALUES: dict[str, tuple] = {
    "attention.layer_norm_rms_epsilon": (1e-5, 1e-2, 1e-30),
    "hyper_connection.epsilon": (1e-5, 1e-2),
    "rope.freq_base": (50000.0, 1.5, 1e12),
    "attention.compress_rope_freq_base": (10000.0, 1.5),
    "rope.scaling.factor": (4.0, 1.0, 1e6),
    "rope.scaling.yarn_beta_fast": (16.0, 1e6),
    "rope.scaling.yarn_beta_slow": (2.0, 1e-6),
    "rope.scaling.original_context_length": (4096, 1, 1 << 32),
    "context_length": (8192, 1 << 20, 1 << 24),
    "attention.sliding_window": (16, 1, 1 << 16),
    "attention.indexer.top_k": (8, 1, 1024),
    "hyper_connection.sinkhorn_iterations": (5, 1, 1000),
    "expert_weights_scale": (2.5, 1e3, 1e-6),
    "rope.dimension_count": (2, 32),
}
# Legal values with which generate may refuse to run (cleanly): no room for a prompt.
TIGHT_VALUES: dict[str, tuple] = {"context_length": (1, 16)}


def _value_fmt(kv: KV) -> str:
    return _FMT[kv.vtype]


def _m_truncate(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    last_end = lay.data_offset + max(t.offset + t.nbytes for t in lay.tensors)
    region = rng.choice(("header", "tensor-infos", "data"))
    if region == "header":
        cut = rng.randrange(0, lay.tensors[0].name_at)
    elif region == "tensor-infos":
        cut = rng.randrange(lay.tensors[0].name_at, lay.data_offset)
    else:
        cut = rng.randrange(lay.data_offset, last_end)
    return Mutant("truncate", f"{region} at byte {cut}", data[:cut], "reject")


def _m_magic_version(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    at = rng.randrange(0, 8)
    return Mutant("magic-version", f"byte {at}", _put(data, at, "<B", data[at] ^ (1 << rng.randrange(8))), "reject")


def _m_counts(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    which, at = rng.choice((("n_tensors", lay.n_tensors_at), ("n_kv", lay.n_kv_at)))
    (n,) = struct.unpack_from("<Q", data, at)
    value = rng.choice((0, n - 1, n + 1, n + 7, *_HUGE))
    return Mutant("header-count", f"{which} {n} -> {value}", _put(data, at, "<Q", value), "reject")


def _string_length_fields(lay: Layout) -> list[tuple[str, int, int]]:
    out = []
    for kv in lay.kvs.values():
        out.append((f"key {kv.key}", kv.key_at, len(kv.key.encode())))
        if kv.vtype == STRING:
            out.append((f"value of {kv.key}", kv.value_at, len(kv.value.encode())))
    for t in lay.tensors:
        out.append((f"tensor name {t.name}", t.name_at, len(t.name.encode())))
    return out


def _m_string_length(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    what, at, n = rng.choice(_string_length_fields(lay))
    value = rng.choice((0, n - 1, n + 1, n + 5, lay.size, *_HUGE))
    expect: Expect = "reject" if value > lay.size or what.startswith("tensor") else "any"
    return Mutant("string-length", f"{what}: {n} -> {value}", _put(data, at, "<Q", value), expect)


def _m_token_string_length(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    kv = lay.kvs[rng.choice(("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))]
    i = rng.randrange(len(kv.item_at))
    (n,) = struct.unpack_from("<Q", data, kv.item_at[i])
    value = rng.choice((0, n + 1, n - 1 if n else 2, *_HUGE))
    expect: Expect = "reject" if value > lay.size else "any"
    return Mutant("string-length", f"{kv.key}[{i}]: {n} -> {value}", _put(data, kv.item_at[i], "<Q", value), expect)


def _m_array_count(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    arrays = [kv for kv in lay.kvs.values() if kv.vtype == ARRAY]
    kv = rng.choice(arrays)
    n = len(kv.value)
    value = rng.choice((0, n - 1, n + 1, *_HUGE))
    expect: Expect = "reject" if value > lay.size or kv.key.startswith("deepseek4.") else "any"
    return Mutant("array-count", f"{kv.key}: {n} -> {value}", _put(data, kv.value_at + 4, "<Q", value), expect)


def _m_array_type(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    kv = rng.choice([kv for kv in lay.kvs.values() if kv.vtype == ARRAY])
    (old,) = struct.unpack_from("<I", data, kv.value_at)
    value = rng.choice([t for t in (*range(13), 13, 255, 1 << 31) if t != old])
    return Mutant("array-type", f"{kv.key}: {old} -> {value}", _put(data, kv.value_at, "<I", value), "any")


def _m_value_type(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    kv = rng.choice(list(lay.kvs.values()))
    value = rng.choice([t for t in (*range(13), 13, 100, (1 << 32) - 1) if t != kv.vtype])
    return Mutant("value-type", f"{kv.key}: {kv.vtype} -> {value}", _put(data, kv.type_at, "<I", value), "any")


def _set_scalar(data: bytes, kv: KV, value) -> bytes:
    fmt = _value_fmt(kv)
    if kv.vtype == F32:
        return _put(data, kv.value_at, fmt, value)
    if kv.vtype in (U32, U64) and 0 <= value < 1 << (8 * struct.calcsize(fmt)):
        return _put(data, kv.value_at, fmt, value)
    # the value does not fit the key's type: store it as a u64 (a legal re-typing)
    new = struct.pack("<I", U64) + struct.pack("<Q", value)
    return _splice(data, kv.type_at, kv.end, new)


def _m_metadata_range(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    key = rng.choice(sorted(BAD_VALUES))
    kv = lay.kvs[f"deepseek4.{key}"]
    value = rng.choice(BAD_VALUES[key])
    if kv.vtype != F32:
        value = int(value)
    return Mutant("metadata-range", f"{key} = {value!r}", _set_scalar(data, kv, value), "reject")


def _m_metadata_array_range(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    key = rng.choice(sorted(BAD_ARRAY_VALUES))
    kv = lay.kvs[f"deepseek4.{key}"]
    n_layer = lay.kvs["deepseek4.block_count"].value
    i = rng.randrange(n_layer)
    value = rng.choice(BAD_ARRAY_VALUES[key])
    fmt = "<f" if key == "swiglu_clamp_exp" else "<I"
    return Mutant("metadata-range", f"{key}[{i}] = {value!r}", _put(data, kv.item_at[i], fmt, value), "reject")


def _m_bool_value(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    kv = lay.kvs["deepseek4.expert_weights_norm"]
    value = rng.randrange(2, 256)
    return Mutant("metadata-range", f"expert_weights_norm byte = {value}", _put(data, kv.value_at, "<B", value),
                  "reject")


def _m_alignment(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    kv = lay.kvs["general.alignment"]
    value = rng.choice((0, 3, 24, 48, 1 << 31, (1 << 32) - 1))
    return Mutant("alignment", f"general.alignment = {value}", _put(data, kv.value_at, "<I", value), "reject")


def _m_metadata_good(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    table, expect = (TIGHT_VALUES, "any") if rng.random() < 0.1 else (GOOD_VALUES, "load")
    key = rng.choice(sorted(table))
    kv = lay.kvs[f"deepseek4.{key}"]
    value = rng.choice(table[key])
    return Mutant("metadata-legal", f"{key} = {value!r}", _set_scalar(data, kv, value), expect)


def _m_offset(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    t = rng.choice(lay.tensors)
    others = [u for u in lay.tensors if u is not t]
    a = lay.alignment
    choices = {
        "misaligned": t.offset + rng.randrange(1, a),
        "overlap-next": t.offset + a * rng.randrange(1, 4) if t.nbytes > a else t.offset + a,
        "overlap-prev": (t.offset - a) % (1 << 64),
        "same-as-other": rng.choice(others).offset,
        "at-data-end": -(-lay.data_size // a) * a,
        "past-data-end": lay.data_size + a * rng.randrange(1, 1000),
        "ends-past-data": -(-(lay.data_size - t.nbytes + 1) // a) * a,
        "huge": rng.choice(_HUGE) // a * a,
        "wraps": (1 << 64) - a,
    }
    how = rng.choice(sorted(choices))
    value = choices[how] % (1 << 64)
    if value == t.offset:
        value = t.offset + 1
    return Mutant("offset", f"{t.name} {how}: {t.offset} -> {value}", _put(data, t.offset_at, "<Q", value), "reject")


def _m_swap_offsets(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    """Two tensors of different sizes trade places: each now overlaps or leaves a gap."""
    padded = lambda t: -(-t.nbytes // lay.alignment)  # noqa: E731
    while True:
        t, u = rng.sample(lay.tensors, 2)
        if padded(t) != padded(u):  # equal padded sizes would swap into a valid file
            break
    out = _put(_put(data, t.offset_at, "<Q", u.offset), u.offset_at, "<Q", t.offset)
    return Mutant("offset", f"swap {t.name} and {u.name}", out, "reject")


def _m_dims(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    t = rng.choice(lay.tensors)
    i = rng.randrange(len(t.dims))
    d = t.dims[i]
    if len(t.dims) > 1 and t.dims[0] != t.dims[1] and rng.random() < 0.2:
        out = _put(_put(data, t.ndim_at + 4, "<Q", t.dims[1]), t.ndim_at + 12, "<Q", t.dims[0])
        return Mutant("shape", f"{t.name}: swap dims {t.dims}", out, "reject")
    value = rng.choice([v for v in (0, 1, d - 1, d + 1, 2 * d, d // 2, *_HUGE) if v != d and v >= 0])
    return Mutant("shape", f"{t.name} dim {i}: {d} -> {value}", _put(data, t.ndim_at + 4 + 8 * i, "<Q", value),
                  "reject")


def _m_ndim(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    t = rng.choice(lay.tensors)
    n = len(t.dims)
    value = rng.choice([v for v in (0, n - 1, n + 1, 8, 9, 1 << 31, (1 << 32) - 1) if v != n])
    return Mutant("ndim", f"{t.name}: {n} -> {value}", _put(data, t.ndim_at, "<I", value), "reject")


def _m_ggml_type(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    t = rng.choice(lay.tensors)
    value = rng.choice([v for v in (*range(42), 1 << 31, (1 << 32) - 1) if v != t.ggml_type])
    return Mutant("tensor-type", f"{t.name}: {t.ggml_type} -> {value}", _put(data, t.type_at, "<I", value), "reject")


def _m_duplicate_name(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    by_len: dict[int, list[TensorField]] = {}
    for t in lay.tensors:
        by_len.setdefault(len(t.name), []).append(t)
    group = rng.choice([g for g in by_len.values() if len(g) > 1])
    t, u = rng.sample(group, 2)
    out = _splice(data, t.name_at + 8, t.name_at + 8 + len(t.name), u.name.encode())
    return Mutant("duplicate-name", f"{t.name} renamed {u.name}", out, "reject")


def _m_duplicate_key(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    by_len: dict[int, list[KV]] = {}
    for kv in lay.kvs.values():
        by_len.setdefault(len(kv.key), []).append(kv)
    group = rng.choice([g for g in by_len.values() if len(g) > 1])
    a, b = rng.sample(group, 2)
    out = _splice(data, a.key_at + 8, a.key_at + 8 + len(a.key), b.key.encode())
    return Mutant("duplicate-key", f"{a.key} renamed {b.key}", out, "reject")


def _m_special_token(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    """A token DS4 needs by name is misspelled: the tokenizer must refuse the file (on generate)."""
    kv = lay.kvs["tokenizer.ggml.tokens"]
    i = rng.choice([i for i, s in enumerate(kv.value) if s.startswith("<") and s.endswith(">")][:8])
    at = kv.item_at[i] + 8
    return Mutant("special-token", f"token {i} {kv.value[i]!r}", _put(data, at, "<B", ord("X")), "any")


def _m_tokenizer(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    """Damage the tokenizer tables: ``info`` does not need them, ``generate`` must refuse them cleanly."""
    how = rng.choice(("token-bytes", "merge-bytes", "token-type", "pre", "model"))
    if how in ("token-bytes", "merge-bytes"):
        kv = lay.kvs["tokenizer.ggml.tokens" if how == "token-bytes" else "tokenizer.ggml.merges"]
        i = rng.randrange(len(kv.item_at))
        n = len(kv.value[i].encode())
        if n == 0:
            return Mutant("tokenizer", f"{how} {i} (empty)", data, "load")
        at = kv.item_at[i] + 8 + rng.randrange(n)
        value = rng.choice((ord(" "), ord("X"), 0, 0x7F, 0x0A))
        return Mutant("tokenizer", f"{how} {i} byte {at} = {value}", _put(data, at, "<B", value), "any")
    if how == "token-type":
        kv = lay.kvs["tokenizer.ggml.token_type"]
        i = rng.randrange(len(kv.item_at))
        value = rng.choice((-1, 0, 2, 3, 4, 5, 6, 1 << 30))
        return Mutant("tokenizer", f"token_type[{i}] = {value}", _put(data, kv.item_at[i], "<i", value), "any")
    kv = lay.kvs[f"tokenizer.ggml.{how}"]
    at = kv.value_at + 8 + rng.randrange(len(kv.value))
    return Mutant("tokenizer", f"tokenizer.ggml.{how} byte {at}", _put(data, at, "<B", ord("Z")), "any")


def _m_name_text(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    """``general.name`` full of markup and control characters: displayed escaped, never interpreted."""
    kv = lay.kvs["general.name"]
    n = len(kv.value.encode())
    text = (rng.choice(("[bold red]x[/]", "[/]", "\x1b[2J\r\n", "[link=x]", "\x07\x00")) * n)[:n]
    text = text.encode().decode("unicode_escape").encode()[:n].ljust(n, b"_")
    return Mutant("name-text", f"general.name = {text!r}", _splice(data, kv.value_at + 8, kv.value_at + 8 + n, text),
                  "load")


def _m_data_flip(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    """Weights full of NaN/inf: loads; generate must still finish (no crash on non-finite logits)."""
    t = rng.choice([t for t in lay.tensors if t.ggml_type in (0, 1)])
    b = bytearray(data)
    start = lay.data_offset + t.offset
    for _ in range(rng.choice((1, 16, 1024))):
        at = start + rng.randrange(t.nbytes)
        b[at] = 0xFF
    return Mutant("data-flip", f"{t.name}", bytes(b), "load")


def _structural_ranges(lay: Layout) -> list[tuple[int, int]]:
    """Header bytes outside the long string tables: counts, keys, types, values, tensor infos."""
    out = [(0, 24)]
    for kv in lay.kvs.values():
        big = kv.vtype == ARRAY and len(kv.value) > 64
        out.append((kv.key_at, kv.value_at + 12 if big else kv.end))
    out.append((lay.tensors[0].name_at, lay.header_end))
    return out


def _m_flip_structural(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    b = bytearray(data)
    spots = []
    ranges = _structural_ranges(lay)
    weights = [e - s for s, e in ranges]
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        s, e = rng.choices(ranges, weights)[0]
        at = rng.randrange(s, e)
        b[at] ^= 1 << rng.randrange(8) if rng.random() < 0.7 else rng.randrange(1, 256)
        spots.append(at)
    return Mutant("flip-structure", f"bytes {spots}", bytes(b), "any")


def _m_flip_header(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    b = bytearray(data)
    spots = sorted(rng.randrange(0, lay.header_end) for _ in range(rng.choice((1, 2, 8, 32))))
    for at in spots:
        b[at] ^= rng.randrange(1, 256)
    return Mutant("flip-header", f"{len(spots)} bytes from {spots[0]}", bytes(b), "any")


def _m_hash_table(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    t = next(t for t in lay.tensors if t.name.endswith("ffn_gate_tid2eid.weight"))
    n = math.prod(t.dims)
    i = rng.randrange(n)
    value = rng.choice((-1, 8, 9, 1 << 30, -(1 << 31)))
    at = lay.data_offset + t.offset + 4 * i
    return Mutant("hash-table", f"{t.name}[{i}] = {value}", _put(data, at, "<i", value), "reject")


def _m_append(rng: random.Random, data: bytes, lay: Layout) -> Mutant:
    n = rng.choice((1, 31, 32, 4096))
    return Mutant("append", f"{n} bytes", data + bytes(rng.randrange(256) for _ in range(n)), "any")


OPERATORS: tuple[tuple[Callable[[random.Random, bytes, Layout], Mutant], int], ...] = (
    (_m_truncate, 8),
    (_m_magic_version, 2),
    (_m_counts, 5),
    (_m_string_length, 7),
    (_m_token_string_length, 3),
    (_m_array_count, 5),
    (_m_array_type, 3),
    (_m_value_type, 6),
    (_m_metadata_range, 14),
    (_m_metadata_array_range, 4),
    (_m_bool_value, 1),
    (_m_alignment, 2),
    (_m_metadata_good, 8),
    (_m_offset, 12),
    (_m_swap_offsets, 3),
    (_m_dims, 7),
    (_m_ndim, 3),
    (_m_ggml_type, 5),
    (_m_duplicate_name, 2),
    (_m_duplicate_key, 2),
    (_m_special_token, 2),
    (_m_flip_structural, 10),
    (_m_flip_header, 4),
    (_m_hash_table, 2),
    (_m_append, 1),
    (_m_tokenizer, 5),
    (_m_name_text, 2),
    (_m_data_flip, 2),
)


def mutants(pristine: bytes, *, seed: int, count: int) -> Iterator[Mutant]:
    """``count`` mutants of ``pristine``, the same ones for the same seed."""
    lay = walk(pristine)
    rng = random.Random(seed)
    ops, weights = zip(*OPERATORS)
    for _ in range(count):
        op = rng.choices(ops, weights)[0]
        yield op(rng, pristine, lay)


# ---------------------------------------------------------------------------
# running the CLI on a mutant

Outcome = Literal["ok", "clean-error", "bad-error", "unescaped", "traceback", "hang", "accepted-corrupt"]

_RAW_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


class _Hang(BaseException):
    pass


@dataclass
class Run:
    code: int | None
    stderr: str
    stdout: str
    exc: str = ""          # the traceback of an exception that escaped main()
    hang: bool = False
    model_text: bool = False  # stdout is the model's reply, which may hold any character

    def outcome(self) -> Outcome:
        if self.hang:
            return "hang"
        if self.exc or "Traceback" in self.stderr:
            return "traceback"
        if _RAW_CONTROL.search(self.stderr) or (not self.model_text and _RAW_CONTROL.search(self.stdout)):
            return "unescaped"
        if self.code == 0:
            return "ok"
        lines = [ln for ln in self.stderr.splitlines() if ln.strip()]
        if self.code == 2 and len(lines) == 1 and lines[0].startswith("error: "):
            return "clean-error"
        return "bad-error"


def run_cli(argv: list[str], *, timeout: float = 20.0) -> Run:
    """``ds4nb.cli.main(argv)`` in this process, output captured, with a time limit."""
    from ds4nb.cli import main

    out, err = io.StringIO(), io.StringIO()

    def on_alarm(signum, frame):
        raise _Hang

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        return Run(code, err.getvalue(), out.getvalue(), model_text=argv[0] == "generate")
    except _Hang:
        return Run(None, err.getvalue(), out.getvalue(), hang=True)
    except BaseException:  # noqa: BLE001 - the point is to see everything that escapes
        return Run(None, err.getvalue(), out.getvalue(), exc=traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


GENERATE_ARGS = ("--backend", "cpu", "-n", "1", "--temp", "0", "--nothink", "--system", "", "-p", "hi")


@dataclass
class Result:
    mutant: Mutant
    info: Outcome
    generate: Outcome | None     # None: not run (the mutant did not load)
    detail: str = ""             # the first line of a problem, for reports


def classify(m: Mutant, info: Run, gen: Run | None, problems: list[str]) -> Result:
    i = info.outcome()
    if i == "ok" and (m.expect == "reject" or problems):
        i = "accepted-corrupt"
    g = gen.outcome() if gen is not None else None
    if g == "ok" and (m.expect == "reject" or problems):
        g = "accepted-corrupt"
    detail = ""
    for run in (info, gen):
        if run is not None and run.outcome() in ("traceback", "bad-error", "unescaped", "hang"):
            detail = (run.exc or run.stderr).strip().splitlines()[-1:] or ["(hang)"]
            detail = detail[0]
            break
    if not detail and problems and "ok" in (info.outcome(), gen.outcome() if gen else None):
        detail = "; ".join(problems[:3])
    return Result(m, i, g, detail)


def run_mutant(m: Mutant, workdir: Path, index: int, *, generate_all: bool = False) -> Result:
    path = workdir / f"mutant-{index}.gguf"
    path.write_bytes(m.data)
    try:
        info = run_cli(["info", str(path)])
        gen = None
        if generate_all or info.outcome() == "ok":
            gen = run_cli(["generate", "-m", str(path), *GENERATE_ARGS])
        problems = plausibility_problems(m.data) if "ok" in (info.outcome(), gen and gen.outcome()) else []
        if m.expect == "load" and info.outcome() != "ok":
            problems = []  # a wrongly rejected legal file is reported through the outcome below
        return classify(m, info, gen, problems)
    finally:
        path.unlink()


@dataclass
class Summary:
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self, which: str) -> Counter:
        return Counter(getattr(r, which) for r in self.results if getattr(r, which) is not None)

    def failures(self) -> list[Result]:
        """Mutants that broke a rule: anything but a clean error or a correct load."""
        bad = []
        for r in self.results:
            outs = {r.info, r.generate} - {None}
            if outs - {"ok", "clean-error"} or (r.mutant.expect == "load" and outs != {"ok"}):
                bad.append(r)
        return bad


@contextlib.contextmanager
def memory_headroom(extra_bytes: int) -> Iterator[None]:
    """Cap this process's address space at its current size plus ``extra_bytes`` (Linux), so a
    reader that allocates what a corrupt length asks for fails with MemoryError instead of
    exhausting the machine."""
    try:
        import resource

        with open("/proc/self/statm") as fh:
            current = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        yield
        return
    limit = current + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def run_all(pristine: bytes, workdir: Path, *, seed: int, count: int, generate_all: bool = False,
            on_result: Callable[[int, Result], None] | None = None) -> Summary:
    summary = Summary()
    t0 = time.perf_counter()
    with memory_headroom(4 << 30):
        for i, m in enumerate(mutants(pristine, seed=seed, count=count)):
            r = run_mutant(m, workdir, i, generate_all=generate_all)
            r.mutant = dataclasses.replace(m, data=b"")  # keep the description, not megabytes per mutant
            summary.results.append(r)
            if on_result:
                on_result(i, r)
    summary.seconds = time.perf_counter() - t0
    return summary


def _main() -> int:
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--generate-all", action="store_true", help="run generate on every mutant, not only loaded ones")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    from ds4nb.model.synth import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "tiny.gguf"
        write_synthetic(src, "tiny", seed=0)
        pristine = src.read_bytes()

        def show(i: int, r: Result) -> None:
            if args.verbose or {r.info, r.generate} - {None, "ok", "clean-error"}:
                print(f"{i:4d} {r.info:16s} {str(r.generate):16s} {r.mutant.name[:90]}  | {r.detail[:160]}",
                      flush=True)

        s = run_all(pristine, Path(tmp), seed=args.seed, count=args.count, generate_all=args.generate_all,
                    on_result=show)
    print(f"{len(s.results)} mutants in {s.seconds:.1f} s")
    for which in ("info", "generate"):
        print(which, dict(sorted(s.counts(which).items())))
    by_kind: dict[str, Counter] = {}
    for r in s.results:
        by_kind.setdefault(r.mutant.kind, Counter())[(r.info, r.generate)] += 1
    for kind, c in sorted(by_kind.items()):
        print(f"  {kind:16s} {dict(c)}")
    return 0 if not s.failures() else 1


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    sys.exit(_main())
