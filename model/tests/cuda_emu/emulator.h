// A CPU emulator of the part of CUDA our kernels use, so their sources run here (no GPU) in
// model/tests/cuda_emulation.rs: a block's threads are real threads (std::thread), blocks run one
// after another on the same threads, __syncthreads is a barrier of the block, warp shuffles and mma.sync exchange
// through per-warp staging with a barrier of the warp, and mma.sync m16n8k16 (bf16 in, fp32
// accumulate) is decoded from the fragments by the PTX ISA's layout. It checks the kernels'
// logic (indexing, masks, tiling, synchronisation), not the hardware's numerics or speed.
#pragma once
#include <array>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>

#define SAFEPIPE_EMULATOR 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

struct EmuBlock {
    std::unique_ptr<std::barrier<>> block;
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<unsigned char> dynamic_shared;
    // Per-warp staging for shuffles (as 8-byte words) and mma fragments.
    std::vector<std::array<uint64_t, 32>> shuffle;
    std::vector<std::array<std::array<unsigned, 4>, 32>> frag_a;
    std::vector<std::array<std::array<unsigned, 2>, 32>> frag_b;
    std::vector<std::array<std::array<float, 4>, 32>> frag_c;
};
inline EmuBlock emu;

inline void __syncthreads() { emu.block->arrive_and_wait(); }
inline int emu_lane() { return threadIdx.x & 31; }
inline int emu_warp() { return threadIdx.x >> 5; }
inline void emu_warp_sync() { emu.warps[emu_warp()]->arrive_and_wait(); }

template <typename T>
T* emu_dynamic_shared() {
    return reinterpret_cast<T*>(emu.dynamic_shared.data());
}

template <typename T>
T __shfl_xor_sync(unsigned, T v, int offset) {
    static_assert(sizeof(T) <= 8);
    uint64_t word = 0;
    std::memcpy(&word, &v, sizeof(T));
    emu.shuffle[emu_warp()][emu_lane()] = word;
    emu_warp_sync();
    uint64_t other = emu.shuffle[emu_warp()][emu_lane() ^ offset];
    emu_warp_sync();
    T out;
    std::memcpy(&out, &other, sizeof(T));
    return out;
}

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
using std::min;
using std::max;

// float -> bf16 bits, round to nearest even (what cvt.rn.bf16 does).
inline unsigned short emu_bf16(float x) {
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float emu_from_bf16(unsigned short b) { return __uint_as_float(((unsigned)b) << 16); }

// cvt.rn.bf16x2.f32 d, hi, lo.
inline unsigned emu_pack_bf16x2(float lo, float hi) { return (unsigned)emu_bf16(lo) | ((unsigned)emu_bf16(hi) << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, b, d: every lane gives its
// fragments, every lane gets its four results (layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16").
inline void emu_mma_m16n8k16(float* d, const unsigned* a, const unsigned* b) {
    const int w = emu_warp(), lane = emu_lane();
    for (int i = 0; i < 4; ++i) emu.frag_a[w][lane][i] = a[i];
    for (int i = 0; i < 2; ++i) emu.frag_b[w][lane][i] = b[i];
    for (int i = 0; i < 4; ++i) emu.frag_c[w][lane][i] = d[i];
    emu_warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, c = l & 3;
        for (int i = 0; i < 8; ++i) {
            const unsigned short bits = (unsigned short)(emu.frag_a[w][l][i / 2] >> (16 * (i % 2)));
            const int row = g + ((i < 2 || (i >= 4 && i < 6)) ? 0 : 8);
            const int col = c * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = emu_from_bf16(bits);
        }
        for (int i = 0; i < 4; ++i) {
            const unsigned short bits = (unsigned short)(emu.frag_b[w][l][i / 2] >> (16 * (i % 2)));
            const int k = c * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[k][g] = emu_from_bf16(bits);
        }
    }
    const int g = lane >> 2, c = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = g + (i >= 2 ? 8 : 0), col = c * 2 + (i & 1);
        float acc = emu.frag_c[w][lane][i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        out[i] = acc;
    }
    emu_warp_sync();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Runs `kernel` (a call of an extern "C" kernel with its arguments) on `grid` x `block`: one
// thread per thread of a block, reused for every block in turn (a barrier between blocks).
inline void emu_launch(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned threads = block.x, warps = (threads + 31) / 32;
    emu.block = std::make_unique<std::barrier<>>(threads);
    emu.warps.clear();
    for (unsigned i = 0; i < warps; ++i) emu.warps.push_back(std::make_unique<std::barrier<>>(32));
    emu.dynamic_shared.assign(shared_bytes + 16, 0);
    emu.shuffle.assign(warps, {});
    emu.frag_a.assign(warps, {});
    emu.frag_b.assign(warps, {});
    emu.frag_c.assign(warps, {});
    std::vector<std::thread> pool;
    for (unsigned t = 0; t < threads; ++t)
        pool.emplace_back([&, t] {
            threadIdx = dim3{t, 0, 0};
            for (unsigned z = 0; z < grid.z; ++z)
                for (unsigned y = 0; y < grid.y; ++y)
                    for (unsigned x = 0; x < grid.x; ++x) {
                        blockIdx = dim3{x, y, z};
                        kernel();
                        emu.block->arrive_and_wait();  // the block is done before the next starts
                    }
        });
    for (auto& th : pool) th.join();
}
