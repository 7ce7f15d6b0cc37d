// Runs the attention kernels' CUDA sources in the CPU emulator (emulator.h): the fused
// tensor-core kernels (bf16) against the reference kernels (fp32 storage, the same
// bf16-rounded inputs), and the reference forward pass against a plain double-precision one.
// Shapes: 2 batch rows of 70 tokens (two 64-token tiles, the second partial), 4 query heads over
// 2 key/value heads (GQA), head_dim 64, q/k/v as slices of one fused QKV buffer, documents that
// start mid-tile and across a tile boundary. Prints one line per comparison, then "ok" or "FAIL".
#include "emulator.h"
#include "kernels.inc"
#include <cstdio>
#include <random>

static double rel_error(const std::vector<float>& got, const std::vector<double>& want, const char* name, double tol,
                        bool& ok) {
    double err = 0, ref = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs(got[i] - want[i]);
        err = std::isnan(e) ? INFINITY : std::max(err, e);
        ref = std::max(ref, std::fabs(want[i]));
    }
    const double rel = err / std::max(ref, 1e-30);
    const bool pass = rel <= tol;
    ok = ok && pass;
    std::printf("%-34s max error %.3e of max %.3e: relative %.3e (tolerance %.0e) %s\n", name, err, ref, rel, tol,
                pass ? "ok" : "FAIL");
    return rel;
}

static std::vector<double> widen(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }
static std::vector<float> narrow(const std::vector<bf16>& x) {
    std::vector<float> out(x.size());
    for (size_t i = 0; i < x.size(); ++i) out[i] = emu_from_bf16(x[i].bits);
    return out;
}
// Every `width` columns of each row at column `offset` of a [n, stride] buffer.
static std::vector<float> columns(const std::vector<float>& x, int n, int stride, int offset, int width) {
    std::vector<float> out;
    for (int r = 0; r < n; ++r)
        for (int j = 0; j < width; ++j) out.push_back(x[(size_t)r * stride + offset + j]);
    return out;
}

int main() {
    const int rows = 2, seq = 70, heads = 4, kvh = 2, hd = 64;
    const int n = rows * seq, d = heads * hd, kv = kvh * hd, w = d + 2 * kv;
    const float scale = 1.f / std::sqrt((float)hd);
    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.f, 1.f);
    auto random_bf16 = [&](size_t len, std::vector<float>& f32, std::vector<bf16>& b16) {
        f32.resize(len);
        b16.resize(len);
        for (size_t i = 0; i < len; ++i) {
            b16[i].bits = emu_bf16(normal(rng));
            f32[i] = emu_from_bf16(b16[i].bits);
        }
    };
    std::vector<float> qkv, dout;
    std::vector<bf16> qkv16, dout16;
    random_bf16((size_t)n * w, qkv, qkv16);
    random_bf16((size_t)n * d, dout, dout16);
    // Documents: row 0 splits at 20 and 50 (inside the first tile), row 1 at 66 (in the second).
    std::vector<int> segments(n), doc_start(n);
    for (int i = 0; i < n; ++i) {
        const int t = i % seq, b = i / seq;
        segments[i] = b == 0 ? (t >= 20) + (t >= 50) : 10 + (t >= 66);
        doc_start[i] = (t == 0 || segments[i] != segments[i - 1]) ? t : doc_start[i - 1];
    }
    bool ok = true;

    // Reference kernels, fp32 storage.
    std::vector<float> out(n * d), lse(n * heads), delta(n * heads), dqkv((size_t)n * w, 0.f);
    const float *q = qkv.data(), *k = qkv.data() + d, *v = qkv.data() + d + kv;
    emu_launch({(unsigned)n, (unsigned)heads, 1}, {128, 1, 1}, seq * 4, [&] {
        attention_forward_f32(q, k, v, out.data(), lse.data(), segments.data(), seq, heads, kvh, hd, w, w, scale);
    });
    emu_launch({(unsigned)n, 1, 1}, {64, 1, 1}, 0, [&] { attention_delta_f32(out.data(), dout.data(), delta.data(), heads, hd); });
    emu_launch({(unsigned)n, (unsigned)heads, 1}, {64, 1, 1}, 0, [&] {
        attention_backward_query_f32(q, k, v, dout.data(), lse.data(), delta.data(), dqkv.data(), segments.data(), seq,
                                     heads, kvh, hd, w, w, scale);
    });
    emu_launch({(unsigned)n, (unsigned)kvh, 1}, {64, 1, 1}, 0, [&] {
        attention_backward_key_f32(q, k, v, dout.data(), lse.data(), delta.data(), dqkv.data() + d, dqkv.data() + d + kv,
                                   segments.data(), seq, heads, kvh, hd, w, w, scale);
    });

    // The reference forward pass against plain double precision.
    std::vector<double> want(n * d, 0.0);
    for (int t = 0; t < n; ++t)
        for (int h = 0; h < heads; ++h) {
            const int g = h / (heads / kvh), start = t - t % seq;
            std::vector<double> p;
            double mx = -INFINITY;
            for (int s = start; s <= t; ++s) {
                double dot = 0;
                for (int j = 0; j < hd; ++j) dot += (double)qkv[(size_t)t * w + h * hd + j] * qkv[(size_t)s * w + d + g * hd + j];
                const double x = segments[s] == segments[t] ? dot * scale : -INFINITY;
                p.push_back(x);
                mx = std::max(mx, x);
            }
            double sum = 0;
            for (auto& x : p) sum += (x = std::exp(x - mx));
            for (int j = 0; j < hd; ++j) {
                double acc = 0;
                for (int s = start; s <= t; ++s) acc += p[s - start] * qkv[(size_t)s * w + d + kv + g * hd + j];
                want[(size_t)t * d + h * hd + j] = acc / sum;
            }
        }
    rel_error(out, want, "reference forward vs double", 1e-5, ok);

    // Fused kernels, bf16 storage.
    std::vector<bf16> out16(n * d), dqkv16((size_t)n * w);
    std::vector<float> lse16(n * heads), delta16(n * heads);
    const bf16 *q16 = qkv16.data(), *k16 = qkv16.data() + d, *v16 = qkv16.data() + d + kv;
    const unsigned tiles = (seq + 63) / 64;
    emu_launch({tiles, (unsigned)heads, (unsigned)rows}, {128, 1, 1}, 0, [&] {
        flash_forward_bf16(q16, k16, v16, out16.data(), lse16.data(), doc_start.data(), seq, heads, kvh, w, w, scale);
    });
    emu_launch({(unsigned)n, 1, 1}, {64, 1, 1}, 0, [&] { attention_delta_bf16(out16.data(), dout16.data(), delta16.data(), heads, hd); });
    emu_launch({tiles, (unsigned)heads, (unsigned)rows}, {128, 1, 1}, 0, [&] {
        flash_backward_query_bf16(q16, k16, v16, dout16.data(), lse16.data(), delta16.data(), dqkv16.data(), doc_start.data(),
                                  seq, heads, kvh, w, w, scale);
    });
    emu_launch({tiles, (unsigned)kvh, (unsigned)rows}, {128, 1, 1}, 0, [&] {
        flash_backward_key_bf16(q16, k16, v16, dout16.data(), lse16.data(), delta16.data(), dqkv16.data() + d,
                                dqkv16.data() + d + kv, doc_start.data(), seq, heads, kvh, w, w, scale);
    });
    const std::vector<float> dflash = narrow(dqkv16);
    rel_error(narrow(out16), widen(out), "flash forward", 1e-2, ok);
    rel_error(lse16, widen(lse), "flash log-sum-exp", 1e-3, ok);
    rel_error(columns(dflash, n, w, 0, d), widen(columns(dqkv, n, w, 0, d)), "flash dq", 1.5e-2, ok);
    rel_error(columns(dflash, n, w, d, kv), widen(columns(dqkv, n, w, d, kv)), "flash dk", 1.5e-2, ok);
    rel_error(columns(dflash, n, w, d + kv, kv), widen(columns(dqkv, n, w, d + kv, kv)), "flash dv", 1.5e-2, ok);
    std::printf("%s\n", ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}
