// Device intrinsics that Numba-CUDA does not expose, linked into kernels
// through cuda.declare_device(..., link=[this file], abi="c").
//
// numba-cuda compiles this file with NVRTC and, when nvJitLink is present
// (the default), links it by LTO, so each wrapper inlines into the caller
// and costs exactly the one instruction it wraps.  Every function here has a
// pure-Python twin in intrinsics.py used under NUMBA_ENABLE_CUDASIM=1.

// c + sum over the four byte lanes of sext(a.byte[i]) * sext(b.byte[i])   (IDP.4A)
extern "C" __device__ int ds4nb_dp4a(int a, int b, int c) {
    return __dp4a(a, b, c);
}

// PRMT in its default mode: result byte i is byte (s >> 4i) & 7 of the 8-byte
// value (y:x), or that byte's sign bit replicated when bit 4i+3 of s is set.
// Written as inline PTX rather than __byte_perm, which masks the selector
// with an extra AND that the callers here never need.
extern "C" __device__ unsigned int ds4nb_byte_perm(unsigned int x, unsigned int y, unsigned int s) {
    unsigned int r;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(x), "r"(y), "r"(s));
    return r;
}

// Integer tensor-core MMA (sm_80+): D = A (16x32 int8, row-major) x B (32x8 int8,
// column-major), accumulator zero.  A lane holds A as four int32 of 4 int8 (a0:
// row g, k 4t..4t+3; a1: row g+8, same k; a2, a3: the same rows, k + 16) and B
// as two (b0: column g, k 4t..4t+3; b1: k + 16), with g = lane / 4, t = lane % 4;
// it gets D[g][2t], D[g][2t+1] (lo) and D[g+8][2t], D[g+8][2t+1] (hi).  The C
// ABI returns one value, so the four int32 come back as two int64 from two
// functions that issue the same non-volatile asm on the same inputs: after LTO
// inlining the compiler may keep one MMA for both.
#define DS4NB_MMA_S8(d0, d1, d2, d3)                                                      \
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "                                \
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};"             \
        : "=r"(d0), "=r"(d1), "=r"(d2), "=r"(d3)                                          \
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(0))

extern "C" __device__ long long ds4nb_mma_s8_lo(int a0, int a1, int a2, int a3, int b0, int b1) {
    int d0, d1, d2, d3;
    DS4NB_MMA_S8(d0, d1, d2, d3);
    return (long long)(unsigned int)d0 | ((long long)d1 << 32);
}

extern "C" __device__ long long ds4nb_mma_s8_hi(int a0, int a1, int a2, int a3, int b0, int b1) {
    int d0, d1, d2, d3;
    DS4NB_MMA_S8(d0, d1, d2, d3);
    return (long long)(unsigned int)d2 | ((long long)d3 << 32);
}

