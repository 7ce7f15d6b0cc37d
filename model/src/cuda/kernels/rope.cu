// Rotary position embedding in Hugging Face's rotate-half layout, in place. Row n of the batch is
// at position n % seq_len. `cos` and `sin` are [seq_len, head_dim / 2] tables the host computes in
// fp64 (as the CPU backend does). `sign` = +1 applies the rotation (forward), -1 its transpose
// (backward). Rows are `stride` elements apart, so q and k can be slices of a fused QKV output.
template <typename T>
__device__ void rope(T* x, const float* cos_t, const float* sin_t, int heads, int head_dim, int seq_len,
                     long long stride, float sign) {
    const long long n = blockIdx.x;
    const int half = head_dim / 2, pos = (int)(n % seq_len);
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        const float c = cos_t[pos * half + j], s = sign * sin_t[pos * half + j];
        const long long base = n * stride + (long long)h * head_dim;
        const float a = load(x, base + j), b = load(x, base + j + half);
        store(x, base + j, a * c - b * s);
        store(x, base + j + half, b * c + a * s);
    }
}

#define ROPE_ENTRIES(S, T)                                                                             \
    extern "C" __global__ void rope_##S(T* x, const float* cos_t, const float* sin_t, int heads,       \
                                        int head_dim, int seq_len, long long stride, float sign) {     \
        rope<T>(x, cos_t, sin_t, heads, head_dim, seq_len, stride, sign);                              \
    }
ROPE_ENTRIES(f32, float)
ROPE_ENTRIES(bf16, bf16)
