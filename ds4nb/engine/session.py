"""The CUDA backend: a DS4 session whose whole state lives on the GPU.

:class:`CudaEngine` implements the engine interface of the oracle
(:class:`ds4nb.reference.engine.Engine`): ``prefill``, ``decode``,
``snapshot``/``restore`` (as a host :class:`~ds4nb.reference.state.State`, so
a session can move between backends) and ``reset``.

Setup, once: probe the device, let the dispatcher pick the Q8_0 strategy,
build a placement plan (``full``) and place the weights through the residency
manager, select every kernel from the registry, allocate the session state
(sliding windows, compressed rows, compressor windows, indexer rows) and
scratch buffers for a prefill chunk.

A step of ``T`` tokens (decode: ``T = 1``; prefill: chunks of up to
``chunk`` tokens) follows docs/model.md: the stateless parts (HC, norms,
projections, router, experts) run over all ``T`` tokens per launch; the
stateful part (KV window, compressors, indexer, attention; steps 7-12) runs
token by token, as in the oracle.  Nothing crosses to the host inside a step
except the logits the interface returns (``decode_sample`` keeps even those on
the device and returns only the sampled id).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from numba import cuda

from ds4nb.cache.choose import choose_placement
from ds4nb.cache.options import PlacementOptions
from ds4nb.cache.plan import DeviceMemory, engine_tensors
from ds4nb.cache.residency import load_residency
from ds4nb.dispatch.device import probe_device
from ds4nb.dispatch.select import StrategyChoice, select_q8_strategy
from ds4nb.errors import Ds4Error
from ds4nb.kernels.activation import Q8_0Act, Q8KAct, alloc_q8_0, alloc_q8_K
from ds4nb.kernels.attention import alloc_attn_scratch
from ds4nb.kernels.compressor import CompressorStateDev, alloc_state
from ds4nb.kernels.hc import HcPreOut, alloc_scratch as alloc_hc_scratch
from ds4nb.kernels.registry import DeviceInfo
from ds4nb.kernels.rope import rope_args
from ds4nb.kernels.router import RouteOut
from ds4nb.kernels.sample import alloc_scratch as alloc_sample_scratch
from ds4nb.model import LayerWeights, Model, Weights
from ds4nb.plugins import get_registry, placement_policies
from ds4nb.quants.repack import PackedWeight
from ds4nb.reference import ops
from ds4nb.reference.engine import Engine
from ds4nb.reference.state import CompressorState, LayerState, RowBuffer, State
from ds4nb.sampling import SamplingParams

F32 = np.float32

# Q8_0 strategy -> (decode implementation, batched implementation) of the q8_0 ops
STRATEGY_IMPLS = {"warp8": ("warp8", "warp8_t8"), "mmq": ("warp8", "mmq"), "cublas": ("warp8", "cublas")}


def _empty(n: int, dtype: Any = np.float32) -> Any:
    return cuda.device_array(max(n, 1), dtype=np.dtype(dtype))


def _q8_0_rows(a: Q8_0Act, nb: int, start: int, stop: int) -> Q8_0Act:
    """Rows ``[start, stop)`` of a flat Q8_0 activation (each row: 4 * nb words, nb scales)."""
    return Q8_0Act(a.qs[start * 4 * nb:stop * 4 * nb], a.d[start * nb:stop * nb])


def _q8_K_rows(a: Q8KAct, nb: int, start: int, stop: int) -> Q8KAct:
    return Q8KAct(a.qs[start * 32 * nb:stop * 32 * nb], a.d[start * nb:stop * nb],
                  a.bsums[start * 8 * nb:stop * 8 * nb])


def _packed_rows(w: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Rows ``[start, stop)`` of a 2-D block-minor weight (each row's fields are contiguous)."""
    nb = w.n_blocks
    wq = w.qs.size // (w.n_rows * nb)
    wd = w.dm.size // (w.n_rows * nb)
    sc = None if w.sc is None else w.sc[start * (w.sc.size // w.n_rows):stop * (w.sc.size // w.n_rows)]
    return PackedWeight(w.qtype, (stop - start, w.n_cols), w.qs[start * wq * nb:stop * wq * nb], sc,
                        w.dm[start * wd * nb:stop * wd * nb])


@dataclass
class _LayerState:
    """One layer's device state (docs/model.md, "Session state")."""

    raw: Any                                   # (n_swa, head_dim) ring: row pos % n_swa
    comp: Any = None                           # (max_comp, head_dim)
    comp_n: int = 0
    attn_compressor: CompressorStateDev | None = None
    index_comp: Any = None                     # (max_comp, indexer_head_dim)
    index_compressor: CompressorStateDev | None = None


class _K:
    """The kernel launchers this engine uses, selected once from the registry."""

    def __init__(self, device: DeviceInfo, strategy: StrategyChoice, expert_types: set) -> None:
        reg = get_registry()
        decode_impl, batched_impl = STRATEGY_IMPLS[strategy.name]
        pick: Callable[[str], Any] = lambda op: reg.select(op, device=device).fn  # noqa: E731
        self.q8_matvec = reg.get("q8_0.matvec", decode_impl).fn
        self.q8_matmul = reg.get("q8_0.matmul", batched_impl).fn
        self.q8_grouped_matvec = pick("q8_0.grouped_matvec")
        self.quant_q8_0 = pick("act.quantize_q8_0")
        self.quant_q8_K = pick("act.quantize_q8_K")
        self.rms = pick("norm.rms")
        self.embed = pick("embed.gather")
        self.expand = pick("hc.expand")
        self.hc_pre = pick("hc.pre")
        self.hc_post = pick("hc.post")
        self.hc_head = pick("hc.head")
        self.q_norm_rope = pick("attn.q_norm_rope")
        self.kv_store = pick("attn.kv_store")
        self.attention = pick("attn.decode")
        self.comp_update = pick("compressor.update")
        self.comp_emit = pick("compressor.emit")
        self.f16_matvec = pick("f16.matvec")
        self.index_q_prep = pick("indexer.q_prep")
        self.index_scores = pick("indexer.scores")
        self.topk = pick("topk.select")
        self.router_select = pick("router.select")
        self.router_hash = pick("router.hash")
        self.swiglu = pick("ffn.swiglu")
        self.add = pick("vec.add")
        self.swap01 = pick("copy.swap01")
        self.slot_sum = pick("moe.slot_sum")
        self.argmax = pick("sample.argmax")
        self.sample = pick("sample.draw")
        self.moe = {q: (pick(f"{q.name.lower()}.moe_gate_up"), pick(f"{q.name.lower()}.moe_down_sum"),
                        pick(f"{q.name.lower()}.moe_matvec")) for q in expert_types}


class CudaEngine(Engine):
    """DS4 on one CUDA GPU (or the CUDA simulator); see the module docstring."""

    name = "cuda"

    def __init__(self, model: Model, *, ctx: int = 4096, chunk: int = 64, placement: PlacementOptions | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        if not isinstance(model.weights, Weights):
            raise Ds4Error(f"{model.path.name} is a {model.kind} file, not a main DS4 model")
        self.model = model
        cfg = self._cfg = model.config
        self.ctx = ctx
        self.chunk = max(1, chunk)
        self.probe = probe_device()
        device = DeviceInfo(self.probe.name, self.probe.cc, simulator=self.probe.simulator)
        reg = get_registry()

        def available(strategy: str) -> bool:
            dec, bat = STRATEGY_IMPLS[strategy]
            try:
                return (reg.get("q8_0.matvec", dec).supports(device)
                        and reg.get("q8_0.matmul", bat).supports(device))
            except LookupError:
                return False

        self.strategy = select_q8_strategy(available, self.probe.name)
        w = model.weights
        expert_types = {lw.ffn_gate_exps.qtype for lw in w.layers} | {lw.ffn_down_exps.qtype for lw in w.layers}
        self.k = _K(device, self.strategy, expert_types)

        tensors = engine_tensors(model)
        names = [t.name for t in tensors]
        self.plan = choose_placement(
            tensors, DeviceMemory(self.probe.name, self.probe.total_bytes, self.probe.free_bytes),
            placement or PlacementOptions(), reserve_bytes=self.state_bytes() + self.scratch_bytes(),
            policies=placement_policies())
        self.res = load_residency(model, self.plan, names, progress)
        self.ropes = [rope_args(ops.make_rope(
            cfg.n_rot, compressed=cfg.compress_ratio(il) != 0, freq_base=cfg.rope_freq_base,
            compress_freq_base=cfg.compress_rope_freq_base, scale_factor=cfg.rope_scale_factor,
            orig_ctx=cfg.rope_orig_ctx, beta_fast=cfg.rope_yarn_beta_fast, beta_slow=cfg.rope_yarn_beta_slow))
            for il in range(cfg.n_layer)]
        # grouped output projection: attn_output_a split by group rows, once
        self._out_a = [[_packed_rows(self.res[lw.attn_output_a.name], g * cfg.out_lora_rank,
                                     (g + 1) * cfg.out_lora_rank) for g in range(cfg.n_out_group)]
                       for lw in w.layers]
        self._alloc_scratch()
        self.reset()

    # ------------------------------------------------------------------
    # sizes

    @property
    def config(self):
        return self._cfg

    def max_comp_rows(self, il: int) -> int:
        ratio = self._cfg.compress_ratio(il)
        return 0 if ratio == 0 else self.ctx // ratio + 1

    def state_bytes(self) -> int:
        """Device bytes of the session state for ``ctx`` tokens (the KV cache of this engine)."""
        cfg = self._cfg
        total = 0
        for il in range(cfg.n_layer):
            total += cfg.n_swa * cfg.head_dim * 4
            n = self.max_comp_rows(il)
            if n:
                ratio = cfg.compress_ratio(il)
                csa = cfg.layer_kind(il) == "csa"
                total += n * cfg.head_dim * 4 + 2 * (2 if csa else 1) * ratio * cfg.compressor_width(il) * 4
                if csa:
                    total += n * cfg.indexer_head_dim * 4 + 2 * 2 * ratio * 2 * cfg.indexer_head_dim * 4
        return total

    def scratch_bytes(self) -> int:
        cfg, c = self._cfg, self.chunk
        per_tok = 4 * (cfg.n_hc * cfg.n_embd * 3 + cfg.q_dim * 3 + cfg.n_expert_used * (cfg.n_ff_exp + cfg.n_embd) * 2)
        return c * per_tok + cfg.n_vocab * 4 + (256 << 20)

    def describe(self) -> str:
        return (f"cuda on {self.probe.describe()} | {self.strategy.describe()} | placement {self.plan.describe()}")

    # ------------------------------------------------------------------
    # buffers

    def _alloc_scratch(self) -> None:
        cfg, c = self._cfg, self.chunk
        e, hc = cfg.n_embd, cfg.n_hc
        self.ids = _empty(c, np.int32)
        self.x_emb = _empty(c * e)
        self.hc_a = _empty(c * hc * e)
        self.hc_b = _empty(c * hc * e)
        self.pre = HcPreOut(_empty(c * e), _empty(c * hc), _empty(c * hc * hc), _empty(c * e))
        self.hc_scratch = alloc_hc_scratch(c, cfg.hc_dim, cfg.hc_mix_dim)
        self.head_scratch = alloc_hc_scratch(1, cfg.hc_dim, cfg.n_hc)
        k_max = max(e, cfg.q_lora_rank, cfg.q_dim, cfg.out_low_dim, cfg.n_ff_exp)
        self.act = alloc_q8_0(c * max(1, cfg.n_out_group), k_max)
        self.qr = _empty(c * cfg.q_lora_rank)
        self.qr_norm = _empty(c * cfg.q_lora_rank)
        self.q = _empty(c * cfg.q_dim)
        self.kv = _empty(c * cfg.head_dim)
        self.heads = _empty(c * cfg.q_dim)
        self.heads_g = _empty(c * cfg.q_dim)
        self.low = _empty(c * cfg.out_low_dim)
        self.low_t = _empty(c * cfg.out_low_dim)
        self.y = _empty(c * e)
        self.attn_scratch = alloc_attn_scratch(cfg.n_head, cfg.head_dim)
        self.iq = _empty(cfg.indexer_q_dim)
        self.iq_prep = _empty(cfg.indexer_q_dim)
        self.iw = _empty(cfg.n_indexer_head)
        self.scores = _empty(self.ctx // 4 + 2)
        self.sel = _empty(cfg.indexer_top_k, np.int32)
        self.router_logits = _empty(c * cfg.n_expert)
        self.route = RouteOut(cuda.device_array((c, cfg.n_expert_used), np.int32),
                              cuda.device_array((c, cfg.n_expert_used), np.float32))
        n_slot = c * cfg.n_expert_used
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
        self.argmax_out = _empty(1, np.int32)
        self.sample_out = _empty(2, np.int32)
        self.sample_scratch = alloc_sample_scratch()

    def reset(self) -> None:
        cfg = self._cfg
        self.pos = 0
        self.layers: list[_LayerState] = []
        for il in range(cfg.n_layer):
            ls = _LayerState(raw=cuda.to_device(np.zeros((cfg.n_swa, cfg.head_dim), np.float32)))
            ratio = cfg.compress_ratio(il)
            if ratio:
                csa = cfg.layer_kind(il) == "csa"
                n = self.max_comp_rows(il)
                ls.comp = cuda.to_device(np.zeros((n, cfg.head_dim), np.float32))
                ls.attn_compressor = alloc_state(ratio, cfg.head_dim, csa)
                if csa:
                    ls.index_comp = cuda.to_device(np.zeros((n, cfg.indexer_head_dim), np.float32))
                    ls.index_compressor = alloc_state(ratio, cfg.indexer_head_dim, True)
            self.layers.append(ls)

    @property
    def position(self) -> int:
        return self.pos

    # ------------------------------------------------------------------
    # state <-> host

    def snapshot(self) -> State:
        cfg = self._cfg
        layers = []
        for il, ls in enumerate(self.layers):
            n_raw = min(self.pos, cfg.n_swa)
            ring = ls.raw.copy_to_host()
            order = [(self.pos - n_raw + i) % cfg.n_swa for i in range(n_raw)]
            out = LayerState(raw=ring[order].copy())
            if ls.comp is not None:
                out.comp = RowBuffer.of(ls.comp.copy_to_host()[:ls.comp_n])
                out.attn_compressor = CompressorState(ls.attn_compressor.kv.copy_to_host(),
                                                      ls.attn_compressor.score.copy_to_host())
            if ls.index_comp is not None:
                out.index_comp = RowBuffer.of(ls.index_comp.copy_to_host()[:ls.comp_n])
                out.index_compressor = CompressorState(ls.index_compressor.kv.copy_to_host(),
                                                       ls.index_compressor.score.copy_to_host())
            layers.append(out)
        return State(self.pos, layers)

    def restore(self, state: State) -> None:
        cfg = self._cfg
        if len(state.layers) != cfg.n_layer:
            raise ValueError(f"state has {len(state.layers)} layers, the model has {cfg.n_layer}")
        self.reset()
        self.pos = state.position
        for il, (ls, src) in enumerate(zip(self.layers, state.layers)):
            ring = np.zeros((cfg.n_swa, cfg.head_dim), np.float32)
            n_raw = len(src.raw)
            for i in range(n_raw):
                ring[(self.pos - n_raw + i) % cfg.n_swa] = src.raw[i]
            ls.raw.copy_to_device(ring)
            if ls.comp is not None and src.comp is not None:
                n = src.comp.n
                if n > self.max_comp_rows(il):
                    raise Ds4Error(f"state holds {n} compressed rows in layer {il}, more than ctx {self.ctx} allows")
                host = np.zeros(ls.comp.shape, np.float32)
                host[:n] = src.comp.rows
                ls.comp.copy_to_device(host)
                ls.comp_n = n
                ls.attn_compressor.kv.copy_to_device(np.ascontiguousarray(src.attn_compressor.kv))
                ls.attn_compressor.score.copy_to_device(np.ascontiguousarray(src.attn_compressor.score))
                if ls.index_comp is not None:
                    host = np.zeros(ls.index_comp.shape, np.float32)
                    host[:n] = src.index_comp.rows
                    ls.index_comp.copy_to_device(host)
                    ls.index_compressor.kv.copy_to_device(np.ascontiguousarray(src.index_compressor.kv))
                    ls.index_compressor.score.copy_to_device(np.ascontiguousarray(src.index_compressor.score))

    # ------------------------------------------------------------------
    # the forward pass

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("prefill needs at least one token")
        self._check_room(len(tokens))  # before any work: a prompt that does not fit leaves the session as it was
        for i in range(0, len(tokens), self.chunk):
            self._forward(tokens[i:i + self.chunk])
        return self._logits_to_host()

    def decode(self, token: int) -> np.ndarray:
        self._forward([int(token)])
        return self._logits_to_host()

    def decode_sample(self, token: int | None, params: SamplingParams, rng: np.random.Generator) -> int:
        """Decode ``token`` (None: sample from the last logits) and sample the next id on the device."""
        if token is not None:
            self._forward([int(token)])
        if params.greedy:
            self.k.argmax(self.logits.reshape(1, self._cfg.n_vocab), out=self.argmax_out)
            return int(self.argmax_out.copy_to_host()[0])
        self.k.sample(self.logits, out=self.sample_out, params=params, u=float(rng.random()),
                      scratch=self.sample_scratch)
        tok, status = self.sample_out.copy_to_host()
        if status:  # the device path declined (e.g. non-finite logits): sample on the host
            from ds4nb.sampling import sample

            return sample(self._logits_to_host(), params, rng)
        return int(tok)

    def _check_room(self, n: int) -> None:
        if self.pos + n > self.ctx:
            raise Ds4Error(f"context is full: {self.pos + n} tokens do not fit --ctx {self.ctx}")

    def _logits_to_host(self) -> np.ndarray:
        return self.logits.copy_to_host()[:self._cfg.n_vocab].copy()

    def _forward(self, tokens: list[int]) -> None:
        cfg, k, res = self._cfg, self.k, self.res
        T = len(tokens)
        self._check_room(T)
        for t in tokens:
            if not 0 <= t < cfg.n_vocab:
                raise ValueError(f"token id {t} is outside the vocabulary (0..{cfg.n_vocab - 1})")
        e, nhc = cfg.n_embd, cfg.n_hc
        ids = self.ids[:T]
        ids.copy_to_device(np.asarray(tokens, np.int32))
        w = self.model.weights
        k.embed(res[w.token_embd.name], ids, e, out=self.x_emb[:T * e])
        hc, hc_next = self.hc_a[:T * nhc * e], self.hc_b[:T * nhc * e]
        k.expand(self.x_emb[:T * e].reshape(T, e), out=hc, n_hc=nhc)
        for il, lw in enumerate(w.layers):
            self._attention_block(il, lw, hc, hc_next, T)
            hc, hc_next = hc_next, hc
            self._ffn_block(il, lw, hc, hc_next, ids, T)
            hc, hc_next = hc_next, hc
        self.pos += T
        # steps 20-21 for the last token only
        last = hc[(T - 1) * nhc * e:T * nhc * e]
        k.hc_head(last, res[w.output_hc_fn.name], res[w.output_hc_scale.name], res[w.output_hc_base.name],
                  out=self.x_out, n_hc=nhc, hc_eps=cfg.hc_eps, rms_eps=cfg.rms_eps, scratch=self.head_scratch)
        k.rms(self.x_out.reshape(1, e), res[w.output_norm.name], cfg.rms_eps, out=self.x_out)
        act = self._quant_q8_0(self.x_out, 1, e)
        k.q8_matvec(res[w.output.name], act, out=self.logits)

    # -- helpers --------------------------------------------------------

    def _quant_q8_0(self, x: Any, T: int, n: int) -> Q8_0Act:
        act = _q8_0_rows(self.act, n // 32, 0, T)
        self.k.quant_q8_0(x[:T * n].reshape(T, n), out=act)
        return act

    def _q8(self, w: PackedWeight, act: Q8_0Act, T: int, out: Any) -> Any:
        if T == 1:
            return self.k.q8_matvec(w, act, out=out)
        return self.k.q8_matmul(w, act, out=out)

    def _hc_pre(self, hc: Any, fn: Any, scale: Any, base: Any, norm: Any, T: int) -> HcPreOut:
        cfg = self._cfg
        e, nhc = cfg.n_embd, cfg.n_hc
        out = HcPreOut(self.pre.x[:T * e], self.pre.post[:T * nhc], self.pre.comb[:T * nhc * nhc],
                       self.pre.x_norm[:T * e])
        self.k.hc_pre(hc, self.res[fn.name], self.res[scale.name], self.res[base.name], self.res[norm.name],
                      out=out, n_hc=nhc, iters=cfg.hc_sinkhorn_iter, hc_eps=cfg.hc_eps, rms_eps=cfg.rms_eps,
                      scratch=self.hc_scratch)
        return out

    # -- attention sublayer (steps 2-14) --------------------------------

    def _attention_block(self, il: int, lw: LayerWeights, hc: Any, hc_out: Any, T: int) -> None:
        cfg, k, res = self._cfg, self.k, self.res
        e, rank, qd, hd = cfg.n_embd, cfg.q_lora_rank, cfg.q_dim, cfg.head_dim
        pre = self._hc_pre(hc, lw.hc_attn_fn, lw.hc_attn_scale, lw.hc_attn_base, lw.attn_norm, T)
        x_norm = pre.x_norm
        act = self._quant_q8_0(x_norm, T, e)                                   # step 5
        qr, qr_norm, q, kv = self.qr[:T * rank], self.qr_norm[:T * rank], self.q[:T * qd], self.kv[:T * hd]
        self._q8(res[lw.attn_q_a.name], act, T, qr)
        self._q8(res[lw.attn_kv.name], act, T, kv)                             # step 6 (same activation)
        k.rms(qr.reshape(T, rank), res[lw.attn_q_a_norm.name], cfg.rms_eps, out=qr_norm)
        act = self._quant_q8_0(qr_norm, T, rank)
        self._q8(res[lw.attn_q_b.name], act, T, q)
        rope = self.ropes[il]
        k.q_norm_rope(q, out=q, n_head=cfg.n_head, head_dim=hd, eps=cfg.rms_eps, rope=rope, pos=self.pos)
        heads = self.heads[:T * qd]
        for t in range(T):                                                     # steps 7-12, token by token
            self._attend_one(il, lw, t, x_norm[t * e:(t + 1) * e], qr_norm[t * rank:(t + 1) * rank],
                             q[t * qd:(t + 1) * qd], kv[t * hd:(t + 1) * hd], heads[t * qd:(t + 1) * qd])
        y = self._grouped_output(il, lw, heads, T)                              # step 13
        k.hc_post(y, hc, pre.post, pre.comb, out=hc_out, n_hc=cfg.n_hc)          # step 14

    def _attend_one(self, il: int, lw: LayerWeights, t: int, x_norm: Any, qr_norm: Any, q: Any, kv: Any,
                    out: Any) -> None:
        cfg, k, res, ls = self._cfg, self.k, self.res, self.layers[il]
        pos = self.pos + t
        rope = self.ropes[il]
        k.kv_store(kv, res[lw.attn_kv_a_norm.name], out=ls.raw, row=pos % cfg.n_swa, rope=rope, pos=pos,
                   eps=cfg.rms_eps)
        n_raw = min(pos + 1, cfg.n_swa)
        ratio = cfg.compress_ratio(il)
        sel, n_visible = None, 0
        if ratio:
            csa = cfg.layer_kind(il) == "csa"
            emit = (pos + 1) % ratio == 0
            k.comp_update(x_norm, res[lw.attn_compressor_kv.name], res[lw.attn_compressor_gate.name],
                          res[lw.attn_compressor_ape.name], out=ls.attn_compressor, pos=pos, ratio=ratio,
                          overlap=csa)
            if emit:
                k.comp_emit(ls.attn_compressor.kv, ls.attn_compressor.score, res[lw.attn_compressor_norm.name],
                            out=ls.comp, row=ls.comp_n, pos=pos, ratio=ratio, overlap=csa, rope=rope,
                            eps=cfg.rms_eps, finish="fp8")
            if csa:
                k.comp_update(x_norm, res[lw.indexer_compressor_kv.name], res[lw.indexer_compressor_gate.name],
                              res[lw.indexer_compressor_ape.name], out=ls.index_compressor, pos=pos, ratio=ratio,
                              overlap=True)
                if emit:
                    k.comp_emit(ls.index_compressor.kv, ls.index_compressor.score,
                                res[lw.indexer_compressor_norm.name], out=ls.index_comp, row=ls.comp_n, pos=pos,
                                ratio=ratio, overlap=True, rope=rope, eps=cfg.rms_eps, finish="qat")
            if emit:
                ls.comp_n += 1
            n_visible = ls.comp_n
            if csa and ls.comp_n > cfg.indexer_top_k:                         # step 10
                sel = self._indexer_select(il, lw, ls, x_norm, qr_norm, pos)
                n_visible = cfg.indexer_top_k
        k.attention(q, ls.raw, n_raw, ls.comp, n_visible, res[lw.attn_sinks.name], sel, out=out, rope=rope,
                    pos=pos, scratch=self.attn_scratch)                       # steps 11-12

    def _indexer_select(self, il: int, lw: LayerWeights, ls: _LayerState, x_norm: Any, qr_norm: Any,
                        pos: int) -> Any:
        cfg, k, res = self._cfg, self.k, self.res
        n_ih, d = cfg.n_indexer_head, cfg.indexer_head_dim
        k.f16_matvec(res[lw.indexer_attn_q_b.name], qr_norm, out=self.iq)
        k.index_q_prep(self.iq, out=self.iq_prep, n_head=n_ih, head_dim=d, rope=self.ropes[il], pos=pos)
        k.f16_matvec(res[lw.indexer_proj.name], x_norm, out=self.iw)
        scores = self.scores[:ls.comp_n]
        k.index_scores(self.iq_prep, self.iw, ls.index_comp, ls.comp_n, out=scores,
                       w_scale=ops.indexer_weight_scale(d, n_ih))
        k.topk(scores, ls.comp_n, cfg.indexer_top_k, out=self.sel)
        return self.sel

    def _grouped_output(self, il: int, lw: LayerWeights, heads: Any, T: int) -> Any:
        cfg, k, res = self._cfg, self.k, self.res
        G, gd, rank = cfg.n_out_group, cfg.out_group_dim, cfg.out_lora_rank
        low = self.low[:T * G * rank]
        if T == 1:
            act = self._quant_q8_0(heads, G, gd)          # group g is "row" g: all groups in one launch
            k.q8_grouped_matvec(res[lw.attn_output_a.name], act, out=low)
        else:
            by_group = self.heads_g[:T * G * gd]
            k.swap01(heads, T, G, gd, out=by_group)       # (T, G, gd) -> (G, T, gd)
            act = self._quant_q8_0(by_group, G * T, gd)
            low_g = self.low_t[:T * G * rank]
            for g in range(G):
                k.q8_matmul(self._out_a[il][g], _q8_0_rows(act, gd // 32, g * T, (g + 1) * T),
                            out=low_g[g * T * rank:(g + 1) * T * rank])
            k.swap01(low_g, G, T, rank, out=low)          # (G, T, rank) -> (T, G, rank)
        act = self._quant_q8_0(low, T, G * rank)
        y = self.y[:T * cfg.n_embd]
        self._q8(res[lw.attn_output_b.name], act, T, y)
        return y

    # -- FFN sublayer (steps 15-19) -------------------------------------

    def _ffn_block(self, il: int, lw: LayerWeights, hc: Any, hc_out: Any, ids: Any, T: int) -> None:
        cfg, k, res = self._cfg, self.k, self.res
        e, n_used, ff = cfg.n_embd, cfg.n_expert_used, cfg.n_ff_exp
        pre = self._hc_pre(hc, lw.hc_ffn_fn, lw.hc_ffn_scale, lw.hc_ffn_base, lw.ffn_norm, T)
        x_norm = pre.x_norm
        logits = self.router_logits[:T * cfg.n_expert]                      # step 16
        k.f16_matvec(res[lw.ffn_gate_inp.name], x_norm, out=logits)
        route = RouteOut(self.route.selected[:T], self.route.weights[:T])
        logits2 = logits.reshape(T, cfg.n_expert)
        if cfg.is_hash_layer(il):
            k.router_hash(logits2, res[lw.ffn_gate_tid2eid.name], ids, out=route, k=n_used,
                          scale=cfg.expert_weights_scale, normalise=cfg.expert_weights_norm)
        else:
            bias = None if lw.ffn_exp_probs_b is None else res[lw.ffn_exp_probs_b.name]
            k.router_select(logits2, bias, out=route, k=n_used, scale=cfg.expert_weights_scale,
                            normalise=cfg.expert_weights_norm)
        # step 17: routed experts, every (token, slot) pair in one launch
        gate_up, down_sum, matvec = self.k.moe[lw.ffn_gate_exps.qtype]
        clamp = cfg.swiglu_clamp_exp[il]
        sel_flat = route.selected.reshape(T * n_used)
        w_flat = route.weights.reshape(T * n_used)
        mid = self.mid[:T * n_used * ff]
        if T == 1:
            xk = _q8_K_rows(self.act_k, e // 256, 0, 1)
            k.quant_q8_K(x_norm.reshape(1, e), out=xk)
        else:
            slots = self.x_slots[:T * n_used * e]
            k.expand(x_norm.reshape(T, e), out=slots, n_hc=n_used)
            xk = _q8_K_rows(self.act_k, e // 256, 0, T * n_used)
            k.quant_q8_K(slots.reshape(T * n_used, e), out=xk)
        gate_up(res[lw.ffn_gate_exps.name], res[lw.ffn_up_exps.name], sel_flat, w_flat, xk, clamp, out=mid)
        mk = _q8_K_rows(self.act_k, ff // 256, 0, T * n_used)
        k.quant_q8_K(mid.reshape(T * n_used, ff), out=mk)
        routed = self.routed[:T * e]
        down_w = res[lw.ffn_down_exps.name]
        if T == 1:
            self.k.moe[lw.ffn_down_exps.qtype][1](down_w, sel_flat, mk, out=routed)
        else:
            slot_out = self.slot_out[:T * n_used * e]
            self.k.moe[lw.ffn_down_exps.qtype][2](down_w, sel_flat, mk, out=slot_out)
            k.slot_sum(slot_out, T, n_used, out=routed)
        # step 18: shared expert
        act = self._quant_q8_0(x_norm, T, e)
        g, u = self.sh_gate[:T * ff], self.sh_up[:T * ff]
        self._q8(res[lw.ffn_gate_shexp.name], act, T, g)
        self._q8(res[lw.ffn_up_shexp.name], act, T, u)
        k.swiglu(g, u, clamp, out=g)
        act = self._quant_q8_0(g, T, ff)
        shared = self.shared[:T * e]
        self._q8(res[lw.ffn_down_shexp.name], act, T, shared)
        k.add(routed, shared, out=routed)                                    # step 19
        k.hc_post(routed, hc, pre.post, pre.comb, out=hc_out, n_hc=cfg.n_hc)
