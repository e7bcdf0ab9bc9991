"""The DS4 forward pass in numpy, following the reference CPU path (docs/model.md).

:class:`Reference` runs a batch of ``T >= 1`` consecutive tokens through the
model, layer by layer, updating a :class:`~ds4nb.reference.state.State`:

* decode is ``T = 1``;
* prefill is ``T = N``: the stateless parts (HC, norms, projections, FFN)
  run over all tokens at once, the stateful part (KV window, compressors,
  indexer, attention) runs token by token in order, exactly as in decode.

Every product is batch-invariant (see :mod:`ds4nb.reference.weights`), so a
prefill of N tokens leaves the same state, bit for bit, as N decodes.

Method names and the step numbers in their docstrings follow docs/model.md.
"""

from __future__ import annotations

import numpy as np

from ds4nb.model.config import ModelConfig
from ds4nb.model.loader import LayerWeights, Model, TensorInfo, Weights
from ds4nb.quants import quantize_q8_0
from ds4nb.reference import ops
from ds4nb.reference.ops import F32, HcSplit, Rope, indexer_weight_scale
from ds4nb.reference.state import CompressorState, LayerState, State
from ds4nb.reference.weights import Tensors, q8_k_round_trip


class Reference:
    """The numpy DS4 model: weights (memory-mapped) plus the forward pass."""

    def __init__(self, model: Model, *, expert_cache_bytes: int = 256 << 20):
        if not isinstance(model.weights, Weights):
            raise ValueError(f"{model.path.name} is a {model.kind} file, not a main DS4 model")
        self.model = model
        self.cfg: ModelConfig = model.config
        self.w: Weights = model.weights
        self.t = Tensors(expert_cache_bytes)
        cfg = self.cfg
        self.ropes: list[Rope] = [
            ops.make_rope(cfg.n_rot, compressed=cfg.compress_ratio(il) != 0, freq_base=cfg.rope_freq_base,
                          compress_freq_base=cfg.compress_rope_freq_base, scale_factor=cfg.rope_scale_factor,
                          orig_ctx=cfg.rope_orig_ctx, beta_fast=cfg.rope_yarn_beta_fast,
                          beta_slow=cfg.rope_yarn_beta_slow)
            for il in range(cfg.n_layer)
        ]
        self._check_shapes()

    def _check_shapes(self) -> None:
        cfg = self.cfg
        if cfg.n_embd % 256 or cfg.n_ff_exp % 256:
            raise ValueError("routed experts take Q8_K activations: n_embd and n_ff_exp must be multiples of 256")
        if any(cfg.layer_kind(il) == "csa" for il in range(cfg.n_layer)):
            d = cfg.indexer_head_dim
            if d & (d - 1) or d % 32 or cfg.n_rot > d:
                raise ValueError(f"indexer_head_dim {d} must be a power of two, a multiple of 32 and >= n_rot")

    def new_state(self) -> State:
        return State.empty(self.cfg)

    # =====================================================================
    # the whole model

    def forward(self, tokens: list[int], state: State) -> np.ndarray:
        """Run ``tokens`` (positions ``state.position ...``) and return the last token's logits.

        docs/model.md steps 1-21.  ``state`` is updated in place.
        """
        if not tokens:
            raise ValueError("forward needs at least one token")
        cfg = self.cfg
        for tok in tokens:
            if not 0 <= int(tok) < cfg.n_vocab:
                raise ValueError(f"token id {tok} is outside the vocabulary (0..{cfg.n_vocab - 1})")
        tokens = [int(t) for t in tokens]
        hc = self.embed(tokens)
        for il in range(cfg.n_layer):
            hc = self.attention_block(il, hc, state.position, state.layers[il])
            hc = self.ffn_block(il, hc, tokens)
        state.position += len(tokens)
        return self.logits(hc[-1])

    def embed(self, tokens: list[int]) -> np.ndarray:
        """docs/model.md step 1: F16 embedding rows copied into every HC stream -> ``(T, n_hc, n_embd)``."""
        rows = np.stack([self.t.embedding_row(self.w.token_embd, tok) for tok in tokens])
        return np.repeat(rows[:, None, :], self.cfg.n_hc, axis=1)

    # =====================================================================
    # hyper-connections

    def hc_pre(self, hc: np.ndarray, fn: TensorInfo, scale: TensorInfo,
               base: TensorInfo) -> tuple[np.ndarray, HcSplit]:
        """docs/model.md step 2: reduce the streams ``(T, n_hc, n_embd)`` to a sublayer input.

        The flattened streams are RMS-normalised (no weight), projected by the
        F16 ``fn`` to the control vector, split and Sinkhorn-normalised
        (step 3), and the streams are summed with the ``pre`` weights.
        """
        cfg = self.cfg
        flat = ops.rms_norm(hc.reshape(len(hc), cfg.hc_dim), None, cfg.rms_eps)
        mix = self.t.dense(fn).matmul(flat)
        split = ops.hc_split_sinkhorn(mix, self.t.vector(scale), self.t.vector(base),
                                      cfg.n_hc, cfg.hc_sinkhorn_iter, cfg.hc_eps)
        return ops.hc_weighted_sum(hc, split.pre), split

    # =====================================================================
    # attention sublayer (docs/model.md steps 2-14)

    def attention_block(self, il: int, hc: np.ndarray, pos0: int, ls: LayerState) -> np.ndarray:
        """docs/model.md steps 2-14 for tokens at positions ``pos0 ... pos0 + T - 1``."""
        cfg, lw = self.cfg, self.w.layers[il]
        x, split = self.hc_pre(hc, lw.hc_attn_fn, lw.hc_attn_scale, lw.hc_attn_base)
        x_norm = ops.rms_norm(x, self.t.vector(lw.attn_norm), cfg.rms_eps)       # step 4
        qr_norm, q = self.q_path(lw, x_norm)                                       # step 5
        kv = self.kv_path(lw, x_norm)                                              # step 6
        heads = np.stack([
            self.attend_one(il, lw, ls, q[t], kv[t], x_norm[t], qr_norm[t], pos0 + t)
            for t in range(len(hc))
        ])
        out = self.grouped_output(lw, heads)                                       # step 13
        return ops.hc_post(out, hc, split.post, split.comb)                        # step 14

    def q_path(self, lw: LayerWeights, x_norm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """docs/model.md step 5: low-rank q -> (qr_norm ``(T, q_lora_rank)``, q ``(T, n_head * head_dim)``)."""
        cfg = self.cfg
        qr = self.t.q8(lw.attn_q_a).matmul(x_norm)
        qr_norm = ops.rms_norm(qr, self.t.vector(lw.attn_q_a_norm), cfg.rms_eps)
        q = self.t.q8(lw.attn_q_b).matmul(qr_norm)
        return qr_norm, ops.head_rms_norm(q, cfg.n_head, cfg.head_dim, cfg.rms_eps)

    def kv_path(self, lw: LayerWeights, x_norm: np.ndarray) -> np.ndarray:
        """docs/model.md step 6: the single shared KV head ``(T, head_dim)``."""
        kv = self.t.q8(lw.attn_kv).matmul(x_norm)
        return ops.rms_norm(kv, self.t.vector(lw.attn_kv_a_norm), self.cfg.rms_eps)

    def attend_one(self, il: int, lw: LayerWeights, ls: LayerState, q: np.ndarray, kv: np.ndarray,
                   x_norm: np.ndarray, qr_norm: np.ndarray, pos: int) -> np.ndarray:
        """docs/model.md steps 7-12 for one token: cache updates, then attention.

        Returns the attention output heads ``(n_head * head_dim,)`` after the
        inverse RoPE.
        """
        cfg, rope = self.cfg, self.ropes[il]
        q = ops.apply_rope_tail(q.reshape(cfg.n_head, cfg.head_dim), rope, pos)       # step 7
        kv = ops.apply_rope_tail(kv, rope, pos)
        kv = ops.fp8_kv_round(kv, cfg.n_rot)                                           # step 8
        self.push_raw(ls, ops.f16_round(kv))

        rows, visible = ls.raw, None
        ratio = cfg.compress_ratio(il)
        if ratio:
            overlap = cfg.layer_kind(il) == "csa"
            comp = self.compressor_step(ls.attn_compressor, lw.attn_compressor_kv, lw.attn_compressor_gate,
                                        lw.attn_compressor_ape, lw.attn_compressor_norm, x_norm, pos,
                                        ratio, overlap, cfg.head_dim, rope, finish="fp8")    # step 9
            if comp is not None:
                ls.comp.append(comp)
            if overlap:
                icomp = self.compressor_step(ls.index_compressor, lw.indexer_compressor_kv,
                                             lw.indexer_compressor_gate, lw.indexer_compressor_ape,
                                             lw.indexer_compressor_norm, x_norm, pos, ratio, True,
                                             cfg.indexer_head_dim, rope, finish="qat")
                if icomp is not None:
                    ls.index_comp.append(icomp)
                comp_visible = self.indexer_visible(il, lw, ls, x_norm, qr_norm, pos)    # step 10
                if comp_visible is not None:
                    visible = np.concatenate([np.ones(len(ls.raw), bool), comp_visible])
            rows = np.concatenate([ls.raw, ls.comp.rows])
        heads = ops.attention_with_sinks(q, rows, self.t.vector(lw.attn_sinks), visible)   # step 11
        heads = ops.apply_rope_tail(heads, rope, pos, inverse=True)                     # step 12
        return heads.reshape(-1)

    def push_raw(self, ls: LayerState, kv: np.ndarray) -> None:
        """docs/model.md step 8: append a row to the sliding window, keeping the last ``n_swa``."""
        raw = np.concatenate([ls.raw, kv[None, :]])
        ls.raw = raw[-self.cfg.n_swa:]

    def compressor_step(self, st: CompressorState, wkv: TensorInfo, wgate: TensorInfo, ape: TensorInfo,
                        norm: TensorInfo, x_norm: np.ndarray, pos: int, ratio: int, overlap: bool,
                        head_dim: int, rope: Rope, finish: str) -> np.ndarray | None:
        """docs/model.md step 9: feed one token to a compressor; return a finished row or None.

        (a) project ``kv = Wkv x`` and ``score = Wgate x + ape[pos % ratio]``;
        (b) store them in the window slot of this position; (c) when
        ``pos + 1`` is a multiple of ``ratio``: pool the window
        (:func:`ops.compressor_pool`), RMSNorm with ``norm``, RoPE at the
        window's first position ``pos + 1 - ratio``, then the FP8 round trip
        (attention rows) or the Hadamard + FP4 round trip (indexer rows), and
        F16 storage; (d) slide the window.
        """
        r = pos % ratio
        kv = self.t.dense(wkv).matvec(x_norm)
        score = (self.t.dense(wgate).matmul64(x_norm) + self.t.vector(ape)[r].astype(np.float64)).astype(F32)
        slot = ratio + r if overlap else r
        st.kv[slot] = kv
        st.score[slot] = score
        if (pos + 1) % ratio:
            return None
        pooled = ops.compressor_pool(st.kv, st.score, head_dim, ratio, overlap)
        row = ops.rms_norm(pooled, self.t.vector(norm), self.cfg.rms_eps)
        row = ops.apply_rope_tail(row, rope, pos + 1 - ratio)
        row = ops.fp8_kv_round(row, self.cfg.n_rot) if finish == "fp8" else ops.indexer_qat(row)
        if overlap:  # the finished window becomes the "previous" half
            st.kv[:ratio] = st.kv[ratio:]
            st.score[:ratio] = st.score[ratio:]
        st.kv[ratio if overlap else 0:] = 0.0
        st.score[ratio if overlap else 0:] = ops.NEG_INF
        return ops.f16_round(row)

    def indexer_visible(self, il: int, lw: LayerWeights, ls: LayerState, x_norm: np.ndarray,
                        qr_norm: np.ndarray, pos: int) -> np.ndarray | None:
        """docs/model.md step 10: which compressed rows a CSA layer's token may attend to.

        ``None`` (all visible) while there are at most ``indexer_top_k`` rows;
        otherwise the indexer scores every row and keeps the top k.
        """
        cfg = self.cfg
        n_comp, top_k = ls.index_comp.n, cfg.indexer_top_k
        if n_comp != ls.comp.n:
            raise AssertionError("indexer and attention compressors are out of step")
        if n_comp <= top_k:
            return None
        n_ih, d = cfg.n_indexer_head, cfg.indexer_head_dim
        q = self.t.dense(lw.indexer_attn_q_b).matvec(qr_norm).reshape(n_ih, d)
        q = ops.indexer_qat(ops.apply_rope_tail(q, self.ropes[il], pos))
        w = self.t.dense(lw.indexer_proj).matvec(x_norm)
        scores = ops.indexer_scores(q, w, ls.index_comp.rows, indexer_weight_scale(d, n_ih))
        visible = np.zeros(n_comp, bool)
        visible[ops.top_k_stable(scores, top_k)] = True
        return visible

    def grouped_output(self, lw: LayerWeights, heads: np.ndarray) -> np.ndarray:
        """docs/model.md step 13: per-group low-rank projection, then back to ``n_embd``.

        Group ``g`` maps its heads' ``out_group_dim`` values through rows
        ``g*out_lora_rank ... (g+1)*out_lora_rank`` of ``attn_output_a``.
        """
        cfg = self.cfg
        gd, rank = cfg.out_group_dim, cfg.out_lora_rank
        a = self.t.q8(lw.attn_output_a)
        low = []
        for g in range(cfg.n_out_group):
            xq, xd = quantize_q8_0(heads[:, g * gd:(g + 1) * gd])
            low.append(a.matmul_quantized(xq, xd, g * rank, (g + 1) * rank))
        return self.t.q8(lw.attn_output_b).matmul(np.concatenate(low, axis=1))

    # =====================================================================
    # FFN sublayer (docs/model.md steps 15-19)

    def ffn_block(self, il: int, hc: np.ndarray, tokens: list[int]) -> np.ndarray:
        """docs/model.md steps 15-19."""
        cfg, lw = self.cfg, self.w.layers[il]
        x, split = self.hc_pre(hc, lw.hc_ffn_fn, lw.hc_ffn_scale, lw.hc_ffn_base)
        x_norm = ops.rms_norm(x, self.t.vector(lw.ffn_norm), cfg.rms_eps)           # step 15
        routed = np.stack([self.routed_moe(il, lw, x_norm[t], tokens[t]) for t in range(len(tokens))])
        shared = self.shared_expert(il, lw, x_norm)                                   # step 18
        return ops.hc_post(routed + shared, hc, split.post, split.comb)               # step 19

    def route(self, il: int, lw: LayerWeights, x_norm: np.ndarray, token: int) -> tuple[np.ndarray, np.ndarray]:
        """docs/model.md step 16: (selected expert ids, their weights) for one token."""
        cfg = self.cfg
        probs = ops.router_probs(self.t.dense(lw.ffn_gate_inp).matvec(x_norm))
        if cfg.is_hash_layer(il):
            selected = np.asarray(self.t.vector(lw.ffn_gate_tid2eid)[token], dtype=np.int64)
            if selected.min() < 0 or selected.max() >= cfg.n_expert:
                raise ValueError(f"layer {il}: hash table sends token {token} to expert outside 0..{cfg.n_expert - 1}")
        else:
            bias = None if lw.ffn_exp_probs_b is None else self.t.vector(lw.ffn_exp_probs_b)
            selected = ops.select_experts_topk(probs, bias, cfg.n_expert_used)
        weights = ops.route_weights(probs[selected], cfg.expert_weights_scale, cfg.expert_weights_norm)
        return selected, weights

    def routed_moe(self, il: int, lw: LayerWeights, x_norm: np.ndarray, token: int) -> np.ndarray:
        """docs/model.md step 17: the weighted sum of the selected experts for one token."""
        clamp = self.cfg.swiglu_clamp_exp[il]
        selected, weights = self.route(il, lw, x_norm, token)
        x8 = q8_k_round_trip(x_norm, np.float64)
        out = np.zeros(self.cfg.n_embd, np.float64)
        for e, w in zip(selected.tolist(), weights):
            gate = (self.t.expert(lw.ffn_gate_exps, e) @ x8).astype(F32)
            up = (self.t.expert(lw.ffn_up_exps, e) @ x8).astype(F32)
            mid = ops.swiglu_clamped(gate, up, clamp, weight=w)
            down = (self.t.expert(lw.ffn_down_exps, e) @ q8_k_round_trip(mid, np.float64)).astype(F32)
            out += down                                   # each slot rounded, the sum once
        return out.astype(F32)

    def shared_expert(self, il: int, lw: LayerWeights, x_norm: np.ndarray) -> np.ndarray:
        """docs/model.md step 18: the always-on Q8_0 SwiGLU expert ``(T, n_embd)``."""
        xq, xd = quantize_q8_0(x_norm)
        gate = self.t.q8(lw.ffn_gate_shexp).matmul_quantized(xq, xd)
        up = self.t.q8(lw.ffn_up_shexp).matmul_quantized(xq, xd)
        mid = ops.swiglu_clamped(gate, up, self.cfg.swiglu_clamp_exp[il])
        return self.t.q8(lw.ffn_down_shexp).matmul(mid)

    # =====================================================================
    # output head (docs/model.md steps 20-21)

    def collapse_hc(self, hc: np.ndarray) -> np.ndarray:
        """docs/model.md step 20: the final streams ``(n_hc, n_embd)`` -> one ``n_embd`` vector."""
        cfg, w = self.cfg, self.w
        flat = ops.rms_norm(hc.reshape(cfg.hc_dim), None, cfg.rms_eps)
        pre = self.t.dense(w.output_hc_fn).matvec(flat)
        scale = self.t.vector(w.output_hc_scale)[0]
        weights = ops.hc_head_weights(pre, scale, self.t.vector(w.output_hc_base), cfg.hc_eps)
        return ops.hc_weighted_sum(hc, weights)

    def logits(self, hc: np.ndarray) -> np.ndarray:
        """docs/model.md step 21: output RMSNorm and the Q8_0 vocabulary projection -> ``(n_vocab,)``."""
        x = ops.rms_norm(self.collapse_hc(hc), self.t.vector(self.w.output_norm), self.cfg.rms_eps)
        return self.t.q8(self.w.output).matmul(x[None, :])[0]

