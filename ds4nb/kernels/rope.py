"""RoPE / YaRN on the rotary tail of q, kv and output rows (docs/model.md steps 7 and 12).

Only the last ``n_rot`` dims of each ``head_dim`` row rotate, in adjacent
pairs ``(x[2k], x[2k+1])`` of the tail; the first ``head_dim - n_rot`` dims
pass through.  ``inverse`` rotates by ``-theta`` (step 12).

Numerics (docs/model.md, "one rounding per value").  The angle is computed
exactly as the oracle (``ds4nb.reference.ops.rope_thetas``) does, in float32
with the same operation order: the running product ``pos * ts * ts ...``
(``k`` multiplies for pair ``k``), then the YaRN blend ``interp * (1 - ramp)
+ extrap * ramp`` with both products rounded separately (:func:`fmul_rn`: the
compiler would otherwise fuse one of them into an FMA, and at ``pos`` ~ 1e6 one
ulp of the angle is 0.06 rad).  ``cos``/``sin`` are evaluated in float64 and
rounded once, then times ``mscale`` in float32, like the oracle, so the
rotation factors are bit-identical to the twin.  The rotation
``(x0 c - x1 s, x0 s + x1 c)`` is evaluated in float64 from the float32 ``x``,
``c``, ``s`` and rounded once to float32: the products are exact in float64,
so the result is the same whether or not the compiler fuses them (an FMA of an
exact product), i.e. bit-identical to the oracle.

Launch geometry (``rope.tail``): one thread per (token, row, pair), 256
threads a block; when ``out`` is not ``x`` the pass-through pairs are copied
by their own threads, so every output element is written.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from numba import cuda

from ds4nb.kernels import _launch as L
from ds4nb.kernels.intrinsics import SIMULATOR, device, float32, float64, wait_prior_grid
from ds4nb.kernels.parity import CONTRACT, Case
from ds4nb.kernels.registry import OpSpec, implementation

THREADS = 256
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)

# ---------------------------------------------------------------------------
# Device helpers shared by the other model kernels
# ---------------------------------------------------------------------------

if SIMULATOR:
    def fmul_rn(a, b):
        """float32 a * b rounded on its own (never contracted into an FMA)."""
        return np.float32(np.float32(a) * np.float32(b))
else:
    from numba.cuda import libdevice

    @device
    def fmul_rn(a, b):
        """float32 a * b rounded on its own (never contracted into an FMA)."""
        return libdevice.fmul_rn(a, b)


class RopeArgs(NamedTuple):
    """The float32 scalars a kernel needs to rotate a layer's tail (host-side, from a ``Rope``)."""

    n_rot: int
    theta_scale: np.float32   # freq_base ** (-2 / n_rot), as the oracle rounds it
    freq_scale: np.float32
    ext_factor: np.float32
    corr_low: np.float32
    corr_denom: np.float32    # max(0.001, high - low)
    mscale: np.float32


def rope_args(rope: Any) -> RopeArgs:
    """Kernel scalars from a ``ds4nb.reference.ops.Rope`` (or anything with its fields).

    Mirrors the oracle's float32 roundings of ``rope_thetas``.
    """
    n_rot = int(rope.n_rot)
    ts = np.float32(float(rope.freq_base) ** float(np.float32(-2.0) / np.float32(n_rot)))
    low = np.float32(rope.corr_low)
    denom = np.float32(max(0.001, float(np.float32(rope.corr_high) - low)))
    return RopeArgs(n_rot, ts, np.float32(rope.freq_scale), np.float32(rope.ext_factor), low, denom,
                    np.float32(rope.mscale))


@device
def rope_cos_sin(k, pos, theta_scale, freq_scale, ext_factor, corr_low, corr_denom, mscale):
    """(cos, sin) * mscale of pair ``k`` at position ``pos`` (float32, as ``ops.rope_cos_sin``)."""
    extrap = float32(pos)
    for _ in range(k):
        extrap = fmul_rn(extrap, theta_scale)
    theta = fmul_rn(freq_scale, extrap)
    if ext_factor != _F0:
        y = (float32(k) - corr_low) / corr_denom
        ramp = fmul_rn(_F1 - min(_F1, max(_F0, y)), ext_factor)
        theta = fmul_rn(theta, _F1 - ramp) + fmul_rn(extrap, ramp)
    t64 = float64(theta)
    c = fmul_rn(float32(math.cos(t64)), mscale)
    s = fmul_rn(float32(math.sin(t64)), mscale)
    return c, s


@device
def rope_rotate(x0, x1, c, s, inverse):
    """One float32 pair rotated by float32 (c, s), or by (c, -s) when ``inverse``.

    Evaluated in float64 (the products of float32 values are exact there) and
    rounded once to float32 per output.  ``x0``, ``x1`` must already be float32
    values (a float64 argument would skip its own rounding point).
    """
    a0 = float64(x0)
    a1 = float64(x1)
    c64 = float64(c)
    s64 = float64(s)
    if inverse:
        s64 = -s64
    return float32(a0 * c64 - a1 * s64), float32(a0 * s64 + a1 * c64)


# ---------------------------------------------------------------------------
# rope.tail
# ---------------------------------------------------------------------------


@cuda.jit
def _rope_tail_kernel(x, out, n_tok, n_rows, head_dim, pos0, pos_step, inverse, copy_nope,
                      n_rot, ts, fscale, ext, low, denom, msc):
    wait_prior_grid()
    half = head_dim // 2
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    if i >= n_tok * n_rows * half:
        return
    p = i % half
    rest = i // half
    t = rest // n_rows
    base = rest * head_dim + 2 * p
    k = p - (head_dim - n_rot) // 2  # pair index inside the rotary tail
    if k < 0:
        if copy_nope:
            out[base] = x[base]
            out[base + 1] = x[base + 1]
        return
    c, s = rope_cos_sin(k, pos0 + t * pos_step, ts, fscale, ext, low, denom, msc)
    y0, y1 = rope_rotate(x[base], x[base + 1], c, s, inverse)
    out[base] = y0
    out[base + 1] = y1


@implementation("rope.tail", "pair_per_thread", layout="f32")
def rope_tail(x: Any, *, out: Any, rope: Any, pos: int, head_dim: int, inverse: bool = False,
              pos_step: int = 1, stream: Any = 0) -> Any:
    """Rotate the last ``n_rot`` dims of every ``head_dim`` row of x (T, n_rows * head_dim).

    Token ``t`` is at position ``pos + t * pos_step``.  ``out`` may be ``x``
    (in place: the pass-through dims are then not touched).
    """
    ra = rope if isinstance(rope, RopeArgs) else rope_args(rope)
    n_tok = x.shape[0] if x.ndim == 2 else 1
    n_rows = x.size // (n_tok * head_dim)
    if (x.size != n_tok * n_rows * head_dim or head_dim % 2 or ra.n_rot % 2 or ra.n_rot > head_dim):
        raise ValueError(f"rope.tail: bad shape {x.shape} for head_dim {head_dim}, n_rot {ra.n_rot}")
    copy_nope = 0 if _same_buffer(x, out) else 1
    n = n_tok * n_rows * (head_dim // 2)
    L.launch(_rope_tail_kernel, L.cdiv(n, THREADS), THREADS, stream,
        L.flat(x), L.flat(out), n_tok, n_rows, head_dim, int(pos), int(pos_step), int(bool(inverse)),
        copy_nope, ra.n_rot, ra.theta_scale, ra.freq_scale, ra.ext_factor, ra.corr_low, ra.corr_denom,
        ra.mscale)
    return out


def _same_buffer(a: Any, b: Any) -> bool:
    try:
        return a.__cuda_array_interface__["data"][0] == b.__cuda_array_interface__["data"][0]
    except Exception:
        return a is b


# ---------------------------------------------------------------------------
# Parity cases
# ---------------------------------------------------------------------------


def make_test_rope(n_rot: int, compressed: bool, scale: str = "tiny"):
    """The Rope of a sliding (plain) or compressed (YaRN) layer with the DS4 constants."""
    from ds4nb.reference.ops import make_rope

    return make_rope(n_rot, compressed=compressed, freq_base=10000.0, compress_freq_base=160000.0,
                     scale_factor=16.0, orig_ctx=65536, beta_fast=32.0, beta_slow=1.0)


def _case(rng: np.random.Generator, scale: str) -> Case:
    from ds4nb.reference.ops import apply_rope_tail

    if scale == "tiny":
        n_tok, n_rows, head_dim, n_rot = 2, 4, 64, 16
    else:
        n_tok, n_rows, head_dim, n_rot = 1, 64, 512, 64
    compressed = bool(rng.integers(0, 2))
    inverse = bool(rng.integers(0, 2))
    rope = make_test_rope(n_rot, compressed)
    pos = int(rng.integers(0, 1 << 20))
    x = rng.standard_normal((n_tok, n_rows * head_dim)).astype(np.float32)
    ref = np.stack([apply_rope_tail(x[t].reshape(n_rows, head_dim), rope, pos + t, inverse=inverse).reshape(-1)
                    for t in range(n_tok)])
    out = L.device_array(x.size, np.float32)
    return Case((cuda.to_device(x),), out, (ref.reshape(-1),), (CONTRACT,),
                kwargs=dict(rope=rope, pos=pos, head_dim=head_dim, inverse=inverse),
                info={"shape": x.shape, "pos": pos, "yarn": compressed, "inverse": inverse})


OPS = [
    OpSpec("rope.tail", "RoPE/YaRN rotation of the last n_rot dims of each head row (forward or inverse)",
           "(x f32 (T, rows*head_dim), *, out, rope: Rope|RopeArgs, pos, head_dim, inverse=False, "
           "pos_step=1, stream)",
           "ds4nb.reference.ops.apply_rope_tail",
           # cos/sin bit-identical to the twin, the rotation one float64 evaluation rounded once: CONTRACT
           1e-6, _case),
]
