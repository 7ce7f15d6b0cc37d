// Shared by every kernel source of the CUDA backend: the storage types and deterministic block
// reductions. NVRTC ships no cuda_bf16.h, so bf16 is our own 16-bit struct converted with integer
// operations (round to nearest even; a NaN stays a NaN). Every kernel computes in fp32 (fp64 in
// the optimiser) whatever its storage type, and no reduction uses atomics: sums run in a fixed
// order, so the same launch on the same GPU gives the same bits.

// NVRTC compiles without the standard headers: no INFINITY macro.
#define NEG_INF __int_as_float(0xff800000)

struct bf16 {
    unsigned short bits;
};

__device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ float load(const bf16* p, long long i) {
    return __uint_as_float(((unsigned int)p[i].bits) << 16);
}
__device__ __forceinline__ void store(float* p, long long i, float x) { p[i] = x; }
__device__ __forceinline__ void store(bf16* p, long long i, float x) {
    unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        p[i].bits = (unsigned short)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i].bits = (unsigned short)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The sum over the block, returned to every thread. blockDim.x must be a multiple of 32 (at most
// 1024) and every thread of the block must call it.
template <typename F>
__device__ __forceinline__ F block_sum(F v) {
    __shared__ F partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the previous call's readers are done with `partial`
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : (F)0;
    return warp_sum(v);
}

// The maximum over the block, returned to every thread (same contract as block_sum).
__device__ __forceinline__ float block_max(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    v = lane < warps ? partial[lane] : NEG_INF;
    return warp_max(v);
}

// Each source ends with one extern "C" entry point per storage type, NAME_f32 and NAME_bf16,
// forwarding to the template NAME<T>.
