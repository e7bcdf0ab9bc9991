"""Shapes of the synthetic DS4 models ``ds4nb synth`` writes.

``flash`` is the real DeepSeek V4 Flash shape (ds4.c:87-108 and the metadata
checks at ds4.c:2563-2645).  ``small`` keeps the real vocabulary, window and
compression ratios with small dims: it is the embedded default model.
``tiny`` shrinks everything so the whole GPU pipeline runs under Numba's CUDA
simulator; it also shrinks the mechanics that need long inputs in the real
model, through the same metadata keys: sliding window 8 instead of 128, HCA
ratio 16 instead of 128 and indexer top-k 4 instead of 512, so a prompt of a
few dozen tokens crosses every boundary.  n_vocab of ``tiny`` and ``small``
is filled in from the vocabulary the writer embeds.
"""

from __future__ import annotations

from ds4nb.model.config import ModelConfig

# The real model's YaRN/RoPE and epsilon constants (ds4.c:52-61).
_COMMON = dict(
    n_head_kv=1,
    n_expert_shared=1,
    hc_sinkhorn_iter=20,
    hc_eps=1e-6,
    rms_eps=1e-6,
    rope_freq_base=10000.0,
    rope_scale_factor=16.0,
    rope_yarn_beta_fast=32.0,
    rope_yarn_beta_slow=1.0,
    rope_orig_ctx=65536,
    compress_rope_freq_base=160000.0,
    expert_weights_scale=1.5,
    expert_weights_norm=True,
    n_hc=4,
)


def ds4_compress_ratios(n_layer: int, hca_ratio: int = 128) -> tuple[int, ...]:
    """Layers 0-1 sliding window only, then CSA (4) on even and HCA on odd layers."""
    return tuple(0 if il < 2 else (4 if il % 2 == 0 else hca_ratio) for il in range(n_layer))


def flash_config(n_layer: int = 43) -> ModelConfig:
    return ModelConfig(
        n_layer=n_layer, context_length=1048576, n_embd=4096, n_vocab=129280,
        n_head=64, head_dim=512, value_dim=512, n_rot=64,
        q_lora_rank=1024, out_lora_rank=1024, n_out_group=8,
        n_expert=256, n_expert_used=6, n_ff_exp=2048, n_hash_layer=min(3, n_layer),
        n_swa=128, n_indexer_head=64, indexer_head_dim=128, indexer_top_k=512,
        compress_ratios=ds4_compress_ratios(n_layer), swiglu_clamp_exp=(10.0,) * n_layer,
        **_COMMON,
    )


def small_config(n_vocab: int, n_layer: int = 6) -> ModelConfig:
    return ModelConfig(
        n_layer=n_layer, context_length=1048576, n_embd=256, n_vocab=n_vocab,
        n_head=8, head_dim=128, value_dim=128, n_rot=32,
        q_lora_rank=128, out_lora_rank=64, n_out_group=4,
        n_expert=16, n_expert_used=4, n_ff_exp=256, n_hash_layer=min(3, n_layer),
        n_swa=128, n_indexer_head=8, indexer_head_dim=64, indexer_top_k=512,
        compress_ratios=ds4_compress_ratios(n_layer), swiglu_clamp_exp=(10.0,) * n_layer,
        **_COMMON,
    )


def tiny_config(n_vocab: int, n_layer: int = 4) -> ModelConfig:
    return ModelConfig(
        n_layer=n_layer, context_length=4096, n_embd=256, n_vocab=n_vocab,
        n_head=4, head_dim=64, value_dim=64, n_rot=16,
        q_lora_rank=64, out_lora_rank=32, n_out_group=2,
        n_expert=8, n_expert_used=2, n_ff_exp=256, n_hash_layer=min(1, n_layer),
        n_swa=8, n_indexer_head=4, indexer_head_dim=32, indexer_top_k=4,
        compress_ratios=ds4_compress_ratios(n_layer, hca_ratio=16), swiglu_clamp_exp=(10.0,) * n_layer,
        **_COMMON,
    )


PRESETS = ("tiny", "small", "flash")

TINY_MERGES = 3000
"""The tiny vocabulary: 256 byte tokens, the first 3000 real merges, every special token."""
