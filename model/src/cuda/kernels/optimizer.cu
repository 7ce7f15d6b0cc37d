// The optimiser step: gradient scaling, the global gradient norm (deterministic two-pass sum),
// and AdamW fused with the bf16 weight cast. Arithmetic follows the CPU backend (train.rs):
// gradients are scaled in fp32, the norm and the AdamW update are computed in fp64.

// x[i] *= s, grid-stride.
extern "C" __global__ void scale_f32(float* x, long long n, float s) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        x[i] *= s;
}

// partial[blockIdx.x] = sum of x[i]^2 over this block's grid-stride elements, in fp64. With a
// fixed grid the sum's order is fixed: sum_partials finishes it.
extern "C" __global__ void sum_squares(const float* x, long long n, double* partial) {
    double acc = 0.0;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double v = x[i];
        acc += v * v;
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// out[0] (+)= sum of partial[0..count]: one block, fixed order. Several tensors' sum_squares
// accumulate into one total, tensor by tensor.
extern "C" __global__ void sum_partials(const double* partial, int count, double* out, int accumulate) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
    acc = block_sum(acc);
    if (threadIdx.x == 0) out[0] = accumulate ? out[0] + acc : acc;
}

// AdamW with decoupled weight decay (`decay` = 0 for norm weights), fp32 master weights and
// moments, the step's gradient clip factor applied in fp32 first (as the CPU backend does), and
// the bf16 copy of the new weights written when `p16` is set. c1, c2 are the bias corrections
// 1 - beta^t.
extern "C" __global__ void adamw(float* p, const float* grad, float* m, float* v, bf16* p16, long long n,
                                 float clip_scale, double lr, double beta1, double beta2, double c1, double c2,
                                 double eps, double decay) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const double g = (double)(grad[i] * clip_scale);
        const double mi = beta1 * (double)m[i] + (1.0 - beta1) * g;
        const double vi = beta2 * (double)v[i] + (1.0 - beta2) * g * g;
        m[i] = (float)mi;
        v[i] = (float)vi;
        const double update = (mi / c1) / (sqrt(vi / c2) + eps) + decay * (double)p[i];
        const float w = (float)((double)p[i] - lr * update);
        p[i] = w;
        if (p16) store(p16, i, w);
    }
}

// dst = bf16(src), grid-stride (weights after loading, checkpoint round trips).
extern "C" __global__ void cast_f32_bf16(const float* src, bf16* dst, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        store(dst, i, src[i]);
}

// dst (+)= float(src), grid-stride: a bf16 gradient into an fp32 accumulator.
extern "C" __global__ void accumulate_bf16_f32(const bf16* src, float* dst, long long n, int accumulate) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = accumulate ? dst[i] + load(src, i) : load(src, i);
}
