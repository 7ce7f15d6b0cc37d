// Reference attention: scores materialised per query, causal within each batch row, optionally
// document-masked, grouped-query (heads / kv_heads query heads share a key/value head). Simple
// and slow on purpose: it is the GPU-side oracle of the fused flash kernel, as the CPU backend
// is the oracle of this one.
//
// Layout: token n = b * seq_len + t. q is [n, heads, head_dim] with rows q_stride apart; k and v
// are [n, kv_heads, head_dim] with rows kv_stride apart (slices of a fused QKV output work);
// out and dout are [n, heads, head_dim] dense; lse and delta are [n, heads] fp32. `segments`
// (may be null) gives each token's document: token t sees s <= t of its row with the same
// document. head_dim <= blockDim.x.

__device__ __forceinline__ bool visible(const int* segments, long long row_start, long long s, long long t) {
    return s >= row_start && s <= t && (segments == nullptr || segments[s] == segments[t]);
}

// One block per (token, head); dynamic shared memory holds seq_len fp32 scores.
template <typename T>
__device__ void attention_forward(const T* q, const T* k, const T* v, T* out, float* lse, const int* segments,
                                  int seq_len, int heads, int kv_heads, int head_dim, long long q_stride,
                                  long long kv_stride, float scale) {
    extern __shared__ float scores[];
    const long long t = blockIdx.x;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const long long row_start = t - t % seq_len;
    const T* qt = q + t * q_stride + (long long)h * head_dim;
    float m = NEG_INF;
    for (long long s = row_start + threadIdx.x; s <= t; s += blockDim.x) {
        float score = NEG_INF;
        if (visible(segments, row_start, s, t)) {
            const T* ks = k + s * kv_stride + (long long)kvh * head_dim;
            float dot = 0.f;
            for (int j = 0; j < head_dim; ++j) dot += load(qt, j) * load(ks, j);
            score = dot * scale;
        }
        scores[s - row_start] = score;
        m = fmaxf(m, score);
    }
    const float row_max = block_max(m);  // t sees itself, so row_max is finite
    float sum = 0.f;
    for (long long s = row_start + threadIdx.x; s <= t; s += blockDim.x) {
        const float p = expf(scores[s - row_start] - row_max);
        scores[s - row_start] = p;
        sum += p;
    }
    const float total = block_sum(sum);  // its barriers also publish every score
    if (threadIdx.x == 0) lse[t * heads + h] = row_max + logf(total);
    if (threadIdx.x < head_dim) {
        float acc = 0.f;
        for (long long s = row_start; s <= t; ++s)
            acc += scores[s - row_start] * load(v, s * kv_stride + (long long)kvh * head_dim + threadIdx.x);
        store(out, (t * heads + h) * head_dim + threadIdx.x, acc / total);
    }
}

// delta[t, h] = dot(dout[t, h], out[t, h]): the softmax backward's row term. One block per token.
template <typename T>
__device__ void attention_delta(const T* out, const T* dout, float* delta, int heads, int head_dim) {
    const long long t = blockIdx.x;
    for (int h = 0; h < heads; ++h) {
        const long long base = (t * heads + h) * head_dim;
        float dot = 0.f;
        for (int j = threadIdx.x; j < head_dim; j += blockDim.x) dot += load(out, base + j) * load(dout, base + j);
        dot = block_sum(dot);
        if (threadIdx.x == 0) delta[t * heads + h] = dot;
    }
}

// dq[t, h] = scale * sum_s p_ts (dout_t . v_s - delta_t) k_s. One block per (token, head).
template <typename T>
__device__ void attention_backward_query(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                         const float* delta, T* dq, const int* segments, int seq_len, int heads,
                                         int kv_heads, int head_dim, long long q_stride, long long kv_stride,
                                         float scale) {
    const long long t = blockIdx.x;
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const long long row_start = t - t % seq_len;
    const T* qt = q + t * q_stride + (long long)h * head_dim;
    const T* dot_ = dout + (t * heads + h) * head_dim;
    const float l = lse[t * heads + h], dl = delta[t * heads + h];
    float acc = 0.f;  // thread j < head_dim accumulates dq[j]
    for (long long s = row_start; s <= t; ++s) {
        if (!visible(segments, row_start, s, t)) continue;  // uniform across the block
        const T* ks = k + s * kv_stride + (long long)kvh * head_dim;
        const T* vs = v + s * kv_stride + (long long)kvh * head_dim;
        float qk = 0.f, dv = 0.f;
        for (int j = threadIdx.x; j < head_dim; j += blockDim.x) {
            qk += load(qt, j) * load(ks, j);
            dv += load(dot_, j) * load(vs, j);
        }
        qk = block_sum(qk);
        dv = block_sum(dv);
        const float ds = expf(qk * scale - l) * (dv - dl);
        if (threadIdx.x < head_dim) acc += ds * load(ks, threadIdx.x);
    }
    if (threadIdx.x < head_dim) store(dq, t * q_stride + (long long)h * head_dim + threadIdx.x, acc * scale);
}

// dk[s, g], dv[s, g] for key/value head g, summed over the later tokens t of the row that see s
// and over the query heads of the group, in (t, head) order. One block per (token, kv head).
template <typename T>
__device__ void attention_backward_key(const T* q, const T* k, const T* v, const T* dout, const float* lse,
                                       const float* delta, T* dk, T* dv, const int* segments, int seq_len,
                                       int heads, int kv_heads, int head_dim, long long q_stride,
                                       long long kv_stride, float scale) {
    const long long s = blockIdx.x;
    const int g = blockIdx.y, group = heads / kv_heads;
    const long long row_start = s - s % seq_len, row_end = row_start + seq_len;
    const T* ks = k + s * kv_stride + (long long)g * head_dim;
    const T* vs = v + s * kv_stride + (long long)g * head_dim;
    float dk_acc = 0.f, dv_acc = 0.f;
    for (long long t = s; t < row_end; ++t) {
        if (!visible(segments, row_start, s, t)) continue;
        for (int h = g * group; h < (g + 1) * group; ++h) {
            const T* qt = q + t * q_stride + (long long)h * head_dim;
            const T* dot_ = dout + (t * heads + h) * head_dim;
            float qk = 0.f, dp = 0.f;
            for (int j = threadIdx.x; j < head_dim; j += blockDim.x) {
                qk += load(qt, j) * load(ks, j);
                dp += load(dot_, j) * load(vs, j);
            }
            qk = block_sum(qk);
            dp = block_sum(dp);
            const float p = expf(qk * scale - lse[t * heads + h]);
            const float ds = p * (dp - delta[t * heads + h]);
            if (threadIdx.x < head_dim) {
                dv_acc += p * load(dot_, threadIdx.x);
                dk_acc += ds * load(qt, threadIdx.x);
            }
        }
    }
    if (threadIdx.x < head_dim) {
        store(dk, s * kv_stride + (long long)g * head_dim + threadIdx.x, dk_acc * scale);
        store(dv, s * kv_stride + (long long)g * head_dim + threadIdx.x, dv_acc);
    }
}

#define ATTENTION_ENTRIES(S, T)                                                                         \
    extern "C" __global__ void attention_forward_##S(const T* q, const T* k, const T* v, T* out, float* lse, \
                                                     const int* segments, int seq_len, int heads,       \
                                                     int kv_heads, int head_dim, long long q_stride,    \
                                                     long long kv_stride, float scale) {                \
        attention_forward<T>(q, k, v, out, lse, segments, seq_len, heads, kv_heads, head_dim, q_stride, \
                             kv_stride, scale);                                                         \
    }                                                                                                   \
    extern "C" __global__ void attention_delta_##S(const T* out, const T* dout, float* delta, int heads, \
                                                   int head_dim) {                                      \
        attention_delta<T>(out, dout, delta, heads, head_dim);                                          \
    }                                                                                                   \
    extern "C" __global__ void attention_backward_query_##S(                                            \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dq, \
        const int* segments, int seq_len, int heads, int kv_heads, int head_dim, long long q_stride,     \
        long long kv_stride, float scale) {                                                             \
        attention_backward_query<T>(q, k, v, dout, lse, delta, dq, segments, seq_len, heads, kv_heads,  \
                                    head_dim, q_stride, kv_stride, scale);                              \
    }                                                                                                   \
    extern "C" __global__ void attention_backward_key_##S(                                              \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dk, \
        T* dv, const int* segments, int seq_len, int heads, int kv_heads, int head_dim,                 \
        long long q_stride, long long kv_stride, float scale) {                                         \
        attention_backward_key<T>(q, k, v, dout, lse, delta, dk, dv, segments, seq_len, heads, kv_heads, \
                                  head_dim, q_stride, kv_stride, scale);                                \
    }
ATTENTION_ENTRIES(f32, float)
ATTENTION_ENTRIES(bf16, bf16)
