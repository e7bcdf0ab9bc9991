"""DS4 model shape and hyper-parameters, read from GGUF metadata.

Every number the forward pass needs comes from a ``deepseek4.*`` key (see
docs/runtime.md, "Metadata keys"), so the same code runs the real 43-layer
file and small synthetic files.  :data:`METADATA_KEYS` is the single table of
keys: :func:`config_from_metadata` reads through it, and the synthetic-model
writer writes through it (:meth:`ModelConfig.to_metadata`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
from gguf import GGUFValueType

from ds4nb.errors import ModelError

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
class MetadataKey:
    field: str
    key: str
    kind: Literal["u32", "u64", "f32", "bool", "u32[]", "f32[]"]
    required: bool = True


METADATA_KEYS: tuple[MetadataKey, ...] = (
    MetadataKey("n_layer", "block_count", "u32"),
    MetadataKey("context_length", "context_length", "u64", required=False),
    MetadataKey("n_embd", "embedding_length", "u32"),
    MetadataKey("n_vocab", "vocab_size", "u32"),
    MetadataKey("n_head", "attention.head_count", "u32"),
    MetadataKey("n_head_kv", "attention.head_count_kv", "u32"),
    MetadataKey("head_dim", "attention.key_length", "u32"),
    MetadataKey("value_dim", "attention.value_length", "u32"),
    MetadataKey("n_rot", "rope.dimension_count", "u32"),
    MetadataKey("q_lora_rank", "attention.q_lora_rank", "u32"),
    MetadataKey("out_lora_rank", "attention.output_lora_rank", "u32"),
    MetadataKey("n_out_group", "attention.output_group_count", "u32"),
    MetadataKey("n_expert", "expert_count", "u32"),
    MetadataKey("n_expert_used", "expert_used_count", "u32"),
    MetadataKey("n_ff_exp", "expert_feed_forward_length", "u32"),
    MetadataKey("n_expert_shared", "expert_shared_count", "u32"),
    MetadataKey("n_hash_layer", "hash_layer_count", "u32"),
    MetadataKey("expert_group_count", "expert_group_count", "u32", required=False),
    MetadataKey("expert_group_used_count", "expert_group_used_count", "u32", required=False),
    MetadataKey("n_swa", "attention.sliding_window", "u32"),
    MetadataKey("n_indexer_head", "attention.indexer.head_count", "u32"),
    MetadataKey("indexer_head_dim", "attention.indexer.key_length", "u32"),
    MetadataKey("indexer_top_k", "attention.indexer.top_k", "u32"),
    MetadataKey("n_hc", "hyper_connection.count", "u32"),
    MetadataKey("hc_sinkhorn_iter", "hyper_connection.sinkhorn_iterations", "u32"),
    MetadataKey("hc_eps", "hyper_connection.epsilon", "f32"),
    MetadataKey("rms_eps", "attention.layer_norm_rms_epsilon", "f32"),
    MetadataKey("rope_freq_base", "rope.freq_base", "f32"),
    MetadataKey("rope_scale_factor", "rope.scaling.factor", "f32"),
    MetadataKey("rope_yarn_beta_fast", "rope.scaling.yarn_beta_fast", "f32"),
    MetadataKey("rope_yarn_beta_slow", "rope.scaling.yarn_beta_slow", "f32"),
    MetadataKey("rope_orig_ctx", "rope.scaling.original_context_length", "u64"),
    MetadataKey("compress_rope_freq_base", "attention.compress_rope_freq_base", "f32"),
    MetadataKey("expert_weights_scale", "expert_weights_scale", "f32"),
    MetadataKey("expert_weights_norm", "expert_weights_norm", "bool"),
    MetadataKey("compress_ratios", "attention.compress_ratios", "u32[]"),
    MetadataKey("swiglu_clamp_exp", "swiglu_clamp_exp", "f32[]"),
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
    value, vtype = meta[key], types.get(key)
    if spec.kind in ("u32", "u64"):
        if vtype not in _INT_TYPES or isinstance(value, (list, str)):
            raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected an integer")
        if value < 0:
            raise ModelError(f"metadata key {key} is negative ({value})")
        return int(value)
    if spec.kind == "f32":
        if vtype not in _FLOAT_TYPES:
            raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected a float")
        return float(value)
    if spec.kind == "bool":
        if vtype != GGUFValueType.BOOL:
            raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected a bool")
        return bool(value)
    # arrays: the reader reports the element type for arrays
    if not isinstance(value, list):
        raise ModelError(f"metadata key {key} has type {_tname(vtype)}, expected an array")
    if spec.kind == "u32[]":
        if vtype not in _INT_TYPES:
            raise ModelError(f"metadata key {key} holds {_tname(vtype)} values, expected integers")
        if any(v < 0 for v in value):
            raise ModelError(f"metadata key {key} contains a negative value")
        return tuple(int(v) for v in value)
    if vtype not in _FLOAT_TYPES:
        raise ModelError(f"metadata key {key} holds {_tname(vtype)} values, expected floats")
    return tuple(float(v) for v in value)


def _tname(vtype: GGUFValueType | None) -> str:
    return "missing" if vtype is None else vtype.name


def config_from_metadata(meta: Mapping[str, Any], types: Mapping[str, GGUFValueType]) -> ModelConfig:
    """Build and validate a :class:`ModelConfig`.

    ``meta`` maps key -> decoded value; ``types`` maps key -> GGUF value type
    (for arrays, the element type).  Raises :class:`ModelError` with one line
    naming the key and what was expected.
    """
    arch = meta.get("general.architecture")
    if arch != ARCH:
        raise ModelError(f"general.architecture is {arch!r}, expected {ARCH!r}")
    values = {spec.field: _read_value(meta, types, spec) for spec in METADATA_KEYS}
    cfg = ModelConfig(**values)
    validate_config(cfg)
    return cfg


def validate_config(cfg: ModelConfig) -> None:
    """Check the invariants the forward pass relies on (docs/model.md, "Shape")."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ModelError(msg)

    pos = ("n_layer", "n_embd", "n_vocab", "n_head", "head_dim", "q_lora_rank", "out_lora_rank",
           "n_out_group", "n_expert", "n_expert_used", "n_ff_exp", "n_swa", "n_hc",
           "hc_sinkhorn_iter", "n_indexer_head", "indexer_head_dim", "indexer_top_k")
    for name in pos:
        need(getattr(cfg, name) > 0, f"deepseek4 metadata: {name} must be positive, got {getattr(cfg, name)}")
    need(cfg.n_head_kv == 1, f"deepseek4.attention.head_count_kv is {cfg.n_head_kv}, expected 1 (one shared KV head)")
    need(cfg.value_dim == cfg.head_dim,
         f"deepseek4.attention.value_length ({cfg.value_dim}) must equal key_length ({cfg.head_dim})")
    need(0 < cfg.n_rot <= cfg.head_dim and cfg.n_rot % 2 == 0,
         f"deepseek4.rope.dimension_count ({cfg.n_rot}) must be even and at most key_length ({cfg.head_dim})")
    need(cfg.n_head % cfg.n_out_group == 0,
         f"deepseek4.attention.output_group_count ({cfg.n_out_group}) must divide head_count ({cfg.n_head})")
    need(cfg.n_expert_used <= cfg.n_expert,
         f"deepseek4.expert_used_count ({cfg.n_expert_used}) exceeds expert_count ({cfg.n_expert})")
    need(cfg.n_expert_shared == 1, f"deepseek4.expert_shared_count is {cfg.n_expert_shared}, expected 1")
    need(cfg.expert_group_count == 0 and cfg.expert_group_used_count == 0,
         "deepseek4.expert_group_count/expert_group_used_count must be 0 (grouped routing is not used by DS4)")
    need(cfg.n_hash_layer <= cfg.n_layer,
         f"deepseek4.hash_layer_count ({cfg.n_hash_layer}) exceeds block_count ({cfg.n_layer})")
    need(len(cfg.compress_ratios) >= cfg.n_layer,
         f"deepseek4.attention.compress_ratios has {len(cfg.compress_ratios)} entries, expected {cfg.n_layer}")
    need(len(cfg.swiglu_clamp_exp) >= cfg.n_layer,
         f"deepseek4.swiglu_clamp_exp has {len(cfg.swiglu_clamp_exp)} entries, expected {cfg.n_layer}")
    for il in range(cfg.n_layer):
        ratio = cfg.compress_ratios[il]
        need(ratio == 0 or ratio >= 2,
             f"deepseek4.attention.compress_ratios[{il}] is {ratio}, expected 0 or >= 2")
        clamp = cfg.swiglu_clamp_exp[il]
        need(math.isfinite(clamp) and clamp > 0, f"deepseek4.swiglu_clamp_exp[{il}] is {clamp}, expected > 0")
    for name in ("hc_eps", "rms_eps", "rope_freq_base", "compress_rope_freq_base", "rope_scale_factor",
                 "expert_weights_scale"):
        v = getattr(cfg, name)
        need(math.isfinite(v) and v > 0, f"deepseek4 metadata: {name} must be a positive number, got {v}")
