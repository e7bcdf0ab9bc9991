"""Open a DS4 GGUF without reading its weights.

:func:`load_model` parses the GGUF header (:mod:`ds4nb.model.gguf_header`;
the tensor data stays a read-only memory map), reads the ``deepseek4.*`` keys into
a :class:`ModelConfig`, checks every tensor against the schema in
:mod:`ds4nb.model.catalog`, and binds them into typed :class:`Weights` plus a
flat tensor catalog that placement policies and ``ds4nb info`` use.

Any problem is a :class:`ModelError` with one line naming the key or tensor
and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from ds4nb.errors import ModelError, shown, shown_path
from ds4nb.model.catalog import FileKind, Role, TensorSpec, expected_tensors
from ds4nb.model.config import ModelConfig, config_from_metadata
from ds4nb.model.gguf_header import GGUFHeader, read_header

TOKENS_KEY = "tokenizer.ggml.tokens"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file: catalog facts plus a read-only view of its bytes."""

    name: str
    role: Role | None      # None for tensors the schema does not know (ignored)
    layer: int | None
    qtype: Q
    shape: tuple[int, ...]  # numpy order (last axis contiguous)
    nbytes: int
    offset: int             # absolute byte offset in the file
    data: np.ndarray = field(repr=False, compare=False)  # uint8 memmap view, len == nbytes

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))

    @property
    def row_bytes(self) -> int:
        """Bytes of one contiguous row (the last axis)."""
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * size


@dataclass(frozen=True)
class LayerWeights:
    """The tensors of one transformer block (fields as in docs/model.md)."""

    hc_attn_fn: TensorInfo
    hc_attn_scale: TensorInfo
    hc_attn_base: TensorInfo
    attn_norm: TensorInfo
    attn_q_a: TensorInfo
    attn_q_a_norm: TensorInfo
    attn_q_b: TensorInfo
    attn_kv: TensorInfo
    attn_kv_a_norm: TensorInfo
    attn_sinks: TensorInfo
    attn_output_a: TensorInfo
    attn_output_b: TensorInfo
    hc_ffn_fn: TensorInfo
    hc_ffn_scale: TensorInfo
    hc_ffn_base: TensorInfo
    ffn_norm: TensorInfo
    ffn_gate_inp: TensorInfo
    ffn_gate_exps: TensorInfo
    ffn_up_exps: TensorInfo
    ffn_down_exps: TensorInfo
    ffn_gate_shexp: TensorInfo
    ffn_up_shexp: TensorInfo
    ffn_down_shexp: TensorInfo
    ffn_exp_probs_b: TensorInfo | None = None
    ffn_gate_tid2eid: TensorInfo | None = None
    attn_compressor_ape: TensorInfo | None = None
    attn_compressor_kv: TensorInfo | None = None
    attn_compressor_gate: TensorInfo | None = None
    attn_compressor_norm: TensorInfo | None = None
    indexer_attn_q_b: TensorInfo | None = None
    indexer_proj: TensorInfo | None = None
    indexer_compressor_ape: TensorInfo | None = None
    indexer_compressor_kv: TensorInfo | None = None
    indexer_compressor_gate: TensorInfo | None = None
    indexer_compressor_norm: TensorInfo | None = None


@dataclass(frozen=True)
class Weights:
    """Model-level tensors plus one :class:`LayerWeights` per block."""

    token_embd: TensorInfo
    output_hc_base: TensorInfo
    output_hc_fn: TensorInfo
    output_hc_scale: TensorInfo
    output_norm: TensorInfo
    output: TensorInfo
    layers: tuple[LayerWeights, ...]


@dataclass(frozen=True)
class MtpWeights:
    """The multi-token-prediction support file (recognised; not run yet)."""

    hc_head_base: TensorInfo
    hc_head_fn: TensorInfo
    hc_head_scale: TensorInfo
    e_proj: TensorInfo
    h_proj: TensorInfo
    enorm: TensorInfo
    hnorm: TensorInfo
    norm: TensorInfo
    block: LayerWeights


@dataclass(frozen=True)
class Model:
    """An opened DS4 GGUF file."""

    path: Path
    kind: FileKind
    config: ModelConfig
    metadata: Mapping[str, Any] = field(repr=False)
    metadata_types: Mapping[str, GGUFValueType] = field(repr=False)
    catalog: tuple[TensorInfo, ...] = field(repr=False)
    weights: Weights | MtpWeights = field(repr=False)
    file_size: int = 0

    @cached_property
    def tensors(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.catalog}

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelError(f"{shown(self.path.name)}: tensor {shown(name)} is not in the file") from None

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.catalog)

    @property
    def name(self) -> str:
        """``general.name`` (untrusted text: display it through :func:`ds4nb.errors.shown`)."""
        name = self.metadata.get("general.name")
        return name if isinstance(name, str) and name else self.path.stem


# ---------------------------------------------------------------------------
# reading


def _check_file(path: Path) -> int:
    if not path.exists():
        raise ModelError(f"model file not found: {shown_path(path)}")
    if not path.is_file():
        raise ModelError(f"not a regular file: {shown_path(path)}")
    return path.stat().st_size


def _check_vocabulary(cfg: ModelConfig, metadata: Mapping[str, Any]) -> None:
    """The token table, when present, has one entry per embedding row (token ids index both)."""
    tokens = metadata.get(TOKENS_KEY)
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != cfg.n_vocab):
        count = f"{len(tokens)} entries" if isinstance(tokens, list) else "not an array"
        raise ModelError(f"{TOKENS_KEY} has {count}, expected deepseek4.vocab_size = {cfg.n_vocab}")


def _check_hash_table(info: TensorInfo, n_expert: int) -> None:
    """Hash-routed layers index experts by these ids: each must name one of the ``n_expert`` experts."""
    ids = np.asarray(info.data).view("<i4")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n_expert):
        bad = int(ids[(ids < 0) | (ids >= n_expert)][0])
        raise ModelError(f"tensor {info.name} holds expert id {bad}, expected 0 to {n_expert - 1}")


def _check_tensor(spec: TensorSpec, qtype: Q, shape: tuple[int, ...]) -> None:
    if qtype not in spec.qtypes:
        allowed = " or ".join(q.name for q in spec.qtypes)
        raise ModelError(f"tensor {spec.name} has type {qtype.name}, expected {allowed}")
    if shape != spec.shape:
        raise ModelError(f"tensor {spec.name} has shape {list(shape)}, expected {list(spec.shape)}")


def _detect_kind(names: set[str]) -> FileKind:
    if any(n.startswith("blk.") for n in names):
        return "main"
    if any(n.startswith("mtp.") for n in names):
        return "mtp"
    return "main"


def load_model(path: str | os.PathLike[str]) -> Model:
    """Open, validate and catalog a DS4 GGUF (main model or MTP support file)."""
    path = Path(path)
    size = _check_file(path)
    header = read_header(path)
    try:
        return _open(path, size, header)
    except ModelError as e:
        raise ModelError(f"{shown(path.name)}: {e}") from None


def _open(path: Path, size: int, header: GGUFHeader) -> Model:
    metadata, types = header.metadata, header.types
    kind = _detect_kind({t.name for t in header.tensors})
    config = config_from_metadata(metadata, types)
    _check_vocabulary(config, metadata)

    mm = np.memmap(path, dtype=np.uint8, mode="r")
    specs = {s.name: s for s in expected_tensors(config, kind)}
    catalog: list[TensorInfo] = []
    by_name: dict[str, TensorInfo] = {}
    for t in header.tensors:
        shape = tuple(reversed(t.dims))
        offset = header.data_offset + t.offset
        spec = specs.get(t.name)
        if spec is not None:
            _check_tensor(spec, t.qtype, shape)
        info = TensorInfo(t.name, spec.role if spec else None, spec.layer if spec else None,
                          t.qtype, shape, t.nbytes, offset, mm[offset:offset + t.nbytes])
        catalog.append(info)
        by_name[t.name] = info
    for spec in specs.values():
        if spec.required and spec.name not in by_name:
            raise ModelError(f"required tensor is missing: {spec.name}")
        if spec.field == "ffn_gate_tid2eid" and spec.name in by_name:
            _check_hash_table(by_name[spec.name], config.n_expert)

    weights = _bind(config, kind, specs, by_name)
    return Model(path=path, kind=kind, config=config, metadata=metadata, metadata_types=types,
                 catalog=tuple(catalog), weights=weights, file_size=size)


def _bind(cfg: ModelConfig, kind: FileKind, specs: Mapping[str, TensorSpec],
          by_name: Mapping[str, TensorInfo]) -> Weights | MtpWeights:
    groups: dict[int | None, dict[str, TensorInfo]] = {}
    for name, spec in specs.items():
        if name in by_name:
            groups.setdefault(spec.layer, {})[spec.field] = by_name[name]
    top = groups.get(None, {})
    if kind == "mtp":
        layer_fields = set(LayerWeights.__dataclass_fields__)
        block = LayerWeights(**{k: v for k, v in top.items() if k in layer_fields})
        head = {k: v for k, v in top.items() if k not in layer_fields}
        return MtpWeights(block=block, **head)
    layers = tuple(LayerWeights(**groups[il]) for il in range(cfg.n_layer))
    for il, lw in enumerate(layers):
        if lw.ffn_gate_exps.qtype != lw.ffn_up_exps.qtype:
            raise ModelError(f"routed gate/up experts of layer {il} use different quant types "
                             f"({lw.ffn_gate_exps.qtype.name} vs {lw.ffn_up_exps.qtype.name})")
    return Weights(layers=layers, **top)
