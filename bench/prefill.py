"""Prefill strategies on the device: Q8_0 matmul kernels at the model's shapes, then prefill through the engine.

``python bench/prefill.py kernels --out DIR``: every ``q8_0.matmul``
implementation (``warp8_t8``, ``mmq``, and ``cublas`` when present) on one
flash layer's Q8_0 shapes at 8, 64, 512 and 2048 tokens (ms per layer,
TFLOP/s), next to cuBLAS's own dense FP16 and INT8 GEMM rates measured in the
same run (the tensor-core peak these kernels are judged against).

``python bench/prefill.py engine --layers N --strategies warp8,mmq --out DIR``:
a flash-shaped model of ``N`` layers in /dev/shm; per strategy
(``DS4_CUDA_PREFILL_PATH``) and chunk size, prefill of a ``--ctx`` token
prompt (t/s, first-token time, both also scaled to 43 layers) and the GPU
time per op family of one chunk step half way through the prompt.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np

FLASH_LAYERS = 43


def _events_ms(fn, reps: int) -> float:
    from numba import cuda

    fn()
    cuda.synchronize()
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / reps


def cublas_peaks() -> dict[str, float]:
    """Dense GEMM TFLOP/s of cuBLAS through CuPy (8192^3): FP16 -> FP32 accumulate (``cublas_f16``), INT8 ->
    INT32 (``cublas_i8``) and FP64 (``cublas_f64``, DGEMM on the FP64 tensor cores)."""
    try:
        import cupy as cp
    except Exception as exc:                    # noqa: BLE001 - reported, not fatal
        print(f"no CuPy ({exc}): no measured tensor-core peak")
        return {}
    n = 8192
    ev0, ev1 = cp.cuda.Event(), cp.cuda.Event()

    def tflops(fn, reps: int = 10) -> float:
        for _ in range(2):
            fn()
        ev0.record()
        for _ in range(reps):
            fn()
        ev1.record()
        ev1.synchronize()
        return 2 * n ** 3 / (cp.cuda.get_elapsed_time(ev0, ev1) / reps * 1e-3) / 1e12

    out = {}
    a16 = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    b16 = cp.random.standard_normal((n, n), dtype=cp.float32).astype(cp.float16)
    out["cublas_f16"] = tflops(lambda: cp.matmul(a16, b16))
    a64, b64 = cp.random.standard_normal((n, n)), cp.random.standard_normal((n, n))
    out["cublas_f64"] = tflops(lambda: cp.matmul(a64, b64), reps=3)
    try:
        from cupy_backends.cuda.libs import cublas

        a8 = cp.random.randint(-127, 128, (n, n), dtype=cp.int8)
        b8 = cp.random.randint(-127, 128, (n, n), dtype=cp.int8)
        c32 = cp.empty((n, n), dtype=cp.int32)
        one, zero = np.array(1, np.int32), np.array(0, np.int32)
        handle = cp.cuda.device.get_cublas_handle()

        def gemm_i8() -> None:
            cublas.gemmEx(handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, n, n, one.ctypes.data, a8.data.ptr,
                          3, n, b8.data.ptr, 3, n, zero.ctypes.data, c32.data.ptr, 10, n,
                          cublas.CUBLAS_COMPUTE_32I, -1)   # 3 = CUDA_R_8I, 10 = CUDA_R_32I, -1 = default algo
        out["cublas_i8"] = tflops(gemm_i8)
    except Exception as exc:                    # noqa: BLE001
        print(f"int8 cuBLAS GEMM not measured: {type(exc).__name__}: {str(exc)[:120]}")
    return out


def layer_q8_shapes(cfg) -> list[tuple[str, int, int, int]]:
    """(name, rows, k, times per layer) of the Q8_0 matmuls of one layer's prefill step."""
    G = cfg.n_out_group
    return [("attn_q_a", cfg.q_lora_rank, cfg.n_embd, 1), ("attn_kv", cfg.head_dim, cfg.n_embd, 1),
            ("attn_q_b", cfg.q_dim, cfg.q_lora_rank, 1), ("attn_output_a", cfg.out_lora_rank, cfg.out_group_dim, G),
            ("attn_output_b", cfg.n_embd, G * cfg.out_lora_rank, 1), ("ffn_gate_shexp", cfg.n_ff_exp, cfg.n_embd, 1),
            ("ffn_up_shexp", cfg.n_ff_exp, cfg.n_embd, 1), ("ffn_down_shexp", cfg.n_embd, cfg.n_ff_exp, 1)]


def _cublas_impl(reg):
    """The cublas strategy as a q8_0.matmul-shaped callable (its F16 weight copies made once), or None."""
    from types import SimpleNamespace

    from ds4nb.engine.q8_timing import cublas_module
    from ds4nb.kernels import _launch as L

    cublas = cublas_module()
    if cublas is None or not cublas.cublas_available():
        print("cublas strategy unavailable here")
        return None
    copies, x16s = {}, {}

    def fn(w, act, *, out, x=None):
        key = id(w)
        if key not in copies:
            copies[key] = cublas.dequantize_q8_0_f16(w, out=L.device_array(w.n_rows * w.n_cols, np.float16))
        n_tok = act.d.size // (w.n_cols // 32)
        if (n_tok, w.n_cols) not in x16s:
            x16s[(n_tok, w.n_cols)] = L.device_array(n_tok * w.n_cols, np.float16)
        x16 = x16s[(n_tok, w.n_cols)]
        cublas.to_f16(x, out=x16)
        cublas.f16_gemm(copies[key], x16, out=out, n_rows=w.n_rows, k=w.n_cols, n_tok=n_tok)

    return SimpleNamespace(name="cublas", fn=fn, supports=lambda batch=None: batch is None or batch >= 2, f32=True)


def kernels(args: argparse.Namespace) -> int:
    from ds4nb.kernels import _launch as L
    from ds4nb.kernels.activation import q8_0_to_device
    from ds4nb.model.presets import flash_config
    from ds4nb.plugins import get_registry
    from ds4nb.quants import random_blocks
    from ds4nb.quants.repack import repack
    from gguf.constants import GGMLQuantizationType as Q

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = flash_config()
    reg = get_registry()
    rng = np.random.default_rng(0)
    peaks = cublas_peaks()
    for k, v in peaks.items():
        print(f"{k}: {v:.0f} TFLOP/s", flush=True)
    impls = [i for i in reg.implementations("q8_0.matmul") if i.supports()]
    cublas = _cublas_impl(reg)
    if cublas is not None:
        impls.append(cublas)
    shapes = layer_q8_shapes(cfg)
    weights = {name: repack(random_blocks(Q.Q8_0, (n, k), rng, rms=0.02), Q.Q8_0, (n, k)).to_device()
               for name, n, k, _ in shapes}
    rows = []
    for n_tok in args.tokens:
        xs = {k: rng.standard_normal((n_tok, k)).astype(np.float32) for k in {s[2] for s in shapes}}
        acts = {k: q8_0_to_device(x) for k, x in xs.items()}
        xs = {k: L.to_device_flat(x) for k, x in xs.items()}
        outs = {name: L.device_array(n_tok * n, np.float32) for name, n, _, _ in shapes}
        for impl in impls:
            if not impl.supports(batch=n_tok):
                continue
            total_ms, flops = 0.0, 0.0
            for name, n, k, times in shapes:
                extra = {"x": xs[k]} if getattr(impl, "f32", False) else {}   # cublas: F16 of the float input
                ms = _events_ms(lambda: impl.fn(weights[name], acts[k], out=outs[name], **extra), args.reps)
                total_ms += ms * times
                flops += 2.0 * n * k * n_tok * times
                rows.append((impl.name, n_tok, name, n, k, times, ms, 2.0 * n * k * n_tok / (ms * 1e-3) / 1e12))
            tf = flops / (total_ms * 1e-3) / 1e12
            rows.append((impl.name, n_tok, "layer", 0, 0, 1, total_ms, tf))
            print(f"{impl.name:9s} {n_tok:5d} tokens: {total_ms:8.3f} ms per layer, {tf:7.1f} TFLOP/s"
                  + "".join(f", {tf / p:.3f} of {k}" for k, p in peaks.items() if k != "cublas_f64"), flush=True)
    with open(out_dir / "prefill_kernels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["impl", "tokens", "tensor", "rows", "k", "per_layer", "ms", "tflops"])
        w.writerows(rows)
        for k, v in peaks.items():
            w.writerow([k, "", "peak", 8192, 8192, "", "", f"{v:.1f}"])
    return 0


def engine(args: argparse.Namespace) -> int:
    from ds4nb.engine.session import CudaEngine
    from ds4nb.model import load_model
    from ds4nb.model.synth import write_synthetic

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.synth_dir) / f"{args.preset}-{args.layers}L.gguf"
    if not path.exists():
        write_synthetic(path, args.preset, seed=1, n_layer=args.layers)
    model = load_model(path)
    scale = args.layers / FLASH_LAYERS
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(1000, model.config.n_vocab - 1000, args.ctx)]
    rows, families = [], []
    for strategy in args.strategies:
        os.environ["DS4_CUDA_PREFILL_PATH"] = strategy
        for chunk in args.chunks:
            eng = CudaEngine(model, ctx=args.ctx + 1, chunk=chunk)
            eng.prefill(tokens[:chunk])                 # compile + capture the chunk step
            if len(tokens) > chunk:
                eng.prefill(tokens[chunk:2 * chunk])
            eng.reset()
            t0 = time.perf_counter()
            eng.prefill(tokens)
            dt = time.perf_counter() - t0
            tps = len(tokens) / dt
            rows.append((strategy, chunk, args.layers, len(tokens), dt, tps, tps * scale, dt / scale))
            print(f"{strategy:7s} chunk {chunk:4d}: {len(tokens)} tokens in {dt:.3f} s = {tps:.0f} t/s "
                  f"({args.layers} layers); 43 layers: {tps * scale:.0f} t/s, {dt / scale:.2f} s", flush=True)
            eng.reset()
            half = (len(tokens) // 2) // chunk * chunk
            eng.prefill(tokens[:half])
            for by in ("family", "kernel"):
                groups = [] if eng.probe.simulator else eng.profile_step(tokens[half:half + chunk], by=by, reps=5)
                for g in groups[:12 if by == "kernel" else None]:
                    families.append((strategy, chunk, by, g.group, g.launches, g.gpu_us / chunk))
                    print(f"    {g.group:60s} {g.launches:6d} launches {g.gpu_us / chunk:9.2f} us/token", flush=True)
            del eng
    with open(out_dir / "prefill_engine.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "chunk", "layers", "tokens", "seconds", "tps", "tps_43_layers", "seconds_43_layers"])
        w.writerows(rows)
    with open(out_dir / "prefill_families.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["strategy", "chunk", "by", "group", "launches", "gpu_us_per_token"])
        w.writerows(families)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--tokens", type=int, nargs="+", default=[8, 64, 512, 2048])
    k.add_argument("--reps", type=int, default=10)
    k.add_argument("--out", default="/tmp/out")
    k.set_defaults(func=kernels)
    e = sub.add_parser("engine")
    e.add_argument("--layers", type=int, default=4)
    e.add_argument("--strategies", type=lambda s: s.split(","), default=["warp8", "mmq", "cublas"])
    e.add_argument("--chunks", type=int, nargs="+", default=[64, 256])
    e.add_argument("--ctx", type=int, default=2048)
    e.add_argument("--synth-dir", default="/dev/shm")
    e.add_argument("--preset", default="flash", help="synthetic model shape (tiny/small: a quick check in the simulator)")
    e.add_argument("--out", default="/tmp/out")
    e.set_defaults(func=engine)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
