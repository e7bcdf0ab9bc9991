"""GPU weight and activation layouts, produced from raw GGUF bytes with numpy.

One layout for every quantized type: **block-minor**.  A GGUF row is a run of
blocks, each block a packed record (Q8_0: fp16 ``d`` + 32 int8).  Read as is,
a lane that owns block ``b`` fetches its 34/66/84/144 bytes from an address
``b * block_bytes`` away from its neighbour's: 32 lanes touch 32 scattered
segments and the loads are neither aligned nor coalesced (measured on H100: a
Q8_0 matvec on raw blocks ran at 243 GB/s).

Block-minor splits every block into its fields and stores, per row, each
field as ``(words, n_blocks)``: word ``j`` of block ``b`` sits at ``j *
n_blocks + b``.  Lanes that own consecutive blocks then read consecutive
words for every ``j``, so each warp load is one contiguous, aligned run,
whatever the block size.  Fields:

``qs``  uint64 ``(..., n_rows, Wq, n_blocks)``  the quant bytes, 8 per word
``sc``  uint32 ``(..., n_rows, Ws, n_blocks)``  packed sub-block scales (K-quants only)
``dm``  float16 ``(..., n_rows, Wd, n_blocks)`` ``d`` (and ``dmin`` for K-quants)

=========  ====  ====  ====  ===========================================
type       Wq    Ws    Wd    bytes/block (same as GGUF: no overhead)
=========  ====  ====  ====  ===========================================
Q8_0       4     0     1     32 + 2 = 34
IQ2_XXS    8     0     1     64 + 2 = 66   (qs word j = group j: low 32 bits
                                            grid indices, high 32 bits signs+scale)
Q2_K       8     4     2     64 + 16 + 4 = 84
Q4_K       16    3     2     128 + 12 + 4 = 144
=========  ====  ====  ====  ===========================================

The byte order inside ``qs``/``sc`` words is the GGUF byte order (little
endian), so a kernel decodes exactly as the GGUF format description says.

Activations quantized on the device use the same idea (see
``pack_q8_0_activation`` / ``pack_q8_K_activation``): the int8 values as
uint64 words ``(..., W, n_blocks)`` plus fp32 scales ``(..., n_blocks)``; Q8_K
adds its 16-value partial sums as int32 pairs ``(..., 8, n_blocks)`` (word
``p`` holds ``bsums[2p]`` in its low and ``bsums[2p+1]`` in its high 16 bits,
which are exactly the two halves of Q4_K sub-block ``p``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.constants import GGMLQuantizationType

from ds4nb.quants.formats import BLOCK_DTYPE, QK8_0, QK_K, block_size, row_bytes

Q = GGMLQuantizationType

#: Layout names, as the kernel registry reports them.
LAYOUT_BLOCK_MINOR = "block-minor"

#: qtype -> (qs words, sc words, dm halves) per block.
_FIELD_WORDS: dict[GGMLQuantizationType, tuple[int, int, int]] = {
    Q.Q8_0: (4, 0, 1),
    Q.IQ2_XXS: (8, 0, 1),
    Q.Q2_K: (8, 4, 2),
    Q.Q4_K: (16, 3, 2),
}

REPACKABLE: tuple[GGMLQuantizationType, ...] = tuple(_FIELD_WORDS)


@dataclass(frozen=True)
class Field:
    """Where one block-minor field comes from: ``words`` words of ``word_bytes`` bytes at ``offset`` in a block."""

    name: str          # PackedWeight attribute: qs, sc or dm
    offset: int
    words: int
    word_bytes: int


def fields(qtype: GGMLQuantizationType) -> tuple[Field, ...]:
    """The block-minor fields of ``qtype`` and where each sits in a GGUF block (``d``/``dmin`` are adjacent)."""
    wq, ws, wd = _FIELD_WORDS[qtype]
    dt = BLOCK_DTYPE[qtype]
    out = [Field("qs", dt.fields["qs"][1], wq, 8)]
    if ws:
        out.append(Field("sc", dt.fields["scales"][1], ws, 4))
    if wd == 2 and dt.fields["dmin"][1] != dt.fields["d"][1] + 2:
        raise AssertionError(f"{qtype.name}: d and dmin are not adjacent")
    out.append(Field("dm", dt.fields["d"][1], wd, 2))
    return tuple(out)


def layout_name(qtype: GGMLQuantizationType) -> str:
    """E.g. ``'q8_0/block-minor'``."""
    return f"{qtype.name.lower()}/{LAYOUT_BLOCK_MINOR}"


@dataclass(frozen=True)
class PackedWeight:
    """A weight tensor in block-minor layout (numpy arrays, or device arrays after ``to_device``).

    ``shape`` is the logical numpy-order shape ``(..., n_rows, n_cols)`` of
    the dequantized tensor; ``sc`` is ``None`` for types without sub-block
    scales.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    qs: Any
    sc: Any
    dm: Any

    @property
    def n_rows(self) -> int:
        return self.shape[-2]

    @property
    def n_cols(self) -> int:
        return self.shape[-1]

    @property
    def n_blocks(self) -> int:
        """Blocks per row."""
        return self.n_cols // block_size(self.qtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensor (equal to the GGUF tensor's bytes)."""
        return sum(int(a.nbytes) for a in (self.qs, self.sc, self.dm) if a is not None)

    def to_device(self, stream: Any = 0) -> PackedWeight:
        """Copy the fields to the current CUDA device as flat 1-D numba device arrays.

        Kernels index the flat buffers with the block-minor formula; the
        logical layout is still described by ``shape``/``n_blocks``.
        """
        from numba import cuda

        def up(a):
            return None if a is None else cuda.to_device(np.ascontiguousarray(a).reshape(-1), stream=stream)

        return PackedWeight(self.qtype, self.shape, up(self.qs), up(self.sc), up(self.dm))


def _blocks(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    if qtype not in _FIELD_WORDS:
        raise NotImplementedError(f"no block-minor layout for {qtype.name}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"need at least (n_rows, n_cols), got {shape}")
    flat = np.asarray(raw).reshape(-1)
    if flat.dtype != np.uint8:
        raise TypeError(f"raw must be uint8 bytes, got {flat.dtype}")
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    expected = n_rows * row_bytes(qtype, shape[-1])
    if flat.size != expected:
        raise ValueError(f"{qtype.name} {shape} needs {expected} bytes, got {flat.size}")
    nb = shape[-1] // block_size(qtype)
    return flat.view(BLOCK_DTYPE[qtype]).reshape(*shape[:-1], nb)


def _field_words(blocks: np.ndarray, name: str, word: str, n_words: int) -> np.ndarray:
    """Field ``name`` of structured blocks (..., nb) as words (..., W, nb)."""
    f = np.ascontiguousarray(blocks[name])  # (..., nb, <field shape>)
    lead = blocks.shape
    w = f.view(np.uint8).reshape(*lead, -1).view(word)  # (..., nb, W)
    assert w.shape[-1] == n_words, (name, w.shape, n_words)
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


def repack(raw: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> PackedWeight:
    """Raw GGUF bytes of a tensor of numpy-order ``shape`` -> block-minor ``PackedWeight``."""
    blocks = _blocks(raw, qtype, shape)
    wq, ws, wd = _FIELD_WORDS[qtype]
    qs = _field_words(blocks, "qs", "<u8", wq)
    sc = _field_words(blocks, "scales", "<u4", ws) if ws else None
    if wd == 1:
        dm = np.ascontiguousarray(blocks["d"])[..., None, :]
    else:
        dm = np.stack([blocks["d"], blocks["dmin"]], axis=-2)
    return PackedWeight(qtype, tuple(int(s) for s in shape), qs, sc, np.ascontiguousarray(dm, dtype="<f2"))


def unpack(packed: PackedWeight) -> np.ndarray:
    """Inverse of ``repack``: the raw GGUF bytes (1-D uint8) of a host ``PackedWeight``."""
    qtype = packed.qtype
    lead_rows = packed.shape[:-1]
    nb = packed.n_blocks
    blocks = np.zeros((*lead_rows, nb), dtype=BLOCK_DTYPE[qtype])

    def words_to_field(words: np.ndarray, name: str) -> None:
        w = np.ascontiguousarray(np.swapaxes(np.asarray(words), -1, -2))  # (..., nb, W)
        field = blocks[name]
        blocks[name] = w.view(np.uint8).reshape(*lead_rows, nb, -1).view(field.dtype.base).reshape(field.shape)

    words_to_field(packed.qs, "qs")
    if packed.sc is not None:
        words_to_field(packed.sc, "scales")
    dm = np.asarray(packed.dm)
    blocks["d"] = dm[..., 0, :]
    if dm.shape[-2] == 2:
        blocks["dmin"] = dm[..., 1, :]
    return blocks.view(np.uint8).reshape(-1)


# ---------------------------------------------------------------------------
# Activation layouts (what act.quantize_* write and the dot kernels read)
# ---------------------------------------------------------------------------


def pack_q8_0_activation(qs: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 activation (int8 (..., K), fp32 (..., K/32)) -> (uint64 (..., 4, K/32), fp32 (..., K/32))."""
    qs = np.asarray(qs, dtype=np.int8)
    k = qs.shape[-1]
    if k % QK8_0:
        raise ValueError(f"Q8_0 activation length {k} is not a multiple of {QK8_0}")
    nb = k // QK8_0
    w = np.ascontiguousarray(qs).reshape(*qs.shape[:-1], nb, QK8_0).view("<u8")  # (..., nb, 4)
    return np.ascontiguousarray(np.swapaxes(w, -1, -2)), np.ascontiguousarray(d, dtype=np.float32)


def unpack_q8_0_activation(xq: np.ndarray, xd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``pack_q8_0_activation``."""
    w = np.ascontiguousarray(np.swapaxes(np.asarray(xq, dtype="<u8"), -1, -2))  # (..., nb, 4)
    qs = w.view(np.int8).reshape(*w.shape[:-2], -1)
    return qs, np.asarray(xd, dtype=np.float32)


def pack_q8_K_activation(
    qs: np.ndarray, d: np.ndarray, bsums: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q8_K activation -> (uint64 (..., 32, K/256), fp32 (..., K/256), int32 (..., 8, K/256))."""
    qs = np.asarray(qs, dtype=np.int8)
    k = qs.shape[-1]
    if k % QK_K:
        raise ValueError(f"Q8_K activation length {k} is not a multiple of {QK_K}")
    nb = k // QK_K
    lead = qs.shape[:-1]
    w = np.ascontiguousarray(qs).reshape(*lead, nb, QK_K).view("<u8")  # (..., nb, 32)
    pairs = np.ascontiguousarray(np.asarray(bsums, dtype="<i2")).reshape(*lead, nb, 16).view("<i4")  # (..., nb, 8)
    return (
        np.ascontiguousarray(np.swapaxes(w, -1, -2)),
        np.ascontiguousarray(d, dtype=np.float32),
        np.ascontiguousarray(np.swapaxes(pairs, -1, -2)),
    )


def unpack_q8_K_activation(
    yq: np.ndarray, yd: np.ndarray, ybs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of ``pack_q8_K_activation``: (int8 (..., K), fp32 (..., K/256), int16 (..., K/16))."""
    w = np.ascontiguousarray(np.swapaxes(np.asarray(yq, dtype="<u8"), -1, -2))  # (..., nb, 32)
    qs = w.view(np.int8).reshape(*w.shape[:-2], -1)
    p = np.ascontiguousarray(np.swapaxes(np.asarray(ybs, dtype="<i4"), -1, -2))  # (..., nb, 8)
    bsums = p.view("<i2").reshape(*p.shape[:-2], -1)
    return qs, np.asarray(yd, dtype=np.float32), bsums
