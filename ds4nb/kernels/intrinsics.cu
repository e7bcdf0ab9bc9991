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

// Programmatic dependent launch (sm_90+): griddepcontrol.wait blocks until the
// grid this one follows has completed and its memory is visible (at once when
// the launch was ordinary); griddepcontrol.launch_dependents then lets the next
// grid, if launched early, start its blocks, which wait in turn.  Waiting
// first keeps at most one grid waiting behind a running one.  Nothing below
// sm_90.  Returns 0 (a value numba's C ABI declares plainly; callers drop it).
extern "C" __device__ int ds4nb_wait_prior_grid() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    return 0;
}
