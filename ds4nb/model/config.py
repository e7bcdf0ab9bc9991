"""DS4 model shape and hyper-parameters, read from GGUF metadata.

Every number the forward pass needs comes from a ``deepseek4.*`` key (see
docs/runtime.md, "Metadata keys"), so the same code runs the real 43-layer
file and small synthetic files.  :data:`METADATA_KEYS` is the single table of
keys: :func:`config_from_metadata` reads through it, and the synthetic-model
writer writes through it (:meth:`ModelConfig.to_metadata`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
from gguf import GGUFValueType

from ds4nb.errors import ModelError, shown

ARCH = "deepseek4"

LayerKind = Literal["swa", "csa", "hca"]
"""Attention kind of one layer (docs/model.md, "Layer kinds").

``swa``: raw sliding window only (compress ratio 0); ``csa``: compressed
sparse attention, ratio 4 rows with the indexer choosing the top-k visible
rows; ``hca``: heavily compressed attention, every compressed row of a larger
ratio (128 in the real model) is visible.
"""

CSA_RATIO = 4
"""The compress ratio that makes a layer a CSA layer (overlapping windows and an indexer)."""


@dataclass(frozen=True)
class Bounds:
    """The values a metadata key may hold (for an array: each element); NaN is never inside."""

    lo: float
    hi: float
    lo_open: bool = False  # lo itself excluded

    def __contains__(self, value: float) -> bool:
        return (self.lo < value if self.lo_open else self.lo <= value) and value <= self.hi

    def describe(self) -> str:
        if self.lo == self.hi:
            return f"{self.lo:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


def _count(hi: int, lo: int = 1) -> Bounds:
    return Bounds(lo, hi)


def _small_positive(hi: float) -> Bounds:
    return Bounds(0.0, hi, lo_open=True)


@dataclass(frozen=True)
class MetadataKey:
    field: str
    key: str
    kind: Literal["u32", "u64", "f32", "bool", "u32[]", "f32[]"]
    bounds: Bounds | None = None  # checked when the key is present
    required: bool = True


# Bounds: what the forward pass can compute with, generous around the real model's
# values (docs/runtime.md, "Metadata keys").  Sizes that shape a tensor are also
# checked against the file's tensors; the others (window, top-k, iterations,
# context) size state or loops, so they get tighter caps.
METADATA_KEYS: tuple[MetadataKey, ...] = (
    MetadataKey("n_layer", "block_count", "u32", _count(1024)),
    MetadataKey("context_length", "context_length", "u64", _count(1 << 24), required=False),
    MetadataKey("n_embd", "embedding_length", "u32", _count(1 << 16)),
    MetadataKey("n_vocab", "vocab_size", "u32", _count(1 << 24)),
    MetadataKey("n_head", "attention.head_count", "u32", _count(1024)),
    MetadataKey("n_head_kv", "attention.head_count_kv", "u32", _count(1)),          # one shared KV head
    MetadataKey("head_dim", "attention.key_length", "u32", _count(1 << 14)),
    MetadataKey("value_dim", "attention.value_length", "u32", _count(1 << 14)),
    MetadataKey("n_rot", "rope.dimension_count", "u32", _count(1 << 14, lo=2)),
    MetadataKey("q_lora_rank", "attention.q_lora_rank", "u32", _count(1 << 16)),
    MetadataKey("out_lora_rank", "attention.output_lora_rank", "u32", _count(1 << 16)),
    MetadataKey("n_out_group", "attention.output_group_count", "u32", _count(1024)),
    MetadataKey("n_expert", "expert_count", "u32", _count(1 << 16)),
    MetadataKey("n_expert_used", "expert_used_count", "u32", _count(1024)),
    MetadataKey("n_ff_exp", "expert_feed_forward_length", "u32", _count(1 << 17)),
    MetadataKey("n_expert_shared", "expert_shared_count", "u32", _count(1)),
    MetadataKey("n_hash_layer", "hash_layer_count", "u32", _count(1024, lo=0)),
    # grouped routing is not used by DS4
    MetadataKey("expert_group_count", "expert_group_count", "u32", _count(0, lo=0), required=False),
    MetadataKey("expert_group_used_count", "expert_group_used_count", "u32", _count(0, lo=0), required=False),
    MetadataKey("n_swa", "attention.sliding_window", "u32", _count(1 << 16)),
    MetadataKey("n_indexer_head", "attention.indexer.head_count", "u32", _count(1024)),
    MetadataKey("indexer_head_dim", "attention.indexer.key_length", "u32", _count(1 << 14)),
    MetadataKey("indexer_top_k", "attention.indexer.top_k", "u32", _count(1024)),   # the top-k kernel's limit
    MetadataKey("n_hc", "hyper_connection.count", "u32", _count(64)),
    MetadataKey("hc_sinkhorn_iter", "hyper_connection.sinkhorn_iterations", "u32", _count(1000)),
    MetadataKey("hc_eps", "hyper_connection.epsilon", "f32", _small_positive(1e-2)),
    MetadataKey("rms_eps", "attention.layer_norm_rms_epsilon", "f32", _small_positive(1e-2)),
    MetadataKey("rope_freq_base", "rope.freq_base", "f32", Bounds(1.0, 1e12, lo_open=True)),
    MetadataKey("rope_scale_factor", "rope.scaling.factor", "f32", Bounds(1.0, 1e6)),
    MetadataKey("rope_yarn_beta_fast", "rope.scaling.yarn_beta_fast", "f32", _small_positive(1e6)),
    MetadataKey("rope_yarn_beta_slow", "rope.scaling.yarn_beta_slow", "f32", _small_positive(1e6)),
    MetadataKey("rope_orig_ctx", "rope.scaling.original_context_length", "u64", _count(1 << 32)),
    MetadataKey("compress_rope_freq_base", "attention.compress_rope_freq_base", "f32",
                Bounds(1.0, 1e12, lo_open=True)),
    MetadataKey("expert_weights_scale", "expert_weights_scale", "f32", _small_positive(1e3)),
    MetadataKey("expert_weights_norm", "expert_weights_norm", "bool"),
    MetadataKey("compress_ratios", "attention.compress_ratios", "u32[]", _count(1 << 16, lo=0)),
    MetadataKey("swiglu_clamp_exp", "swiglu_clamp_exp", "f32[]", _small_positive(1e6)),
)

_INT_TYPES = {
    GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
    GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64,
}
_FLOAT_TYPES = {GGUFValueType.FLOAT32, GGUFValueType.FLOAT64}
_WRITE_TYPE = {
    "u32": GGUFValueType.UINT32,
    "u64": GGUFValueType.UINT64,
    "f32": GGUFValueType.FLOAT32,
    "bool": GGUFValueType.BOOL,
    "u32[]": GGUFValueType.UINT32,
    "f32[]": GGUFValueType.FLOAT32,
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and constants of one DS4 model (names follow docs/model.md)."""

    n_layer: int
    n_embd: int
    n_vocab: int
    n_head: int
    n_head_kv: int
    head_dim: int
    value_dim: int
    n_rot: int
    q_lora_rank: int
    out_lora_rank: int
    n_out_group: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    n_expert_shared: int
    n_hash_layer: int
    n_swa: int
    n_indexer_head: int
    indexer_head_dim: int
    indexer_top_k: int
    n_hc: int
    hc_sinkhorn_iter: int
    hc_eps: float
    rms_eps: float
    rope_freq_base: float
    rope_scale_factor: float
    rope_yarn_beta_fast: float
    rope_yarn_beta_slow: float
    rope_orig_ctx: int
    compress_rope_freq_base: float
    expert_weights_scale: float
    expert_weights_norm: bool
    compress_ratios: tuple[int, ...]
    swiglu_clamp_exp: tuple[float, ...]
    context_length: int = 0
    expert_group_count: int = 0
    expert_group_used_count: int = 0

    def __post_init__(self) -> None:
        # GGUF stores these constants as float32: keep exactly those values, so a
        # config written to a file and read back compares equal.
        for spec in METADATA_KEYS:
            value = getattr(self, spec.field)
            if spec.kind == "f32":
                object.__setattr__(self, spec.field, float(np.float32(value)))
            elif spec.kind == "f32[]":
                object.__setattr__(self, spec.field, tuple(float(np.float32(v)) for v in value))

    # ---- derived sizes -------------------------------------------------
    @property
    def hc_dim(self) -> int:
        """Width of the flattened hyper-connection streams (n_hc x n_embd)."""
        return self.n_hc * self.n_embd

    @property
    def hc_mix_dim(self) -> int:
        """Rows of an HC mixing projection: pre (n_hc) + post (n_hc) + comb (n_hc^2)."""
        return 2 * self.n_hc + self.n_hc * self.n_hc

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def heads_per_group(self) -> int:
        return self.n_head // self.n_out_group

    @property
    def out_group_dim(self) -> int:
        """Input width of the grouped output projection attn_output_a (one group)."""
        return self.heads_per_group * self.head_dim

    @property
    def out_low_dim(self) -> int:
        return self.n_out_group * self.out_lora_rank

    @property
    def indexer_q_dim(self) -> int:
        return self.n_indexer_head * self.indexer_head_dim

    # ---- per-layer facts ----------------------------------------------
    def compress_ratio(self, layer: int) -> int:
        return self.compress_ratios[layer]

    def layer_kind(self, layer: int) -> LayerKind:
        ratio = self.compress_ratios[layer]
        if ratio == 0:
            return "swa"
        return "csa" if ratio == CSA_RATIO else "hca"

    def compressor_width(self, layer: int) -> int:
        """Columns of the attention compressor projections.

        CSA layers pool overlapping windows, so their compressor emits two
        head_dim-wide halves per token; HCA layers emit one.
        """
        return (2 if self.layer_kind(layer) == "csa" else 1) * self.head_dim

    def is_hash_layer(self, layer: int) -> bool:
        """The first ``n_hash_layer`` layers route experts by token id, not by score."""
        return layer < self.n_hash_layer

    # ---- (de)serialisation --------------------------------------------
    def to_metadata(self) -> dict[str, tuple[Any, GGUFValueType]]:
        """``deepseek4.*`` key -> (value, GGUF value type); arrays are lists."""
        out: dict[str, tuple[Any, GGUFValueType]] = {}
        for spec in METADATA_KEYS:
            value = getattr(self, spec.field)
            if not spec.required and value == 0:
                continue
            if spec.kind.endswith("[]"):
                value = list(value)
            out[f"{ARCH}.{spec.key}"] = (value, _WRITE_TYPE[spec.kind])
        return out

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _read_value(meta: Mapping[str, Any], types: Mapping[str, GGUFValueType], spec: MetadataKey) -> Any:
    key = f"{ARCH}.{spec.key}"
    if key not in meta:
        if spec.required:
            raise ModelError(f"required metadata key is missing: {key}")
        return 0
    value = _typed_value(key, meta[key], types.get(key), spec.kind)
    if spec.bounds is not None:
        for i, v in enumerate(value if isinstance(value, tuple) else (value,)):
            if v not in spec.bounds:
                where = f"{key}[{i}]" if isinstance(value, tuple) else key
                raise ModelError(f"metadata key {where} is {_number(v)}, expected {spec.bounds.describe()}")
    return value


def _typed_value(key: str, value: Any, vtype: GGUFValueType | None, kind: str) -> Any:
    if kind in ("u32", "u64"):
        if vtype not in _INT_TYPES or isinstance(value, (list, str)):
            raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected an integer")
        return int(value)
    if kind == "f32":
        if vtype not in _FLOAT_TYPES or isinstance(value, list):
            raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected a float")
        return float(value)
    if kind == "bool":
        if vtype != GGUFValueType.BOOL or isinstance(value, list):
            raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected a bool")
        return bool(value)
    # arrays: the reader reports the element type for arrays
    if not isinstance(value, list):
        raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected an array")
    if kind == "u32[]":
        if vtype not in _INT_TYPES:
            raise ModelError(f"metadata key {key} holds {_tname(vtype)} values, expected integers")
        return tuple(int(v) for v in value)
    if vtype not in _FLOAT_TYPES:
        raise ModelError(f"metadata key {key} holds {_tname(vtype)} values, expected floats")
    return tuple(float(v) for v in value)


def _number(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _tname(vtype: GGUFValueType | None) -> str:
    return "missing" if vtype is None else vtype.name


def config_from_metadata(meta: Mapping[str, Any], types: Mapping[str, GGUFValueType]) -> ModelConfig:
    """Build and validate a :class:`ModelConfig`.

    ``meta`` maps key -> decoded value; ``types`` maps key -> GGUF value type
    (for arrays, the element type).  Every key is checked against its
    :class:`Bounds`, then :func:`validate_config` checks how they fit
    together.  Raises :class:`ModelError` with one line naming the key and
    what was expected.
    """
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ModelError(f"general.architecture is {shown(repr(arch))}, expected {ARCH!r}")
    values = {spec.field: _read_value(meta, types, spec) for spec in METADATA_KEYS}
    cfg = ModelConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: ModelConfig) -> None:
    """Check how the keys fit together (docs/model.md, "Shape"); each key's own range is in its :class:`Bounds`."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ModelError(msg)

    need(cfg.value_dim == cfg.head_dim,
         f"deepseek4.attention.value_length ({cfg.value_dim}) must equal key_length ({cfg.head_dim})")
    need(cfg.n_rot <= cfg.head_dim and cfg.n_rot % 2 == 0,
         f"deepseek4.rope.dimension_count ({cfg.n_rot}) must be even and at most key_length ({cfg.head_dim})")
    need(cfg.n_head % cfg.n_out_group == 0,
         f"deepseek4.attention.output_group_count ({cfg.n_out_group}) must divide head_count ({cfg.n_head})")
    need(cfg.n_expert_used <= cfg.n_expert,
         f"deepseek4.expert_used_count ({cfg.n_expert_used}) exceeds expert_count ({cfg.n_expert})")
    need(cfg.n_hash_layer <= cfg.n_layer,
         f"deepseek4.hash_layer_count ({cfg.n_hash_layer}) exceeds block_count ({cfg.n_layer})")
    need(cfg.rope_yarn_beta_fast > cfg.rope_yarn_beta_slow,
         f"deepseek4.rope.scaling.yarn_beta_fast ({cfg.rope_yarn_beta_fast:g}) must exceed yarn_beta_slow "
         f"({cfg.rope_yarn_beta_slow:g})")
    need(len(cfg.compress_ratios) >= cfg.n_layer,
         f"deepseek4.attention.compress_ratios has {len(cfg.compress_ratios)} entries, expected {cfg.n_layer}")
    need(len(cfg.swiglu_clamp_exp) >= cfg.n_layer,
         f"deepseek4.swiglu_clamp_exp has {len(cfg.swiglu_clamp_exp)} entries, expected {cfg.n_layer}")
    for il in range(cfg.n_layer):
        ratio = cfg.compress_ratios[il]
        need(ratio == 0 or ratio >= 2,
             f"deepseek4.attention.compress_ratios[{il}] is {ratio}, expected 0 or >= 2")
    if any(cfg.layer_kind(il) == "csa" for il in range(cfg.n_layer)):
        d = cfg.indexer_head_dim  # the indexer rotates and pairs its rows (docs/model.md, "Indexer")
        need(d & (d - 1) == 0 and d % 32 == 0 and cfg.n_rot <= d,
             f"deepseek4.attention.indexer.key_length ({d}) must be a power of two, a multiple of 32 and at least "
             f"rope.dimension_count ({cfg.n_rot})")
