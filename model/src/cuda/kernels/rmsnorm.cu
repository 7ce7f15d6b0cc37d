// Fused residual add + RMSNorm, forward and backward, over rows of width d:
// y = x * rstd * w with rstd = 1 / sqrt(mean(x^2) + eps).

// Forward, one block per row. With `delta` set, the residual row is updated first
// (x += delta, rounded to T) and normalised as stored. Saves rstd for the backward pass.
template <typename T>
__device__ void rmsnorm_forward(T* x, const T* delta, const T* w, T* y, float* rstd, int d, float eps) {
    const long long row = (long long)blockIdx.x * d;
    float ss = 0.f;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        if (delta) store(x, row + j, load(x, row + j) + load(delta, row + j));
        const float v = load(x, row + j);
        ss += v * v;
    }
    const float r = rsqrtf(block_sum(ss) / (float)d + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int j = threadIdx.x; j < d; j += blockDim.x) store(y, row + j, load(x, row + j) * r * load(w, j));
}

// Backward: dresid[row] += rstd * (dy * w - xhat * mean(dy * w * xhat)), the residual stream's
// gradient gaining the norm's (the fused half of "residual + norm"). The weight gradient is
// summed per block over its `rows_per_block` rows into dw_partial[block, :]; column_sum then
// adds the blocks in order. Grid: ceil(rows / rows_per_block) blocks.
template <typename T>
__device__ void rmsnorm_backward(const T* x, const T* w, const float* rstd, const T* dy, T* dresid,
                                 float* dw_partial, int rows, int rows_per_block, int d) {
    const int first = blockIdx.x * rows_per_block;
    const int end = min(rows, first + rows_per_block);
    float* dw = dw_partial + (long long)blockIdx.x * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) dw[j] = 0.f;
    for (int n = first; n < end; ++n) {
        const long long row = (long long)n * d;
        const float r = rstd[n];
        float dot = 0.f;
        for (int j = threadIdx.x; j < d; j += blockDim.x)
            dot += load(dy, row + j) * load(w, j) * load(x, row + j) * r;
        const float mean = block_sum(dot) / (float)d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float xhat = load(x, row + j) * r, g = load(dy, row + j);
            store(dresid, row + j, load(dresid, row + j) + r * (g * load(w, j) - xhat * mean));
            dw[j] += g * xhat;
        }
    }
}

#define RMSNORM_ENTRIES(S, T)                                                                          \
    extern "C" __global__ void rmsnorm_forward_##S(T* x, const T* delta, const T* w, T* y, float* rstd, \
                                                   int d, float eps) {                                 \
        rmsnorm_forward<T>(x, delta, w, y, rstd, d, eps);                                              \
    }                                                                                                  \
    extern "C" __global__ void rmsnorm_backward_##S(const T* x, const T* w, const float* rstd,         \
                                                    const T* dy, T* dresid, float* dw_partial, int rows, \
                                                    int rows_per_block, int d) {                       \
        rmsnorm_backward<T>(x, w, rstd, dy, dresid, dw_partial, rows, rows_per_block, d);              \
    }
RMSNORM_ENTRIES(f32, float)
RMSNORM_ENTRIES(bf16, bf16)

// out[j] (+)= sum over b of partial[b, j], b ascending: the second half of a deterministic
// column reduction. One thread per column.
extern "C" __global__ void column_sum(const float* partial, float* out, int blocks, int d, int accumulate) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    float acc = accumulate ? out[j] : 0.f;
    for (int b = 0; b < blocks; ++b) acc += partial[(long long)b * d + j];
    out[j] = acc;
}
