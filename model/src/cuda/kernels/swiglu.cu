// SwiGLU on the fused gate/up projection: gu is [n, 2f] (gate in columns 0..f, up in f..2f),
// h = silu(gate) * up is [n, f]. Grid-stride over n * f elements.

__device__ __forceinline__ float sigmoid(float z) { return 1.f / (1.f + expf(-z)); }

template <typename T>
__device__ void swiglu_forward(const T* gu, T* h, long long n, int f) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n * f;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / f, j = i % f;
        const float g = load(gu, row * 2 * f + j), u = load(gu, row * 2 * f + f + j);
        store(h, i, g * sigmoid(g) * u);
    }
}

// dgu[:, gate] = dh * up * silu'(gate), dgu[:, up] = dh * silu(gate).
template <typename T>
__device__ void swiglu_backward(const T* gu, const T* dh, T* dgu, long long n, int f) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n * f;
         i += (long long)gridDim.x * blockDim.x) {
        const long long row = i / f, j = i % f;
        const float g = load(gu, row * 2 * f + j), u = load(gu, row * 2 * f + f + j), d = load(dh, i);
        const float s = sigmoid(g);
        store(dgu, row * 2 * f + j, d * u * s * (1.f + g * (1.f - s)));
        store(dgu, row * 2 * f + f + j, d * g * s);
    }
}

#define SWIGLU_ENTRIES(S, T)                                                                            \
    extern "C" __global__ void swiglu_forward_##S(const T* gu, T* h, long long n, int f) {              \
        swiglu_forward<T>(gu, h, n, f);                                                                 \
    }                                                                                                   \
    extern "C" __global__ void swiglu_backward_##S(const T* gu, const T* dh, T* dgu, long long n, int f) { \
        swiglu_backward<T>(gu, dh, dgu, n, f);                                                          \
    }
SWIGLU_ENTRIES(f32, float)
SWIGLU_ENTRIES(bf16, bf16)
