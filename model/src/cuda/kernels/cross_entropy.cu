// Softmax cross-entropy fused with its gradient, one block per row of a chunk of logits
// ([rows, stride]; columns vocab..stride are device-only padding). The host runs the vocabulary
// projection a chunk of rows at a time, so the full [tokens, vocab] logits never exist.
//
// losses[r] = logsumexp(row) - row[target] for counted rows (weight > 0), else 0.
// In place: row <- weight * (softmax(row) - onehot(target)), padding <- 0, where weight is
// 1 / (counted targets of the step's micro-batch) or 0 for masked targets.
template <typename T>
__device__ void cross_entropy(T* logits, const int* targets, const float* weights, float* losses, int vocab,
                              long long stride) {
    const long long r = blockIdx.x;
    T* x = logits + r * stride;
    const int target = targets[r];
    const float weight = weights[r];
    const float target_logit = load(x, target);  // read before any thread overwrites the row
    float m = NEG_INF, s = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = load(x, j);
        if (v > m) {
            s = s * expf(m - v) + 1.f;
            m = v;
        } else {
            s += expf(v - m);
        }
    }
    const float row_max = block_max(m);
    const float total = block_sum(m == NEG_INF ? 0.f : s * expf(m - row_max));
    const float lse = row_max + logf(total);
    if (threadIdx.x == 0) losses[r] = weight > 0.f ? lse - target_logit : 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float p = expf(load(x, j) - lse);
        store(x, j, weight * (p - (j == target ? 1.f : 0.f)));
    }
    for (long long j = vocab + threadIdx.x; j < stride; j += blockDim.x) store(x, j, 0.f);
}

#define CROSS_ENTROPY_ENTRIES(S, T)                                                                    \
    extern "C" __global__ void cross_entropy_##S(T* logits, const int* targets, const float* weights, \
                                                 float* losses, int vocab, long long stride) {         \
        cross_entropy<T>(logits, targets, weights, losses, vocab, stride);                             \
    }
CROSS_ENTROPY_ENTRIES(f32, float)
CROSS_ENTROPY_ENTRIES(bf16, bf16)
