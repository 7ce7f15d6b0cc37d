// Fused attention for head_dim 64 in bf16, forward and backward, on tensor cores
// (mma.sync m16n8k16, bf16 inputs, fp32 accumulators): the scores never leave registers, the
// forward pass saves each row's log-sum-exp, and the backward pass recomputes the
// probabilities from it. No atomics: dK and dV are summed by the block owning the keys
// (over query tiles and the group's heads, in order), dQ by a separate pass owning the queries.
// So the same inputs give the same bits.
//
// Layout as attention.cu: token n = b * seq_len + t; q rows q_stride apart, k and v rows
// kv_stride apart (slices of the fused QKV projection; head h at column h * 64), out / dout
// dense [n, heads * 64], lse / delta [n, heads] fp32. Masks: causal within the batch row, and
// doc_start[n] (the row position where token n's document starts; documents are contiguous
// runs of a row, as packing makes them): t sees s when doc_start[t] <= s <= t.
//
// A block is 4 warps; each warp owns 16 rows of a 64-row tile. Fragment layouts follow the PTX
// ISA's m16n8k16 description: g = lane / 4, c = lane % 4; A holds rows g and g + 8 at columns
// 2c, 2c + 1 (+ 8); B holds column g at rows 2c, 2c + 1 (+ 8); C rows g, g + 8 at columns 2c, 2c + 1.

#define HD 64
#define TILE 64
#define LD 72  // shared-memory row stride in bf16 elements (64 + 8 against bank conflicts)

// The two PTX instructions below have stand-ins when the source runs in the CPU emulator of
// the tests (model/tests/cuda_emu/emulator.h); NVRTC never defines SAFEPIPE_EMULATOR.
__device__ __forceinline__ unsigned pack_f32(float lo, float hi) {
#ifdef SAFEPIPE_EMULATOR
    return emu_pack_bf16x2(lo, hi);
#else
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
#endif
}

__device__ __forceinline__ unsigned pack_raw(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

__device__ __forceinline__ void mma(float* d, const unsigned* a, const unsigned* b) {
#ifdef SAFEPIPE_EMULATOR
    emu_mma_m16n8k16(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

// Rows [first, first + 64) of a [*, 64] head slice (rows `stride` apart) into shared memory;
// rows at or past `limit` read as zero.
__device__ __forceinline__ void load_tile(unsigned short (*tile)[LD], const bf16* x, int first, int limit,
                                          long long stride) {
    for (int i = threadIdx.x; i < TILE * 32; i += blockDim.x) {
        const int r = i >> 5, w = i & 31;
        unsigned v = 0;
        if (first + r < limit) v = *(const unsigned*)(x + (long long)(first + r) * stride + w * 2);
        *(unsigned*)&tile[r][w * 2] = v;
    }
}

// A fragments (4 k-steps over the 64 columns) of rows row0 + g, row0 + g + 8 of a head slice,
// straight from global memory; rows at or past `limit` are zero.
__device__ __forceinline__ void load_a(unsigned (*a)[4], const bf16* x, int row0, int limit, long long stride) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        #pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + (i & 1) * 8, col = kk * 16 + c * 2 + (i >> 1) * 8;
            a[kk][i] = row < limit ? *(const unsigned*)(x + (long long)row * stride + col) : 0u;
        }
    }
}

// acc[j] (8 n-tiles of 8 columns) += A (4 k-steps) * B where B[k][n] = tile[n][k] (k contiguous).
__device__ __forceinline__ void mma_rows(float (*acc)[4], const unsigned (*a)[4], unsigned short (*tile)[LD]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int j = 0; j < 8; ++j)
        #pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const unsigned b[2] = {*(const unsigned*)&tile[j * 8 + g][kk * 16 + c * 2],
                                   *(const unsigned*)&tile[j * 8 + g][kk * 16 + 8 + c * 2]};
            mma(acc[j], a[kk], b);
        }
}

// acc[j] (8 n-tiles over the 64 columns) += P * B where P is a 16 x 64 accumulator (p[8][4],
// rounded to bf16 as the A operand) and B[k][n] = tile[k][n] (n contiguous).
__device__ __forceinline__ void mma_cols(float (*acc)[4], const float (*p)[4], unsigned short (*tile)[LD]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const unsigned a[4] = {pack_f32(p[2 * kk][0], p[2 * kk][1]), pack_f32(p[2 * kk][2], p[2 * kk][3]),
                               pack_f32(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                               pack_f32(p[2 * kk + 1][2], p[2 * kk + 1][3])};
        const int k0 = kk * 16 + c * 2;
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int n = j * 8 + g;
            const unsigned b[2] = {pack_raw(tile[k0][n], tile[k0 + 1][n]), pack_raw(tile[k0 + 8][n], tile[k0 + 9][n])};
            mma(acc[j], a, b);
        }
    }
}

// Whether query t (row position) sees key `key`: causal, within its document (starting at
// row position `doc`); queries past the row's end see nothing. The one mask of every kernel here.
__device__ __forceinline__ bool sees(int t, int key, int doc, int seq_len) {
    return t < seq_len && key <= t && key >= doc;
}

// Key/value tile kt of a head into shared memory, between barriers (the previous tile's readers
// are done; every thread sees the new one).
__device__ __forceinline__ void load_kv(unsigned short (*ks)[LD], unsigned short (*vs)[LD], const bf16* kh,
                                        const bf16* vh, int kt, int seq_len, long long kv_stride) {
    __syncthreads();
    load_tile(ks, kh, kt * TILE, seq_len, kv_stride);
    load_tile(vs, vh, kt * TILE, seq_len, kv_stride);
    __syncthreads();
}

__device__ __forceinline__ void zero_acc(float (*acc)[4]) {
    #pragma unroll
    for (int j = 0; j < 8; ++j)
        #pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
}

// Writes a 16 x 64 accumulator (rows row0 + g, + 8) times `factor` as bf16 rows `stride` apart.
__device__ __forceinline__ void store_rows(bf16* x, const float (*acc)[4], int row0, int limit, long long stride,
                                           float factor0, float factor1) {
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    #pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = row0 + g + half * 8;
        if (row >= limit) continue;
        const float f = half ? factor1 : factor0;
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            *(unsigned*)(x + (long long)row * stride + j * 8 + c * 2) =
                pack_f32(acc[j][half * 2] * f, acc[j][half * 2 + 1] * f);
        }
    }
}

// Forward. Grid (ceil(seq_len / 64), heads, batch rows), 128 threads.
extern "C" __global__ void __launch_bounds__(128)
flash_forward_bf16(const bf16* q, const bf16* k, const bf16* v, bf16* out, float* lse, const int* doc_start,
                   int seq_len, int heads, int kv_heads, long long q_stride, long long kv_stride, float scale) {
    __shared__ __align__(16) unsigned short ks[TILE][LD];
    __shared__ __align__(16) unsigned short vs[TILE][LD];
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const long long row0 = (long long)blockIdx.z * seq_len;
    const int first_q = blockIdx.x * TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int q0 = first_q + warp * 16;
    const bf16* qh = q + row0 * q_stride + h * HD;
    const bf16* kh = k + row0 * kv_stride + kvh * HD;
    const bf16* vh = v + row0 * kv_stride + kvh * HD;
    unsigned qa[4][4];
    load_a(qa, qh, q0, seq_len, q_stride);
    const int t[2] = {q0 + g, q0 + g + 8};
    int ds[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) ds[r] = t[r] < seq_len ? doc_start[row0 + t[r]] : 0;
    float o[8][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.f, 0.f};
    zero_acc(o);
    const int last_q = min(seq_len - 1, first_q + TILE - 1);
    for (int kt = doc_start[row0 + first_q] / TILE; kt <= last_q / TILE; ++kt) {
        load_kv(ks, vs, kh, vh, kt, seq_len, kv_stride);
        float s[8][4];
        zero_acc(s);
        mma_rows(s, qa, ks);
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = NEG_INF;
            #pragma unroll
            for (int j = 0; j < 8; ++j)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int key = kt * TILE + j * 8 + c * 2 + e;
                    float& x = s[j][r * 2 + e];
                    x = sees(t[r], key, ds[r], seq_len) ? x * scale : NEG_INF;
                    mx = fmaxf(mx, x);
                }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float m_new = fmaxf(m[r], mx);
            const float alpha = m[r] == NEG_INF ? 0.f : expf(m[r] - m_new);
            float sum = 0.f;
            #pragma unroll
            for (int j = 0; j < 8; ++j)
                #pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float& x = s[j][r * 2 + e];
                    x = x == NEG_INF ? 0.f : expf(x - m_new);
                    sum += x;
                }
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            l[r] = l[r] * alpha + sum;
            m[r] = m_new;
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                o[j][r * 2] *= alpha;
                o[j][r * 2 + 1] *= alpha;
            }
        }
        mma_cols(o, s, vs);
    }
    const long long out_stride = (long long)heads * HD;
    store_rows(out + row0 * out_stride + h * HD, o, q0, seq_len, out_stride, l[0] > 0.f ? 1.f / l[0] : 0.f,
               l[1] > 0.f ? 1.f / l[1] : 0.f);
    if (c == 0)
        #pragma unroll
        for (int r = 0; r < 2; ++r)
            if (t[r] < seq_len) lse[(row0 + t[r]) * heads + h] = m[r] + logf(l[r]);
}

// dQ = scale * sum_s P_ts (dout_t . v_s - delta_t) k_s, per query tile. Grid as the forward pass.
extern "C" __global__ void __launch_bounds__(128)
flash_backward_query_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                          const float* delta, bf16* dq, const int* doc_start, int seq_len, int heads,
                          int kv_heads, long long q_stride, long long kv_stride, float scale) {
    __shared__ __align__(16) unsigned short ks[TILE][LD];
    __shared__ __align__(16) unsigned short vs[TILE][LD];
    const int h = blockIdx.y, kvh = h / (heads / kv_heads);
    const long long row0 = (long long)blockIdx.z * seq_len;
    const int first_q = blockIdx.x * TILE;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int q0 = first_q + warp * 16;
    const long long out_stride = (long long)heads * HD;
    const bf16* kh = k + row0 * kv_stride + kvh * HD;
    const bf16* vh = v + row0 * kv_stride + kvh * HD;
    unsigned qa[4][4], da[4][4];
    load_a(qa, q + row0 * q_stride + h * HD, q0, seq_len, q_stride);
    load_a(da, dout + row0 * out_stride + h * HD, q0, seq_len, out_stride);
    const int t[2] = {q0 + g, q0 + g + 8};
    int ds[2];
    float row_lse[2], row_delta[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const bool in = t[r] < seq_len;
        ds[r] = in ? doc_start[row0 + t[r]] : 0;
        row_lse[r] = in ? lse[(row0 + t[r]) * heads + h] : 0.f;
        row_delta[r] = in ? delta[(row0 + t[r]) * heads + h] : 0.f;
    }
    float acc[8][4];
    zero_acc(acc);
    const int last_q = min(seq_len - 1, first_q + TILE - 1);
    for (int kt = doc_start[row0 + first_q] / TILE; kt <= last_q / TILE; ++kt) {
        load_kv(ks, vs, kh, vh, kt, seq_len, kv_stride);
        float s[8][4], dp[8][4];
        zero_acc(s);
        zero_acc(dp);
        mma_rows(s, qa, ks);
        mma_rows(dp, da, vs);
        #pragma unroll
        for (int j = 0; j < 8; ++j)
            #pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, key = kt * TILE + j * 8 + c * 2 + (e & 1);
                const float p = sees(t[r], key, ds[r], seq_len) ? expf(s[j][e] * scale - row_lse[r]) : 0.f;
                s[j][e] = p * (dp[j][e] - row_delta[r]);  // dS
            }
        mma_cols(acc, s, ks);
    }
    store_rows(dq + row0 * q_stride + h * HD, acc, q0, seq_len, q_stride, scale, scale);
}

// dK, dV per key tile: each warp owns 16 keys and sums over the query tiles that see them and
// the group's query heads, in order. Grid (ceil(seq_len / 64), kv_heads, batch rows).
extern "C" __global__ void __launch_bounds__(128)
flash_backward_key_bf16(const bf16* q, const bf16* k, const bf16* v, const bf16* dout, const float* lse,
                        const float* delta, bf16* dk, bf16* dv, const int* doc_start, int seq_len, int heads,
                        int kv_heads, long long q_stride, long long kv_stride, float scale) {
    __shared__ __align__(16) unsigned short qs[TILE][LD];
    __shared__ __align__(16) unsigned short dos[TILE][LD];
    __shared__ float lse_s[TILE], delta_s[TILE];
    __shared__ int ds_s[TILE];
    const int kvh = blockIdx.y, group = heads / kv_heads;
    const long long row0 = (long long)blockIdx.z * seq_len;
    const int first_k = blockIdx.x * TILE, last_k = min(seq_len - 1, first_k + TILE - 1);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int k0 = first_k + warp * 16;
    const long long out_stride = (long long)heads * HD;
    unsigned ka[4][4], va[4][4];
    load_a(ka, k + row0 * kv_stride + kvh * HD, k0, seq_len, kv_stride);
    load_a(va, v + row0 * kv_stride + kvh * HD, k0, seq_len, kv_stride);
    const int key[2] = {k0 + g, k0 + g + 8};
    float dk_acc[8][4], dv_acc[8][4];
    zero_acc(dk_acc);
    zero_acc(dv_acc);
    for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
        for (int qt = first_k / TILE; qt * TILE < seq_len; ++qt) {
            // Documents start in order: once a tile's first query starts its document after
            // this tile's last key, no later query sees any of these keys.
            if (doc_start[row0 + qt * TILE] > last_k) break;
            __syncthreads();
            load_tile(qs, q + row0 * q_stride + h * HD, qt * TILE, seq_len, q_stride);
            load_tile(dos, dout + row0 * out_stride + h * HD, qt * TILE, seq_len, out_stride);
            for (int i = threadIdx.x; i < TILE; i += blockDim.x) {
                const int t = qt * TILE + i;
                const bool in = t < seq_len;
                lse_s[i] = in ? lse[(row0 + t) * heads + h] : 0.f;
                delta_s[i] = in ? delta[(row0 + t) * heads + h] : 0.f;
                ds_s[i] = in ? doc_start[row0 + t] : seq_len;
            }
            __syncthreads();
            float s[8][4], dp[8][4];
            zero_acc(s);
            zero_acc(dp);
            mma_rows(s, ka, qs);   // S^T: keys x queries
            mma_rows(dp, va, dos);  // dP^T
            #pragma unroll
            for (int j = 0; j < 8; ++j)
                #pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e >> 1, qi = j * 8 + c * 2 + (e & 1), t = qt * TILE + qi;
                    const float p = sees(t, key[r], ds_s[qi], seq_len) ? expf(s[j][e] * scale - lse_s[qi]) : 0.f;
                    s[j][e] = p;                             // P^T
                    dp[j][e] = p * (dp[j][e] - delta_s[qi]);  // dS^T
                }
            mma_cols(dv_acc, s, dos);
            mma_cols(dk_acc, dp, qs);
        }
    }
    store_rows(dk + row0 * kv_stride + kvh * HD, dk_acc, k0, seq_len, kv_stride, scale, scale);
    store_rows(dv + row0 * kv_stride + kvh * HD, dv_acc, k0, seq_len, kv_stride, 1.f, 1.f);
}
