"""Locate where the CUDA engine departs from the oracle: per layer and sublayer, per position (GPU run)."""

from __future__ import annotations

import sys

import numpy as np


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _setup():
    """The tiny model (seed 1), a decode-only CUDA engine, the oracle and its empty state."""
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic
    from ds4nb.reference.model import Reference

    write_synthetic("/tmp/tiny.gguf", "tiny", seed=1)
    m = load_model("/tmp/tiny.gguf")
    ref = Reference(m)
    return m, m.config, CudaEngine(m, ctx=256, chunk=1), ref, ref.new_state()


def main() -> int:
    """Feed both sides the oracle's inputs; report the worst error per layer and sublayer."""
    from numba import cuda

    m, cfg, ge, ref, st = _setup()
    e, nhc = cfg.n_embd, cfg.n_hc
    rng = np.random.default_rng(0)
    toks = rng.integers(0, cfg.n_vocab, int(sys.argv[1]) if len(sys.argv) > 1 else 40).tolist()

    worst: dict[tuple[int, str], tuple[float, int]] = {}
    for pos, tok in enumerate(toks):
        ids = ge.ids[:1]
        ids.copy_to_device(np.array([tok], np.int32))
        hc = ref.embed([tok])
        for il, lw in enumerate(m.weights.layers):
            hcd = cuda.to_device(hc.reshape(-1))
            out = cuda.device_array(nhc * e, np.float32)
            ge.pos = pos
            ge._attention_block(il, lw, hcd, out, 1)
            hc1 = ref.attention_block(il, hc, pos, st.layers[il])
            err = rel(out.copy_to_host(), hc1)
            key = (il, "attn")
            if err > worst.get(key, (0, 0))[0]:
                worst[key] = (err, pos)
            ls = ge.layers[il]
            if ls.comp is not None and ls.comp_n:
                cerr = rel(ls.comp.copy_to_host()[:ls.comp_n], st.layers[il].comp.rows)
                if cerr > worst.get((il, "comp"), (0, 0))[0]:
                    worst[(il, "comp")] = (cerr, pos)
                if ls.comp_n != st.layers[il].comp.n:
                    print(f"pos {pos} layer {il}: comp rows {ls.comp_n} vs {st.layers[il].comp.n}")
            raw_n = min(pos + 1, cfg.n_swa)
            ring = ls.raw.copy_to_host()
            order = [(pos + 1 - raw_n + i) % cfg.n_swa for i in range(raw_n)]
            rerr = rel(ring[order], st.layers[il].raw)
            if rerr > worst.get((il, "raw"), (0, 0))[0]:
                worst[(il, "raw")] = (rerr, pos)
            hcd = cuda.to_device(hc1.reshape(-1))
            out = cuda.device_array(nhc * e, np.float32)
            ge._ffn_block(il, lw, hcd, out, ids, 1)
            hc = ref.ffn_block(il, hc1, [tok])
            err = rel(out.copy_to_host(), hc)
            if err > worst.get((il, "ffn"), (0, 0))[0]:
                worst[(il, "ffn")] = (err, pos)
        st.position += 1
    print(f"{'layer':>5} {'kind':>4} {'part':>5} {'max rel err':>12} {'at pos':>6}")
    for (il, part), (err, pos) in sorted(worst.items()):
        print(f"{il:5d} {cfg.layer_kind(il):>4} {part:>5} {err:12.3e} {pos:6d}")
    return 0


def drift() -> int:
    """Run GPU and oracle side by side (each on its own outputs); print where they drift apart."""
    from numba import cuda

    m, cfg, ge, ref, st = _setup()
    e, nhc = cfg.n_embd, cfg.n_hc
    toks = np.random.default_rng(1).integers(0, cfg.n_vocab, 45).tolist()

    for pos, tok in enumerate(toks):
        ids = ge.ids[:1]
        ids.copy_to_device(np.array([tok], np.int32))
        hc = ref.embed([tok])
        hcd = cuda.to_device(hc.reshape(-1))
        row = []
        for il, lw in enumerate(m.weights.layers):
            out = cuda.device_array(nhc * e, np.float32)
            ge.pos = pos
            ge._attention_block(il, lw, hcd, out, 1)
            hc = ref.attention_block(il, hc, pos, st.layers[il])
            a = rel(out.copy_to_host(), hc)
            out2 = cuda.device_array(nhc * e, np.float32)
            ge._ffn_block(il, lw, out, out2, ids, 1)
            hc = ref.ffn_block(il, hc, [tok])
            f = rel(out2.copy_to_host(), hc)
            hcd = out2
            extra = ""
            ls = ge.layers[il]
            if ls.comp is not None and ls.comp_n:
                extra = f" c{ls.comp_n}:{np.abs(ls.comp.copy_to_host()[:ls.comp_n] - st.layers[il].comp.rows).max():.0e}"
            row.append(f"L{il} {a:.0e}/{f:.0e}{extra}")
        print(f"pos {pos:2d}: " + "  ".join(row), flush=True)
    return 0


def chunks() -> int:
    """Prefill the same prompt with several chunk sizes; compare logits and state with the oracle."""
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic
    from ds4nb.reference.engine import CpuEngine

    write_synthetic("/tmp/tiny.gguf", "tiny", seed=1)
    m = load_model("/tmp/tiny.gguf")
    rng = np.random.default_rng(0)
    toks = rng.integers(0, m.config.n_vocab, 45).tolist()
    cpu = CpuEngine(m)
    lc = cpu.prefill(toks)
    sc = cpu.snapshot()
    for chunk in (1, 2, 3, 8, 32):
        ge = CudaEngine(m, ctx=256, chunk=chunk)
        lg = ge.prefill(toks)
        sg = ge.snapshot()
        err = float(np.linalg.norm(lg - lc) / np.linalg.norm(lc))
        parts = []
        for il, (a, b) in enumerate(zip(sg.layers, sc.layers)):
            d = float(np.abs(a.raw - b.raw).max()) if a.raw.shape == b.raw.shape else -1.0
            c = -2.0
            if a.comp is not None:
                c = float(np.abs(a.comp.rows - b.comp.rows).max()) if a.comp.n == b.comp.n else -1.0
            parts.append(f"L{il} raw {d:.1e} comp {c:.1e}")
        print(f"chunk {chunk:2d}: logits rel err {err:.2e} | " + " | ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    modes = {"chunks": chunks, "drift": drift}
    sys.exit(modes[sys.argv[1]]() if sys.argv[1:2] and sys.argv[1] in modes else main())
