"""The DS4 tensor schema and the tensor catalog.

:func:`expected_tensors` lists every tensor a DS4 file of a given
:class:`ModelConfig` must (or may) hold: name, role, layer, shape and the
quant types allowed (docs/runtime.md, section 4).  The loader validates a file
against it and the synthetic-model writer writes exactly it, so the two can
never drift apart.

Shapes are in numpy order: the last axis is GGUF's contiguous ``dim0``.  A 2-D
weight ``(n_out, n_in)`` maps ``n_in`` inputs to ``n_out`` outputs; routed
experts are ``(n_expert, n_out, n_in)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

from gguf import GGMLQuantizationType as Q

from ds4nb.model.config import ModelConfig

Role = Literal[
    "token_embd", "output", "norm", "hc", "attn_q_a", "attn_q_b", "attn_kv", "attn_output",
    "attn_sinks", "compressor", "indexer", "router", "shared_expert", "routed_expert", "mtp",
]

ROUTED_EXPERT_TYPES = (Q.IQ2_XXS, Q.Q2_K, Q.Q4_K)
FLOAT_TYPES = (Q.F16, Q.F32)

FileKind = Literal["main", "mtp"]


@dataclass(frozen=True)
class TensorSpec:
    """What the schema expects of one tensor."""

    name: str
    field: str            # attribute name in Weights / LayerWeights
    role: Role
    layer: int | None     # None for model-level tensors
    shape: tuple[int, ...]
    qtypes: tuple[Q, ...]  # allowed quant types, the first is what `synth` writes by default
    required: bool = True
    synth: bool = True    # whether `ds4nb synth` writes it (optional tensors the real file has)


def _layer_specs(cfg: ModelConfig, il: int, prefix: str, *, mtp: bool) -> Iterator[TensorSpec]:
    e, hc = cfg.n_embd, cfg.hc_dim
    f16 = (Q.F16,) if not mtp else FLOAT_TYPES
    ratio = cfg.compress_ratios[il] if il < len(cfg.compress_ratios) else 0
    layer = None if mtp else il

    def t(field: str, role: Role, shape: tuple[int, ...], qtypes: tuple[Q, ...], *,
          suffix: str = "weight", name: str | None = None, required: bool = True,
          synth: bool = True) -> TensorSpec:
        return TensorSpec(f"{prefix}{name or field}.{suffix}", field, role, layer, shape, qtypes, required, synth)

    for site in ("attn", "ffn"):
        yield t(f"hc_{site}_fn", "hc", (cfg.hc_mix_dim, hc), f16)
        yield t(f"hc_{site}_scale", "hc", (3,), (Q.F32,))
        yield t(f"hc_{site}_base", "hc", (cfg.hc_mix_dim,), (Q.F32,))
        if site == "attn":
            yield t("attn_norm", "norm", (e,), (Q.F32,))
            yield t("attn_q_a", "attn_q_a", (cfg.q_lora_rank, e), (Q.Q8_0,))
            yield t("attn_q_a_norm", "norm", (cfg.q_lora_rank,), (Q.F32,))
            yield t("attn_q_b", "attn_q_b", (cfg.q_dim, cfg.q_lora_rank), (Q.Q8_0,))
            yield t("attn_kv", "attn_kv", (cfg.head_dim, e), (Q.Q8_0,))
            yield t("attn_kv_a_norm", "norm", (cfg.head_dim,), (Q.F32,))
            yield t("attn_sinks", "attn_sinks", (cfg.n_head,), (Q.F32,))
            yield t("attn_output_a", "attn_output", (cfg.out_low_dim, cfg.out_group_dim), (Q.Q8_0,))
            yield t("attn_output_b", "attn_output", (e, cfg.out_low_dim), (Q.Q8_0,))
            if ratio and not mtp:
                width = cfg.compressor_width(il)
                yield t("attn_compressor_ape", "compressor", (ratio, width), (Q.F16,))
                yield t("attn_compressor_kv", "compressor", (width, e), (Q.F16,))
                yield t("attn_compressor_gate", "compressor", (width, e), (Q.F16,))
                yield t("attn_compressor_norm", "compressor", (cfg.head_dim,), (Q.F32,))
            if ratio and cfg.layer_kind(il) == "csa" and not mtp:
                iw = 2 * cfg.indexer_head_dim
                yield t("indexer_attn_q_b", "indexer", (cfg.indexer_q_dim, cfg.q_lora_rank), (Q.F16,),
                        name="indexer.attn_q_b")
                yield t("indexer_proj", "indexer", (cfg.n_indexer_head, e), (Q.F16,), name="indexer.proj")
                yield t("indexer_compressor_ape", "indexer", (ratio, iw), (Q.F16,))
                yield t("indexer_compressor_kv", "indexer", (iw, e), (Q.F16,))
                yield t("indexer_compressor_gate", "indexer", (iw, e), (Q.F16,))
                yield t("indexer_compressor_norm", "indexer", (cfg.indexer_head_dim,), (Q.F32,))
    yield t("ffn_norm", "norm", (e,), (Q.F32,))
    yield t("ffn_gate_inp", "router", (cfg.n_expert, e), f16)
    # The selection bias is optional in main files; hash-routed layers never use it.
    yield t("ffn_exp_probs_b", "router", (cfg.n_expert,), (Q.F32,), name="exp_probs_b", suffix="bias",
            required=mtp, synth=mtp or not cfg.is_hash_layer(il))
    if not mtp and cfg.is_hash_layer(il):
        yield t("ffn_gate_tid2eid", "router", (cfg.n_vocab, cfg.n_expert_used), (Q.I32,))
    for proj, shape in (("gate", (cfg.n_expert, cfg.n_ff_exp, e)),
                        ("up", (cfg.n_expert, cfg.n_ff_exp, e)),
                        ("down", (cfg.n_expert, e, cfg.n_ff_exp))):
        order = ROUTED_EXPERT_TYPES if proj != "down" else (Q.Q2_K, Q.IQ2_XXS, Q.Q4_K)
        yield t(f"ffn_{proj}_exps", "routed_expert", shape, order)
    yield t("ffn_gate_shexp", "shared_expert", (cfg.n_ff_exp, e), (Q.Q8_0,))
    yield t("ffn_up_shexp", "shared_expert", (cfg.n_ff_exp, e), (Q.Q8_0,))
    yield t("ffn_down_shexp", "shared_expert", (e, cfg.n_ff_exp), (Q.Q8_0,))


def expected_tensors(cfg: ModelConfig, kind: FileKind = "main") -> list[TensorSpec]:
    """Every tensor of a DS4 file of this shape, in the order the real file stores them."""
    e = cfg.n_embd
    if kind == "mtp":
        p = "mtp.0."
        head = [
            TensorSpec(f"{p}hc_head_base.weight", "hc_head_base", "hc", None, (cfg.n_hc,), (Q.F32,)),
            TensorSpec(f"{p}hc_head_fn.weight", "hc_head_fn", "hc", None, (cfg.n_hc, cfg.hc_dim), FLOAT_TYPES),
            TensorSpec(f"{p}hc_head_scale.weight", "hc_head_scale", "hc", None, (1,), (Q.F32,)),
            TensorSpec(f"{p}e_proj.weight", "e_proj", "mtp", None, (e, e), (Q.Q8_0,)),
            TensorSpec(f"{p}h_proj.weight", "h_proj", "mtp", None, (e, e), (Q.Q8_0,)),
            TensorSpec(f"{p}enorm.weight", "enorm", "norm", None, (e,), (Q.F32,)),
            TensorSpec(f"{p}hnorm.weight", "hnorm", "norm", None, (e,), (Q.F32,)),
            TensorSpec(f"{p}norm.weight", "norm", "norm", None, (e,), (Q.F32,)),
        ]
        return head + list(_layer_specs(cfg, cfg.n_layer, p, mtp=True))
    specs = [TensorSpec("token_embd.weight", "token_embd", "token_embd", None, (cfg.n_vocab, e), (Q.F16,))]
    for il in range(cfg.n_layer):
        specs.extend(_layer_specs(cfg, il, f"blk.{il}.", mtp=False))
    specs += [
        TensorSpec("output_hc_base.weight", "output_hc_base", "hc", None, (cfg.n_hc,), (Q.F32,)),
        TensorSpec("output_hc_fn.weight", "output_hc_fn", "hc", None, (cfg.n_hc, cfg.hc_dim), (Q.F16,)),
        TensorSpec("output_hc_scale.weight", "output_hc_scale", "hc", None, (1,), (Q.F32,)),
        TensorSpec("output_norm.weight", "output_norm", "norm", None, (e,), (Q.F32,)),
        TensorSpec("output.weight", "output", "output", None, (cfg.n_vocab, e), (Q.Q8_0,)),
    ]
    return specs
