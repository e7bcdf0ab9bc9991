"""The DS4 forward step on the GPU, written once as an ordered list of kernel launches.

:func:`build_step` walks docs/model.md top to bottom for a step of ``T``
tokens (decode: ``T = 1``; prefill: a chunk) and records every launch with
its grid and its arguments, views included, fixed once (``Launch``).  The
step never changes afterwards: per-token values (token ids, positions,
window rows, compressed-row counts, whether a compressor emits or the indexer
selects, the sampling parameters) are read by the kernels from the step input
buffer (``ds4nb.engine.step``), so the same launches run for every token,
eagerly or captured as a CUDA graph (``ds4nb.engine.graph``).

Stateless parts (HC, norms, projections, router, experts) run over all ``T``
tokens per launch; so do the window store, the compressors, the indexer and
attention (each token reads only the rows its step record counts: causal).

A decode step's kernels are latency-bound, so independent work runs
side by side (``Recorder.branch``, a parallel path of the graph): each
sublayer's Sinkhorn (``hc.comb``), with the compressors (projections and
pooling) beside the query path, or with the shared expert beside the router
and the routed experts, joined where their outputs are read (the ``SIDE``
lane); the window row's store beside the query's norm and projection (the
``KV`` lane); and the copies of the hash layers' host-mapped experts,
``tid2eid[token]``, from the step's start until their layer (the
``PREFETCH`` lane).  Kernels that follow a kernel on their stream launch
early (``Recorder(early=True)``).  A sampling decode step ends by leaving the
sampled id where the next step reads its token (``feed_token``: chained
decoding).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from numba import cuda

from ds4nb.cache.residency import SplitExperts, empty_packed
from ds4nb.dispatch.select import Q8Dispatch
from ds4nb.engine.step import StepInput, StepLayout
from ds4nb.errors import Ds4Error
from ds4nb.kernels import _launch as L
from ds4nb.kernels.activation import Q8_0Act, Q8KAct, alloc_q8_0, alloc_q8_K
from ds4nb.kernels.attention import alloc_attn_scratch
from ds4nb.kernels.compressor import CompressorProjection, CompressorStateDev, alloc_projection, alloc_state
from ds4nb.kernels.hc import HcPreOut, alloc_scratch as alloc_hc_scratch, post_ss_parts
from ds4nb.kernels.indexer import indexer_w_scale
from ds4nb.kernels.moe import count_experts
from ds4nb.kernels.moe_grouped import SlotGroups, alloc_slot_groups
from ds4nb.kernels.registry import DeviceInfo
from ds4nb.kernels.rope import rope_args
from ds4nb.kernels.router import RouteOut, hash_selection
from ds4nb.kernels.sample import alloc_scratch as alloc_sample_scratch
from ds4nb.kernels.step import NF, ROWS, SELECT, feed_token
from ds4nb.model import LayerWeights, ModelConfig, Weights
from ds4nb.plugins import get_registry
from ds4nb.quants.repack import PackedWeight
from ds4nb.reference import ops

#: tokens of a prefill step (the engine's ``chunk``): the largest of these whose scratch takes at most
#: ``CHUNK_MEMORY_SHARE`` of the GPU's memory (a step's launches do not grow with its tokens, so larger is faster)
CHUNK_SIZES = (1024, 512, 256, 128, 64)
CHUNK_MEMORY_SHARE = 0.02


def prefill_chunk(cfg: ModelConfig, ctx: int, device_bytes: int) -> int:
    """Tokens of a prefill step for a session of ``ctx`` tokens on a GPU of ``device_bytes``."""
    for chunk in CHUNK_SIZES:
        if Scratch.nbytes(cfg, chunk, ctx) <= CHUNK_MEMORY_SHARE * device_bytes:
            return max(1, min(chunk, ctx))
    return max(1, min(CHUNK_SIZES[-1], ctx))


#: Q8_0 strategy -> the (op, implementation) of its matmul for steps of several tokens; one token is always the
#: ``warp8`` matvec.  ``cublas`` multiplies F16 copies of the weights (:func:`f16_copies`); a weight without one
#: (beyond their byte budget, or host-mapped) goes through ``mmq``.
BATCHED_IMPLS = {"warp8": ("q8_0.matmul", "warp8_t8"), "mmq": ("q8_0.matmul", "mmq"), "cublas": ("f16.gemm", "cublas")}


class Kernels:
    """The launchers a step uses, selected once from the registry (Q8_0 matmuls per the dispatcher's choice)."""

    def __init__(self, device: DeviceInfo, dispatch: Q8Dispatch, expert_types: set) -> None:
        reg = get_registry()

        def pick(op: str) -> Callable[..., Any]:
            return reg.select(op, device=device).fn

        self.dispatch = dispatch
        self.q8_matvec = reg.get("q8_0.matvec", "warp8").fn
        used = dispatch.strategies()
        if "cublas" in used:                   # F16 GEMMs, and mmq for the weights without an F16 copy
            self.to_f16 = pick("vec.to_f16")
            self.f16_gemm = reg.get(*BATCHED_IMPLS["cublas"]).fn
            used = (used - {"cublas"}) | {"mmq"}
        self.q8_matmuls = {s: reg.get(*BATCHED_IMPLS[s]).fn for s in used}     # Q8_0 x Q8_0 matmuls
        self.q8_grouped_matvec = pick("q8_0.grouped_matvec")
        self.quant_q8_0 = pick("act.quantize_q8_0")
        self.quant_q8_K = pick("act.quantize_q8_K")
        self.rms = pick("norm.rms")
        self.embed = pick("embed.gather")
        self.expand = pick("hc.expand")
        self.hc_pre = pick("hc.pre")
        self.hc_comb = pick("hc.comb")
        self.hc_post = pick("hc.post")
        self.hc_head = pick("hc.head")
        self.q_norm_rope = pick("attn.q_norm_rope")
        self.kv_store = pick("attn.kv_store")
        self.attention = pick("attn.decode")
        self.comp_project = pick("compressor.project")
        self.comp_step = pick("compressor.step")
        self.comp_chunk = pick("compressor.chunk")
        self.f16_matvec = pick("f16.matvec")
        self.index_q_prep = pick("indexer.q_prep")
        self.index_scores = pick("indexer.scores")
        self.topk = pick("topk.select")
        self.router_select = pick("router.select")
        self.router_hash = pick("router.hash")
        self.swiglu = pick("ffn.swiglu")
        self.swap01 = pick("copy.swap01")
        self.slot_sum = pick("moe.slot_sum")
        self.split_ids = pick("moe.split_ids")
        self.stage_experts = pick("moe.stage_experts")
        self.hash_selection = hash_selection
        self.count_experts = count_experts
        self.sample = pick("sample.draw")
        self.feed_token = feed_token
        self.moe = {q: (pick(f"{q.name.lower()}.moe_gate_up"), pick(f"{q.name.lower()}.moe_down_sum"),
                        pick(f"{q.name.lower()}.moe_matvec")) for q in expert_types}
        self.group_slots = pick("moe.group_slots")
        self.moe_gate_up_grouped = {q: pick(f"{q.name.lower()}.moe_gate_up_grouped") for q in expert_types}
        self.moe_matvec_grouped = {q: pick(f"{q.name.lower()}.moe_matvec_grouped") for q in expert_types}


def _empty(n: int, dtype: Any = np.float32) -> Any:
    return cuda.device_array(max(n, 1), dtype=np.dtype(dtype))


def _q8_0_rows(a: Q8_0Act, nb: int, start: int, stop: int) -> Q8_0Act:
    """Rows ``[start, stop)`` of a flat Q8_0 activation (each row: 4 * nb words, nb scales)."""
    return Q8_0Act(a.qs[start * 4 * nb:stop * 4 * nb], a.d[start * nb:stop * nb])


def _q8_K_rows(a: Q8KAct, nb: int, start: int, stop: int) -> Q8KAct:
    return Q8KAct(a.qs[start * 32 * nb:stop * 32 * nb], a.d[start * nb:stop * nb],
                  a.bsums[start * 8 * nb:stop * 8 * nb])


def packed_rows(w: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Rows ``[start, stop)`` of a 2-D block-minor weight (each row's fields are contiguous)."""
    nb = w.n_blocks
    wq = w.qs.size // (w.n_rows * nb)
    wd = w.dm.size // (w.n_rows * nb)
    sc = None if w.sc is None else w.sc[start * (w.sc.size // w.n_rows):stop * (w.sc.size // w.n_rows)]
    return PackedWeight(w.qtype, (stop - start, w.n_cols), w.qs[start * wq * nb:stop * wq * nb], sc,
                        w.dm[start * wd * nb:stop * wd * nb])


# ---------------------------------------------------------------------------
# Device state and scratch
# ---------------------------------------------------------------------------


@dataclass
class LayerStateDev:
    """One layer's session state on the device (docs/model.md, "Session state"), allocated once."""

    raw: Any                                            # (ring, head_dim) window ring: row pos % ring
    comp: Any = None                                    # (max_rows, head_dim) compressed rows
    attn_compressor: CompressorStateDev | None = None
    index_comp: Any = None                              # (max_rows, indexer_head_dim)
    index_compressor: CompressorStateDev | None = None


def max_comp_rows(cfg: ModelConfig, il: int, ctx: int) -> int:
    """Compressed rows layer ``il`` can hold for ``ctx`` tokens."""
    ratio = cfg.compress_ratio(il)
    return 0 if ratio == 0 else ctx // ratio + 1


def alloc_layer_states(cfg: ModelConfig, ctx: int, ring: int) -> list[LayerStateDev]:
    states = []
    for il in range(cfg.n_layer):
        ls = LayerStateDev(raw=cuda.device_array((ring, cfg.head_dim), np.float32))
        ratio = cfg.compress_ratio(il)
        if ratio:
            csa = cfg.layer_kind(il) == "csa"
            n = max_comp_rows(cfg, il, ctx)
            ls.comp = cuda.device_array((n, cfg.head_dim), np.float32)
            ls.attn_compressor = alloc_state(ratio, cfg.head_dim, csa)
            if csa:
                ls.index_comp = cuda.device_array((n, cfg.indexer_head_dim), np.float32)
                ls.index_compressor = alloc_state(ratio, cfg.indexer_head_dim, True)
        states.append(ls)
    return states


def state_bytes(cfg: ModelConfig, ctx: int, ring: int | None = None) -> int:
    """Device bytes of the session state for ``ctx`` tokens (this engine's KV cache; window ring of ``ring``
    rows, default ``n_swa``)."""
    total = 0
    for il in range(cfg.n_layer):
        total += (ring or cfg.n_swa) * cfg.head_dim * 4
        n = max_comp_rows(cfg, il, ctx)
        if n:
            ratio = cfg.compress_ratio(il)
            csa = cfg.layer_kind(il) == "csa"
            total += n * cfg.head_dim * 4 + 2 * (2 if csa else 1) * ratio * cfg.compressor_width(il) * 4
            if csa:
                total += n * cfg.indexer_head_dim * 4 + 2 * 2 * ratio * 2 * cfg.indexer_head_dim * 4
    return total


def session_bytes(cfg: ModelConfig, ctx: int, chunk: int) -> int:
    """Device bytes an engine keeps besides the weights: session state for ``ctx`` tokens and the scratch of
    ``chunk``-token steps (what a placement must leave free)."""
    return state_bytes(cfg, ctx, StepLayout.from_config(cfg, chunk).ring) + Scratch.nbytes(cfg, chunk, ctx)


StageKey = tuple[str, Any, int, int]       # (role, type, rows, cols) of a staging copy


def expert_stage_groups(lw: LayerWeights) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """A layer's routed-expert tensors as a decode step stages them: (gate, up) together (one kernel reads
    both), down alone; each with its role."""
    return ((("gate", lw.ffn_gate_exps), ("up", lw.ffn_up_exps)), (("down", lw.ffn_down_exps),))


def stage_key(role: str, info: Any) -> StageKey:
    """The staging copy of the routed-expert tensor ``info`` in role ``role``: its buffer's key."""
    return (role, info.qtype, *info.shape[1:])


@dataclass(frozen=True)
class StagePlan:
    """The staging copies a decode step needs for the routed-expert tensors ``plan`` leaves host-mapped in whole
    or part (``gate`` and ``up`` go together: one is staged, both are).

    ``inline``: the copies the layers make when their router has chosen (one
    set of buffers, reused layer after layer); ``prefetched``: per hash layer,
    the copies the step makes as it starts, on the ``PREFETCH`` branch (the
    experts are ``tid2eid[token]``), each layer with buffers of its own.
    """

    inline: frozenset[StageKey] = frozenset()
    prefetched: tuple[tuple[int, frozenset[StageKey]], ...] = ()

    @classmethod
    def of(cls, cfg: ModelConfig, weights: Weights, plan: Any) -> StagePlan:
        inline: set[StageKey] = set()
        prefetched: dict[int, set[StageKey]] = {}
        for il, lw in enumerate(weights.layers):
            for role_infos in expert_stage_groups(lw):
                if any(plan.where(info.name) != "device" for _, info in role_infos):
                    keys = {stage_key(role, info) for role, info in role_infos}
                    if cfg.is_hash_layer(il) and lw.ffn_gate_tid2eid is not None:
                        prefetched.setdefault(il, set()).update(keys)
                    else:
                        inline |= keys
        return cls(frozenset(inline), tuple((il, frozenset(k)) for il, k in sorted(prefetched.items())))


class Scratch:
    """Activation buffers for steps of up to ``chunk`` tokens (a step of T tokens uses the first T rows)."""

    def __init__(self, cfg: ModelConfig, chunk: int, ctx: int, *, f16: bool = False,
                 staged: StagePlan = StagePlan()) -> None:
        c = chunk
        e, hc = cfg.n_embd, cfg.n_hc
        self.x_emb = _empty(c * e)
        self.hc_a = _empty(c * hc * e)
        self.hc_b = _empty(c * hc * e)
        self.pre = HcPreOut(_empty(c * e), _empty(c * hc), _empty(c * hc * hc), _empty(c * e),
                            _empty(c * cfg.hc_mix_dim))
        self.hc_scratch = alloc_hc_scratch(c, cfg.hc_dim, cfg.hc_mix_dim)
        self.head_scratch = alloc_hc_scratch(1, cfg.hc_dim, cfg.n_hc)
        k_max = max(e, cfg.q_lora_rank, cfg.q_dim, cfg.out_low_dim, cfg.n_ff_exp)
        self.act = alloc_q8_0(c * max(1, cfg.n_out_group), k_max)
        self.x16 = cuda.device_array(c * max(k_max, cfg.q_dim), np.float16) if f16 else None   # cublas inputs
        self.qr = _empty(c * cfg.q_lora_rank)
        self.qr_norm = _empty(c * cfg.q_lora_rank)
        self.q = _empty(c * cfg.q_dim)
        self.kv = _empty(c * cfg.head_dim)
        self.heads = _empty(c * cfg.q_dim)
        self.heads_g = _empty(c * cfg.q_dim)
        self.low = _empty(c * cfg.out_low_dim)
        self.low_t = _empty(c * cfg.out_low_dim)
        self.y = _empty(c * e)
        self.attn_scratch = alloc_attn_scratch(cfg.n_head, cfg.head_dim, tokens=c)
        widths = [cfg.compressor_width(il) for il in range(cfg.n_layer) if cfg.compress_ratio(il)]
        self.comp_proj = alloc_projection(c, max(widths, default=1))
        self.index_proj = alloc_projection(c, 2 * cfg.indexer_head_dim)
        self.iq = _empty(c * cfg.indexer_q_dim)
        self.iq_prep = _empty(c * cfg.indexer_q_dim)
        self.iw = _empty(c * cfg.n_indexer_head)
        csa_rows = [max_comp_rows(cfg, il, ctx) for il in range(cfg.n_layer) if cfg.layer_kind(il) == "csa"]
        self.scores = _empty(c * max(csa_rows, default=1))             # (T, rows) indexer scores
        self.sel = _empty(c * max(cfg.indexer_top_k, 1), np.int32)     # (T, top_k) indexer selections
        self.router_logits = _empty(c * cfg.n_expert)
        # (device, mapped) expert indices of the selected slots, for gate/up and for down (split placements)
        self.split_ids = tuple((_empty(c * cfg.n_expert_used, np.int32), _empty(c * cfg.n_expert_used, np.int32))
                               for _ in range(2))
        # a decode step's selected experts of a host-mapped routed-expert tensor, copied to GPU memory, by
        # (role, type, rows, cols) (see StagePlan); slot s of a copy holds slot s's expert
        def copies(keys: frozenset[StageKey]) -> dict[StageKey, PackedWeight]:
            return {key: empty_packed(key[1], (cfg.n_expert_used, key[2], key[3])) for key in keys}

        self.stage = copies(staged.inline)
        # the hash layers' copies made as the step starts: per layer, the copies and the experts (tid2eid[token])
        self.prefetch = {il: (copies(keys), _empty(cfg.n_expert_used, np.int32)) for il, keys in staged.prefetched}
        self.slot_ids = cuda.to_device(np.arange(cfg.n_expert_used, dtype=np.int32))
        self.route = RouteOut(cuda.device_array((c, cfg.n_expert_used), np.int32),
                              cuda.device_array((c, cfg.n_expert_used), np.float32))
        n_slot = c * cfg.n_expert_used
        # a prefill step's slots by expert, with room to stage their activations (moe_mma's tiles)
        self.slot_groups = alloc_slot_groups(n_slot, cfg.n_expert, k=max(e, cfg.n_ff_exp))
        self.x_slots = _empty(n_slot * e)
        self.act_k = alloc_q8_K(n_slot, max(e, cfg.n_ff_exp))
        self.mid = _empty(n_slot * cfg.n_ff_exp)
        self.slot_out = _empty(n_slot * e)
        self.routed = _empty(c * e)
        self.sh_gate = _empty(c * cfg.n_ff_exp)
        self.sh_up = _empty(c * cfg.n_ff_exp)
        self.shared = _empty(c * e)
        self.x_out = _empty(e)
        self.logits = _empty(cfg.n_vocab)
        self.sampled = _empty(2, np.int32)
        self.sample_scratch = alloc_sample_scratch(cfg.n_vocab)

    @staticmethod
    def nbytes(cfg: ModelConfig, chunk: int, ctx: int) -> int:
        """An upper bound of the bytes ``Scratch(cfg, chunk, ctx)`` allocates (for placement budgets)."""
        c = chunk
        per_tok = 4 * (cfg.n_hc * cfg.n_embd * 3 + cfg.q_dim * 3 + cfg.n_expert_used * (cfg.n_ff_exp + cfg.n_embd) * 2
                       + cfg.hc_mix_dim)
        per_tok += cfg.n_expert_used * max(cfg.n_embd, cfg.n_ff_exp) * 2      # Q8_K slot rows, staged copies
        per_tok += 8 * cfg.n_head * cfg.head_dim + 4 * (ctx + cfg.indexer_top_k)    # attention partials, indexer
        # staged experts: gate, up and down of the selected experts, at most 4.5 bits a weight (Q4_K), once for
        # the layers that stage in line and once per hash layer (prefetched)
        stage = (1 + cfg.n_hash_layer) * 3 * cfg.n_expert_used * cfg.n_ff_exp * cfg.n_embd * 9 // 16
        return c * per_tok + cfg.n_vocab * 4 + ctx + stage + (256 << 20)


#: the Q8_0 weights of a layer that steps multiply as matmuls (what the cublas strategy copies to F16)
Q8_MATMUL_WEIGHTS = ("attn_q_a", "attn_kv", "attn_q_b", "attn_output_a", "attn_output_b", "ffn_gate_shexp",
                     "ffn_up_shexp", "ffn_down_shexp")


def f16_copies(weights: Weights, res: Any, budget: int, stream: Any = 0) -> dict[str, Any]:
    """F16 copies of the layers' Q8_0 matmul weights for the ``cublas`` strategy, layer by layer while they fit
    ``budget`` bytes (the rest stay Q8_0 and go through ``mmq``); host-mapped weights are not copied."""
    from ds4nb.kernels.cublas import dequantize_q8_0_f16, f16_bytes

    out: dict[str, Any] = {}
    for lw in weights.layers:
        for attr in Q8_MATMUL_WEIGHTS:
            info = getattr(lw, attr)
            if res.plan.where(info.name) != "device":
                continue
            w = res[info.name]
            need = f16_bytes(w)
            if need > budget:
                return out
            budget -= need
            out[info.name] = dequantize_q8_0_f16(w, out=cuda.device_array(w.n_rows * w.n_cols, np.float16,
                                                                           stream=stream), stream=stream)
    return out


# ---------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepContext:
    """Everything a step is built from: the model, its placed weights, state, scratch and inputs."""

    cfg: ModelConfig
    weights: Weights
    res: Any                      # ds4nb.cache.residency.Residency: tensor name -> device arrays
    kernels: Kernels
    layout: StepLayout
    states: list[LayerStateDev]
    scratch: Scratch
    inputs: StepInput
    ctx: int
    expert_counts: Any = None     # device int32 (n_layer, n_expert): routing counts for ds4nb profile, or None
    f16: dict = field(default_factory=dict)   # Q8_0 weight name -> its F16 copy (the cublas strategy)


@dataclass
class MatIn:
    """A float32 activation (rows, n) entering Q8_0 matmuls, with the forms the strategies read, each made once
    when first needed (in the step's launch order): Q8_0 blocks (``warp8``, ``mmq``), F16 (``cublas``)."""

    x: Any
    rows: int
    n: int
    q8: Q8_0Act | None = None
    f16: Any = None


class _Recording:
    """The kernels with ``stream`` bound to a recorder, and the op family each launch is filed under."""

    def __init__(self, kernels: Kernels, rec: L.Recorder) -> None:
        self._k = kernels
        self._rec = rec

    def family(self, name: str) -> None:
        self._rec.family = name

    def family_name(self) -> str:
        return self._rec.family

    def branch(self, lane: str = L.SIDE) -> Any:
        """``with k.branch():`` the launches inside run on the stream of branch ``lane`` (``Recorder.branch``)."""
        return self._rec.branch(lane)

    def join(self, lane: str = L.SIDE) -> None:
        """The main stream waits for branch ``lane``."""
        self._rec.join(lane)

    def __getattr__(self, op: str) -> Any:
        fn = getattr(self._k, op)
        if isinstance(fn, dict):
            return {q: functools.partial(f, stream=self._rec) if callable(f)
                    else tuple(functools.partial(g, stream=self._rec) for g in f) for q, f in fn.items()}
        return functools.partial(fn, stream=self._rec)


def build_step(sc: StepContext, n_tok: int, *, sample: bool, early: bool = False) -> list[L.Launch]:
    """The launches of one forward step of ``n_tok`` tokens (see the module docstring).

    ``sample``: end with the device sampler (the decode step), which writes
    ``(token, status)`` to ``scratch.sampled``; ``early``: kernels that follow
    a kernel launch early (``Recorder``, programmatic dependent launch).
    """
    rec = L.Recorder(early=early)
    _Builder(sc, n_tok, _Recording(sc.kernels, rec)).forward(sample)
    return rec.launches


class _Builder:
    def __init__(self, sc: StepContext, n_tok: int, k: _Recording) -> None:
        self.sc, self.T, self.k = sc, n_tok, k
        self.cfg, self.res, self.s = sc.cfg, sc.res, sc.scratch
        self.ropes = [rope_args(ops.make_rope(
            self.cfg.n_rot, compressed=self.cfg.compress_ratio(il) != 0, freq_base=self.cfg.rope_freq_base,
            compress_freq_base=self.cfg.compress_rope_freq_base, scale_factor=self.cfg.rope_scale_factor,
            orig_ctx=self.cfg.rope_orig_ctx, beta_fast=self.cfg.rope_yarn_beta_fast,
            beta_slow=self.cfg.rope_yarn_beta_slow)) for il in range(self.cfg.n_layer)]

    def w(self, info: Any) -> Any:
        return self.res[info.name]

    # -- the model ------------------------------------------------------

    def forward(self, sample: bool) -> None:
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        e, nhc = cfg.n_embd, cfg.n_hc
        w = self.sc.weights
        k.family("embed")
        ids = self.sc.inputs.ids[:T]
        k.embed(self.w(w.token_embd), ids, e, out=s.x_emb[:T * e])                  # step 1
        hc, hc_next = s.hc_a[:T * nhc * e], s.hc_b[:T * nhc * e]
        k.expand(s.x_emb[:T * e].reshape(T, e), out=hc, n_hc=nhc)
        self.prefetch_after(-1)                                 # the first hash layer's host-mapped experts
        for il, lw in enumerate(w.layers):
            self.attention_block(il, lw, hc, hc_next)                                # steps 2-14
            hc, hc_next = hc_next, hc
            self.ffn_block(il, lw, hc, hc_next, ids)                                 # steps 15-19
            hc, hc_next = hc_next, hc
        k.family("head")                                                             # steps 20-21, last token
        last = hc[(T - 1) * nhc * e:T * nhc * e]
        k.hc_head(last, self.w(w.output_hc_fn), self.w(w.output_hc_scale), self.w(w.output_hc_base), out=s.x_out,
                  n_hc=nhc, hc_eps=cfg.hc_eps, rms_eps=cfg.rms_eps, scratch=s.head_scratch)
        x_out = self.rms_q8_0(s.x_out, self.w(w.output_norm), 1, e, out=s.x_out)
        k.q8_matvec(self.w(w.output), x_out.q8, out=s.logits)                         # one token: warp8
        if sample:
            k.family("sample")
            k.sample(s.logits, out=s.sampled, sp=self.sc.inputs.sp, scratch=s.sample_scratch)
            k.feed_token(s.sampled, self.sc.inputs.ids)          # a chained next step decodes it

    # -- attention sublayer (steps 2-14) --------------------------------

    def attention_block(self, il: int, lw: LayerWeights, hc: Any, hc_out: Any) -> None:
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        e, rank, qd, hd = cfg.n_embd, cfg.q_lora_rank, cfg.q_dim, cfg.head_dim
        k.family("hc")
        pre = self.hc_pre(hc, lw.hc_attn_fn, lw.hc_attn_scale, lw.hc_attn_base, lw.attn_norm,    # steps 2-4
                          q8_0=True, after_post=il > 0)
        with self.concurrent(L.COMB):                                             # beside steps 5-13:
            self.hc_comb(pre, lw.hc_attn_scale, lw.hc_attn_base)                  # step 3's Sinkhorn
        with self.concurrent():                                                   # beside steps 5-8:
            self.compressor(il, lw, pre.x_norm, indexer=False)                    # step 9 (attention rows)
        with self.concurrent(L.INDEX):
            self.compressor(il, lw, pre.x_norm, indexer=True)                     # step 9 (the indexer's)
        k.family("attn_proj")
        x = MatIn(pre.x_norm, T, e, pre.x_q8_0)                                   # step 5
        qr, qr_norm, q, kv = s.qr[:T * rank], s.qr_norm[:T * rank], s.q[:T * qd], s.kv[:T * hd]
        self.q8_pair(lw.attn_q_a, lw.attn_kv, x, qr, kv)                           # step 6 (same activation)
        with self.concurrent(L.KV):                                               # beside the query's
            k.family("attention")                                                 # norm, projection, RoPE
            ls = self.sc.states[il]
            k.kv_store(kv, self.w(lw.attn_kv_a_norm), out=ls.raw, rope=self.ropes[il], eps=cfg.rms_eps,
                       steps=self.sc.inputs.steps)                                # step 8: the window row
        k.family("attn_proj")
        self.q8(lw.attn_q_b, self.rms_q8_0(qr, self.w(lw.attn_q_a_norm), T, rank, out=qr_norm), q)
        k.family("attention")
        k.q_norm_rope(q, out=q, n_head=cfg.n_head, head_dim=hd, eps=cfg.rms_eps, rope=self.ropes[il],
                      steps=self.sc.inputs.steps)                                 # steps 5.4, 7 (q)
        self.indexer_project(il, lw, pre.x_norm, qr_norm)
        heads = s.heads[:T * qd]
        heads_q8 = _q8_0_rows(s.act, cfg.out_group_dim // 32, 0, cfg.n_out_group) if T == 1 else None
        self.attend(il, lw, q, heads, heads_q8)                                   # steps 10-12
        k.family("attn_proj")
        y = self.grouped_output(il, lw, heads, heads_q8)                          # step 13
        k.family("hc")
        k.join(L.COMB)                                                            # comb
        self.hc_post(y, hc, pre, hc_out)                                          # step 14

    def compressor(self, il: int, lw: LayerWeights, x_norm: Any, *, indexer: bool) -> None:
        """Step 9 for the step's tokens, for the attention's compressor or (``indexer``, CSA layers) the
        indexer's: its projections, then it stores them and emits the rows the step's windows close (one
        token, or every window a prefill step closes at once, leaving the state token-by-token steps would)."""
        ratio = self.cfg.compress_ratio(il)
        csa = self.cfg.layer_kind(il) == "csa"
        if not ratio or (indexer and not csa):
            return
        k, s, ls, T = self.k, self.s, self.sc.states[il], self.T
        k.family("compressor")
        if indexer:
            proj, width, kv, gate = s.index_proj, 2 * self.cfg.indexer_head_dim, lw.indexer_compressor_kv, \
                lw.indexer_compressor_gate
        else:
            proj, width, kv, gate = s.comp_proj, self.cfg.compressor_width(il), lw.attn_compressor_kv, \
                lw.attn_compressor_gate
        proj = CompressorProjection(proj.kv[:T * width], proj.score[:T * width])
        k.comp_project(x_norm, self.w(kv), self.w(gate), out=proj)
        comp = k.comp_step if T == 1 else k.comp_chunk
        k_comp = dict(ratio=ratio, rope=self.ropes[il], eps=self.cfg.rms_eps, steps=self.sc.inputs.steps,
                      grp=self.sc.layout.field(il))
        arg = 0 if T == 1 else T
        if indexer:
            comp(proj, arg, self.w(lw.indexer_compressor_ape), self.w(lw.indexer_compressor_norm),
                 out=ls.index_comp, state=ls.index_compressor, overlap=True, finish="qat", **k_comp)
        else:
            comp(proj, arg, self.w(lw.attn_compressor_ape), self.w(lw.attn_compressor_norm), out=ls.comp,
                 state=ls.attn_compressor, overlap=csa, finish="fp8", **k_comp)

    def indexer_project(self, il: int, lw: LayerWeights, x_norm: Any, qr_norm: Any) -> None:
        """Step 10's projections for the step's tokens, skipped on the device while the indexer does not select.

        The indexer starts selecting at some token and never stops, so the
        step's last record says whether any token of the step needs them.
        """
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        if not self.indexer_selects(il):
            return
        k.family("indexer")
        steps, sel = self.sc.inputs.steps, self.sc.layout.field(il) + SELECT
        gate = (steps, (T - 1) * NF + sel)
        k.f16_matvec(self.w(lw.indexer_attn_q_b), qr_norm, out=s.iq[:T * cfg.indexer_q_dim], gate=gate)
        k.index_q_prep(s.iq[:T * cfg.indexer_q_dim], out=s.iq_prep[:T * cfg.indexer_q_dim], n_head=cfg.n_indexer_head,
                       head_dim=cfg.indexer_head_dim, rope=self.ropes[il], steps=steps, gate_field=sel)
        k.f16_matvec(self.w(lw.indexer_proj), x_norm, out=s.iw[:T * cfg.n_indexer_head], gate=gate)

    def attend(self, il: int, lw: LayerWeights, q: Any, out: Any, out_q8: Q8_0Act | None = None) -> None:
        """Steps 10-12 for the step's tokens, once the window rows (step 8) and the compressed rows (step 9)
        are stored: the indexer and attention run once for all ``T`` queries, each reading only the rows its
        own step record counts: causal, as token-by-token steps would be (the ring has room for the window and
        all ``T`` tokens' rows).  ``out_q8``: the heads' Q8_0 blocks too, by output group (one token)."""
        cfg, k, ls = self.cfg, self.k, self.sc.states[il]
        steps, grp = self.sc.inputs.steps, self.sc.layout.field(il)
        rope = self.ropes[il]
        k.join()                                                                  # the compressors
        k.join(L.INDEX)
        k.join(L.KV)                                                              # the window row
        sel = None
        if self.indexer_selects(il):
            k.family("indexer")                                                   # step 10
            sel = self.indexer_select(il, ls)
        k.family("attention")                                                     # steps 11-12
        k.attention(q, ls.raw, ls.comp, self.w(lw.attn_sinks), sel, out=out, steps=steps, grp=grp,
                    max_rows=cfg.n_swa + self.max_visible(il), rope=rope, scratch=self.s.attn_scratch,
                    q8_0=out_q8, q8_0_row=cfg.out_group_dim)

    def max_visible(self, il: int) -> int:
        """Most compressed rows one token of layer ``il`` attends to (the indexer's k caps CSA layers)."""
        ls = self.sc.states[il]
        if ls.comp is None:
            return 0
        n = ls.comp.shape[0]
        return min(n, self.cfg.indexer_top_k) if self.cfg.layer_kind(il) == "csa" else n

    def indexer_selects(self, il: int) -> bool:
        """Whether layer ``il``'s indexer can select in this session (it needs more than top-k rows)."""
        ls = self.sc.states[il]
        return ls.index_comp is not None and ls.index_comp.shape[0] > self.cfg.indexer_top_k

    def indexer_select(self, il: int, ls: LayerStateDev) -> Any:
        """Each token's top-k compressed rows (T, k), scored over the rows its record counts."""
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        steps, grp = self.sc.inputs.steps, self.sc.layout.field(il)
        n_ih, d, top = cfg.n_indexer_head, cfg.indexer_head_dim, cfg.indexer_top_k
        n_rows = ls.index_comp.shape[0]
        scores = s.scores[:T * n_rows]
        k.index_scores(s.iq_prep[:T * n_ih * d], s.iw[:T * n_ih], ls.index_comp, out=scores,
                       w_scale=indexer_w_scale(d, n_ih), steps=steps, grp=grp, max_rows=n_rows, n_tok=T)
        sel = s.sel[:T * top]
        k.topk(scores, n_rows, top, out=sel, n_from=(steps, grp + ROWS), k_from=(steps, grp + SELECT), n_rows=T)
        return sel

    def grouped_output(self, il: int, lw: LayerWeights, heads: Any, heads_q8: Q8_0Act | None) -> Any:
        """Step 13: the grouped low-rank output projection (one token: ``heads_q8``, the heads' Q8_0 by group)."""
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        G, gd, rank = cfg.n_out_group, cfg.out_group_dim, cfg.out_lora_rank
        low = s.low[:T * G * rank]
        out_a = self.w(lw.attn_output_a)
        if T == 1:
            k.q8_grouped_matvec(out_a, heads_q8, out=low)                         # group g is "row" g
        else:
            by_group = s.heads_g[:T * G * gd]
            k.swap01(heads, T, G, gd, out=by_group)                               # (T, G, gd) -> (G, T, gd)
            x = MatIn(by_group, G * T, gd)
            low_g = s.low_t[:T * G * rank]
            for g in range(G):                                                    # group g: rows g*rank.. of
                self.q8(lw.attn_output_a, x, low_g[g * T * rank:(g + 1) * T * rank],   # out_a x its T rows
                        rows=(g * rank, (g + 1) * rank), x_rows=(g * T, (g + 1) * T))
            k.swap01(low_g, G, T, rank, out=low)                                  # (G, T, rank) -> (T, G, rank)
        y = s.y[:T * cfg.n_embd]
        self.q8(lw.attn_output_b, MatIn(low, T, G * rank), y)
        return y

    # -- FFN sublayer (steps 15-19) -------------------------------------

    def ffn_block(self, il: int, lw: LayerWeights, hc: Any, hc_out: Any, ids: Any) -> None:
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        e, n_used, ff = cfg.n_embd, cfg.n_expert_used, cfg.n_ff_exp
        k.family("hc")
        pre = self.hc_pre(hc, lw.hc_ffn_fn, lw.hc_ffn_scale, lw.hc_ffn_base, lw.ffn_norm,        # step 15
                          q8_0=True, q8_K=True, after_post=True)
        x_norm = pre.x_norm
        shared = s.shared[:T * e]
        with self.concurrent(L.COMB):                                             # beside steps 16-18:
            self.hc_comb(pre, lw.hc_ffn_scale, lw.hc_ffn_base)                    # step 15's Sinkhorn
        with self.concurrent():                                                   # beside steps 16-17:
            k.family("shared_expert")                                             # step 18
            g, u = s.sh_gate[:T * ff], s.sh_up[:T * ff]
            self.q8_pair(lw.ffn_gate_shexp, lw.ffn_up_shexp, MatIn(x_norm, T, e, pre.x_q8_0), g, u)
            k.swiglu(g, u, cfg.swiglu_clamp_exp[il], out=g)
            self.q8(lw.ffn_down_shexp, MatIn(g, T, ff), shared)
        k.family("router")
        logits = s.router_logits[:T * cfg.n_expert]                               # step 16
        k.f16_matvec(self.w(lw.ffn_gate_inp), x_norm, out=logits)
        route = RouteOut(s.route.selected[:T], s.route.weights[:T])
        if cfg.is_hash_layer(il):
            k.router_hash(logits.reshape(T, cfg.n_expert), self.w(lw.ffn_gate_tid2eid), ids, out=route, k=n_used,
                          scale=cfg.expert_weights_scale, normalise=cfg.expert_weights_norm)
        else:
            bias = None if lw.ffn_exp_probs_b is None else self.w(lw.ffn_exp_probs_b)
            k.router_select(logits.reshape(T, cfg.n_expert), bias, out=route, k=n_used,
                            scale=cfg.expert_weights_scale, normalise=cfg.expert_weights_norm)
        sel_flat = route.selected.reshape(T * n_used)
        if self.sc.expert_counts is not None:                                     # ds4nb profile
            k.count_experts(sel_flat, out=self.sc.expert_counts[il])
        k.family("routed_experts")                                                # step 17
        routed = self.routed_experts(il, lw, x_norm, sel_flat, route.weights.reshape(T * n_used), pre.x_q8_K)
        k.join()                                                                  # the shared expert
        k.join(L.COMB)                                                            # comb
        k.family("hc")                                                            # step 19: routed + shared
        self.hc_post(routed, hc, pre, hc_out, y2=shared)

    def routed_experts(self, il: int, lw: LayerWeights, x_norm: Any, sel: Any, weights: Any,
                       x_q8_K: Q8KAct | None = None) -> Any:
        """Step 17: the selected experts' clamped SwiGLU (gate, up), then their down projections summed.

        A prefill step groups its slots by expert (``moe.group_slots``), so
        that gate, up and down read each expert's weights once per tile of its
        slots (int8 tensor-core tiles where the GPU has them), gate and up from
        one Q8_K row per token; the same integer dots and float64 sums as the
        per-slot kernels, so the same values.  A decode step whose experts the
        placement left in host memory, in whole or part, first copies the
        selected ones to GPU memory (``moe.stage_experts``: one wide read of
        each, at the bus's streaming rate) and runs the same kernels over the
        copies.  A prefill step over a tensor split between GPU and
        host-mapped memory (``SplitExperts``) runs two launches, one per copy,
        each skipping the other's slots; the split down projection writes
        per-slot outputs that ``moe.slot_sum`` adds in slot order, as the fused
        ``moe_down_sum`` does: placement never changes the numerics.
        """
        cfg, k, s, T = self.cfg, self.k, self.s, self.T
        e, n_used, ff = cfg.n_embd, cfg.n_expert_used, cfg.n_ff_exp
        gate, up, down = self.w(lw.ffn_gate_exps), self.w(lw.ffn_up_exps), self.w(lw.ffn_down_exps)
        clamp = cfg.swiglu_clamp_exp[il]
        mid = s.mid[:T * n_used * ff]
        routed = s.routed[:T * e]
        split = any(isinstance(t, SplitExperts) for t in (gate, up, down))
        if T > 1 and not split:
            # a prefill step: slots grouped by expert, each expert's weights read once per tile of its slots
            groups = SlotGroups(s.slot_groups.order[:T * n_used], s.slot_groups.offsets, s.slot_groups.acts)
            k.group_slots(sel, out=groups)
            xk = _q8_K_rows(s.act_k, e // 256, 0, T)                              # one Q8_K row per token
            k.quant_q8_K(x_norm.reshape(T, e), out=xk)
            k.moe_gate_up_grouped[lw.ffn_gate_exps.qtype](gate, up, groups, weights, xk, clamp, out=mid)
            mk = _q8_K_rows(s.act_k, ff // 256, 0, T * n_used)
            k.quant_q8_K(mid.reshape(T * n_used, ff), out=mk)
            slot_out = s.slot_out[:T * n_used * e]
            k.moe_matvec_grouped[lw.ffn_down_exps.qtype](down, groups, mk, out=slot_out)   # one Q8_K row a slot
            k.slot_sum(slot_out, T, n_used, out=routed)
            return routed
        gate_up = k.moe[lw.ffn_gate_exps.qtype][0]
        _, down_sum, down_matvec = k.moe[lw.ffn_down_exps.qtype]
        if T == 1:
            # a decode step: experts in host memory are first copied to GPU memory (stage_experts), a hash
            # layer's since the step started (prefetch_after)
            xk = x_q8_K
            if xk is None:
                xk = _q8_K_rows(s.act_k, e // 256, 0, 1)
                k.quant_q8_K(x_norm.reshape(1, e), out=xk)
            if il in s.prefetch:
                k.join(L.PREFETCH)
                self.prefetch_after(il)
            gate_up_group, down_group = expert_stage_groups(lw)
            (g, u), ids = self.staged(il, gate_up_group, sel)
            gate_up(g, u, ids, weights, xk, clamp, out=mid)
            mk = _q8_K_rows(s.act_k, ff // 256, 0, n_used)
            k.quant_q8_K(mid.reshape(n_used, ff), out=mk)
            (d,), ids = self.staged(il, down_group, sel)
            down_sum(d, ids, mk, out=routed)
            return routed
        # a prefill step over experts split between GPU and host memory: per-slot kernels, one launch per copy
        slots = s.x_slots[:T * n_used * e]
        k.expand(x_norm.reshape(T, e), out=slots, n_hc=n_used)
        xk = _q8_K_rows(s.act_k, e // 256, 0, T * n_used)
        k.quant_q8_K(slots.reshape(T * n_used, e), out=xk)
        if isinstance(gate, SplitExperts) or isinstance(up, SplitExperts):
            if not (isinstance(gate, SplitExperts) and isinstance(up, SplitExperts)
                    and gate.device_ids == up.device_ids):
                raise Ds4Error(f"placement {self.res.plan.policy!r} puts the gate and up experts of layer {il} in "
                               f"different places: an expert's gate and up must live together")
            for part, ids in zip(("device", "mapped"), self.split_ids(gate, sel, 0)):
                gate_up(getattr(gate, part), getattr(up, part), ids, weights, xk, clamp, out=mid)
        else:
            gate_up(gate, up, sel, weights, xk, clamp, out=mid)
        mk = _q8_K_rows(s.act_k, ff // 256, 0, T * n_used)
        k.quant_q8_K(mid.reshape(T * n_used, ff), out=mk)
        slot_out = s.slot_out[:T * n_used * e]
        if isinstance(down, SplitExperts):
            for part, ids in zip(("device", "mapped"), self.split_ids(down, sel, 1)):
                down_matvec(getattr(down, part), ids, mk, out=slot_out)
        else:
            down_matvec(down, sel, mk, out=slot_out)
        k.slot_sum(slot_out, T, n_used, out=routed)
        return routed

    def staged(self, il: int, role_infos: tuple[tuple[str, Any], ...], sel: Any) -> tuple[tuple[Any, ...], Any]:
        """A decode step's routed-expert tensors of layer ``il`` (one role each) and the expert index of each
        slot in them: the tensors as placed (``sel``) when all are in GPU memory, else their selected experts
        copied to GPU memory (slot s at index s): by the layer's prefetch (``Scratch.prefetch``), or now
        (``Scratch.stage``)."""
        if all(self.res.plan.where(info.name) == "device" for _, info in role_infos):
            return tuple(self.w(info) for _, info in role_infos), sel
        keys = [stage_key(role, info) for role, info in role_infos]
        if il in self.s.prefetch:
            return tuple(self.s.prefetch[il][0][key] for key in keys), self.s.slot_ids
        for (_, info), key in zip(role_infos, keys):
            self.stage(info, sel, self.s.stage[key])
        return tuple(self.s.stage[key] for key in keys), self.s.slot_ids

    def stage(self, info: Any, sel: Any, out: PackedWeight, max_blocks: int = 0) -> None:
        """``out`` = the experts ``sel`` of the routed-expert tensor ``info`` (whole, or split between GPU and
        host-mapped memory), copied to GPU memory."""
        w = self.w(info)
        if isinstance(w, SplitExperts):
            self.k.stage_experts(w.device, sel, out=out, w_host=w.mapped, slot_of=w.slot_of, max_blocks=max_blocks)
        else:
            self.k.stage_experts(w, sel, out=out, max_blocks=max_blocks)

    #: blocks of a prefetch copy: it runs beside the main stream's kernels, so a few per SM (enough loads in
    #: flight for the bus)
    PREFETCH_BLOCKS = 128

    def prefetch_after(self, il: int) -> None:
        """A decode step opens the ``PREFETCH`` branch for the next hash layer after ``il`` whose experts the
        placement left (partly) in host memory: its experts, ``tid2eid[token]``, copied to its own buffers
        while the main stream computes the layers before it (joined in ``routed_experts``).  One layer at a
        time, so each copy gets the bus to itself and the next starts when the layer has joined."""
        later = [j for j in sorted(self.s.prefetch) if j > il]
        if self.T != 1 or not later:
            return
        j = later[0]
        lw, (copies, sel) = self.sc.weights.layers[j], self.s.prefetch[j]
        family = self.k.family_name()
        with self.k.branch(L.PREFETCH):
            self.k.family("prefetch")
            self.k.hash_selection(self.w(lw.ffn_gate_tid2eid), self.sc.inputs.ids[:1], out=sel,
                                  k=self.cfg.n_expert_used)
            for group in expert_stage_groups(lw):
                for role, info in group:
                    key = stage_key(role, info)
                    if key in copies:
                        self.stage(info, sel, copies[key], self.PREFETCH_BLOCKS)
        self.k.family(family)

    def split_ids(self, w: SplitExperts, sel: Any, which: int) -> tuple[Any, Any]:
        """The slots' expert indices in ``w.device`` and in ``w.mapped`` (-1: the other copy's slot)."""
        n = sel.size
        out = (self.s.split_ids[which][0][:n], self.s.split_ids[which][1][:n])
        self.k.split_ids(sel, w.slot_of, out=out)
        return out

    # -- helpers --------------------------------------------------------

    def concurrent(self, lane: str = L.SIDE) -> Any:
        """``with self.concurrent():`` a decode step's independent launches, on branch ``lane``'s stream until
        the next ``k.join(lane)`` (they read only what is ready and write only their own buffers); a prefill
        step, whose kernels fill the GPU, keeps them in order."""
        return self.k.branch(lane) if self.T == 1 else contextlib.nullcontext()

    def quant_q8_0(self, x: Any, rows: int, n: int) -> Q8_0Act:
        act = _q8_0_rows(self.s.act, n // 32, 0, rows)
        self.k.quant_q8_0(x[:rows * n].reshape(rows, n), out=act)
        return act

    def rms_q8_0(self, x: Any, w: Any, rows: int, n: int, *, out: Any) -> MatIn:
        """``out`` = RMSNorm(x) w, entering Q8_0 matmuls: the norm also writes its Q8_0 blocks (one launch), in
        the scratch rows :meth:`quant_q8_0` uses."""
        act = _q8_0_rows(self.s.act, n // 32, 0, rows)
        self.k.rms(x[:rows * n].reshape(rows, n), w, self.cfg.rms_eps, out=out, q8_0=act)
        return MatIn(out, rows, n, act)

    def q8(self, info: Any, x: MatIn, out: Any, *, rows: tuple[int, int] | None = None,
           x_rows: tuple[int, int] | None = None) -> Any:
        """out = x W^T for the Q8_0 weight ``info`` (or its rows ``rows``, against x's rows ``x_rows``), by the
        strategy the dispatcher chose for this step's size: one token the ``warp8`` matvec; ``cublas`` the F16
        copy of the weight through cuBLAS when it has one (else ``mmq``); otherwise that strategy's kernel."""
        k, T = self.k, self.T
        w = self.w(info)
        r0, r1 = rows or (0, w.n_rows)
        x0, x1 = x_rows or (0, x.rows)
        if T == 1:
            return k.q8_matvec(w if rows is None else packed_rows(w, r0, r1), self.q8_act(x, x0, x1), out=out)
        strategy = self.sc.kernels.dispatch.strategy_for(T)
        w16 = self.sc.f16.get(info.name) if strategy == "cublas" else None
        if w16 is not None:
            kd = w.n_cols
            return k.f16_gemm(w16[r0 * kd:r1 * kd], self.f16_act(x)[x0 * kd:x1 * kd], out=out, n_rows=r1 - r0,
                              k=kd, n_tok=x1 - x0)
        matmul = k.q8_matmuls["mmq" if strategy == "cublas" else strategy]
        return matmul(w if rows is None else packed_rows(w, r0, r1), self.q8_act(x, x0, x1), out=out)

    def q8_pair(self, info: Any, info2: Any, x: MatIn, out: Any, out2: Any) -> None:
        """out = x W^T and out2 = x W2^T: one ``warp8`` launch for one token, else two ``q8`` products."""
        if self.T == 1:
            self.k.q8_matvec(self.w(info), self.q8_act(x, 0, 1), out=out, w2=self.w(info2), out2=out2)
            return
        self.q8(info, x, out)
        self.q8(info2, x, out2)

    def q8_act(self, x: MatIn, start: int, stop: int) -> Q8_0Act:
        """Rows ``[start, stop)`` of x quantized to Q8_0 (all of x quantized once, at first use)."""
        if x.q8 is None:
            x.q8 = self.quant_q8_0(x.x, x.rows, x.n)
        return _q8_0_rows(x.q8, x.n // 32, start, stop)

    def f16_act(self, x: MatIn) -> Any:
        """x rounded to F16 for the ``cublas`` GEMMs (once, at first use)."""
        if x.f16 is None:
            x.f16 = self.s.x16[:x.rows * x.n]
            self.k.to_f16(x.x[:x.rows * x.n], out=x.f16)
        return x.f16

    def hc_pre(self, hc: Any, fn: Any, scale: Any, base: Any, norm: Any, *, q8_0: bool = False,
               q8_K: bool = False, after_post: bool = False) -> HcPreOut:
        """Steps 2-4 / 15 but comb: x, post, x_norm and the control values, whose Sinkhorn :meth:`hc_comb` runs
        (the returned ``comb`` is its output).  A decode step also takes x_norm's Q8_0 (``q8_0``) and Q8_K
        (``q8_K``) activations from it, in the scratch rows ``quant_q8_0`` / the routed experts would use.
        ``after_post``: hc is the output of :meth:`hc_post`, which left its sums of squares in the scratch."""
        cfg, s, T = self.cfg, self.s, self.T
        e, nhc = cfg.n_embd, cfg.n_hc
        one = T == 1
        out = HcPreOut(s.pre.x[:T * e], s.pre.post[:T * nhc], None, s.pre.x_norm[:T * e],
                       s.pre.mix[:T * cfg.hc_mix_dim], _q8_0_rows(s.act, e // 32, 0, 1) if q8_0 and one else None,
                       _q8_K_rows(s.act_k, e // 256, 0, 1) if q8_K and one else None)
        self.k.hc_pre(hc, self.w(fn), self.w(scale), self.w(base), self.w(norm), out=out, n_hc=nhc,
                      iters=cfg.hc_sinkhorn_iter, hc_eps=cfg.hc_eps, rms_eps=cfg.rms_eps, scratch=s.hc_scratch,
                      n_ss=post_ss_parts(cfg.hc_dim) if after_post else 0)
        return out._replace(comb=s.pre.comb[:T * nhc * nhc])

    def hc_post(self, y: Any, hc: Any, pre: HcPreOut, hc_out: Any, y2: Any = None) -> None:
        """Steps 14 / 19: the new streams, with their sums of squares for the next :meth:`hc_pre` where the
        kernel's blocks tile a token (``hc.post_ss_parts``)."""
        ss = self.s.hc_scratch.part_ss if post_ss_parts(self.cfg.hc_dim) else None
        self.k.hc_post(y, hc, pre.post, pre.comb, out=hc_out, n_hc=self.cfg.n_hc, y2=y2, ss_out=ss)

    def hc_comb(self, pre: HcPreOut, scale: Any, base: Any) -> None:
        """Step 3's Sinkhorn: ``pre.comb`` from ``pre.mix`` (read only by the sublayer's ``hc.post``)."""
        cfg = self.cfg
        self.k.hc_comb(pre.mix, self.w(scale), self.w(base), out=pre.comb, n_hc=cfg.n_hc,
                       iters=cfg.hc_sinkhorn_iter, hc_eps=cfg.hc_eps)
