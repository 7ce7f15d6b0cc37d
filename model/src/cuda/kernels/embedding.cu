// Token embedding: the gather (forward) and a deterministic scatter (backward).

// out[n, :] = table[ids[n], :]. One block per token position.
template <typename T>
__device__ void embed_forward(const int* ids, const T* table, T* out, int d) {
    const long long n = blockIdx.x, token = ids[n];
    for (int j = threadIdx.x; j < d; j += blockDim.x) store(out, n * d + j, load(table, token * d + j));
}

// dtable[token, :] += sum of dout[p, :] over the positions p holding `token`, in position order.
// The host groups positions by token: group g is token tokens[g], its positions are
// positions[starts[g] .. starts[g + 1]] (ascending). One block per group, so no two blocks
// write one row and no atomics are needed.
template <typename T>
__device__ void embed_backward(const int* tokens, const int* starts, const int* positions, const T* dout,
                               float* dtable, int d) {
    const int g = blockIdx.x;
    const long long token = tokens[g];
    const int first = starts[g], end = starts[g + 1];
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = dtable[token * d + j];
        for (int p = first; p < end; ++p) acc += load(dout, (long long)positions[p] * d + j);
        dtable[token * d + j] = acc;
    }
}

#define EMBEDDING_ENTRIES(S, T)                                                                        \
    extern "C" __global__ void embed_forward_##S(const int* ids, const T* table, T* out, int d) {     \
        embed_forward<T>(ids, table, out, d);                                                          \
    }                                                                                                  \
    extern "C" __global__ void embed_backward_##S(const int* tokens, const int* starts,                \
                                                  const int* positions, const T* dout, float* dtable, \
                                                  int d) {                                             \
        embed_backward<T>(tokens, starts, positions, dout, dtable, d);                                 \
    }
EMBEDDING_ENTRIES(f32, float)
EMBEDDING_ENTRIES(bf16, bf16)
