// Runs the other kernels' CUDA sources in the CPU emulator (emulator.h) against plain double
// precision, in fp32 storage (bf16 storage is the same code with another load/store): the
// embedding gather and its grouped backward, fused residual + RMSNorm forward and backward with
// the column sum, RoPE and its transpose, SwiGLU forward and backward, the fused cross-entropy
// (loss, gradient in place, padding, masked rows), the global norm's two passes, AdamW.
// Prints one line per comparison, then "ok" or "FAIL".
#include "emulator.h"
#include "kernels.inc"
#include <cstdio>
#include <random>

static bool ok = true;

static void check(const char* name, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double err = 0, ref = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double e = std::fabs(got[i] - want[i]);
        err = std::isnan(e) ? INFINITY : std::max(err, e);
        ref = std::max(ref, std::fabs(want[i]));
    }
    const double rel = got.size() == want.size() ? err / std::max(ref, 1e-30) : INFINITY;
    const bool pass = rel <= tol;
    ok = ok && pass;
    std::printf("%-28s relative error %.3e (tolerance %.0e) %s\n", name, rel, tol, pass ? "ok" : "FAIL");
}

int main() {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.f, 1.f);
    auto random = [&](size_t len, float scale = 1.f) {
        std::vector<float> x(len);
        for (auto& v : x) v = scale * normal(rng);
        return x;
    };
    const int n = 37, d = 96, f = 40, vocab = 50;

    // Embedding: gather, then the backward pass over positions grouped by token.
    std::vector<int> ids(n);
    for (int i = 0; i < n; ++i) ids[i] = (i * 7 + i / 3) % vocab;
    auto table = random((size_t)vocab * d);
    std::vector<float> gathered((size_t)n * d);
    emu_launch({(unsigned)n, 1, 1}, {64, 1, 1}, 0, [&] { embed_forward_f32(ids.data(), table.data(), gathered.data(), d); });
    std::vector<double> want((size_t)n * d);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < d; ++j) want[(size_t)i * d + j] = table[(size_t)ids[i] * d + j];
    check("embed_forward", gathered, want, 0);
    auto dout = random((size_t)n * d);
    std::vector<int> tokens, starts{0}, positions;
    for (int t = 0; t < vocab; ++t) {
        bool any = false;
        for (int p = 0; p < n; ++p)
            if (ids[p] == t) positions.push_back(p), any = true;
        if (any) tokens.push_back(t), starts.push_back((int)positions.size());
    }
    std::vector<float> dtable((size_t)vocab * d, 0.5f);
    emu_launch({(unsigned)tokens.size(), 1, 1}, {64, 1, 1}, 0, [&] {
        embed_backward_f32(tokens.data(), starts.data(), positions.data(), dout.data(), dtable.data(), d);
    });
    want.assign((size_t)vocab * d, 0.5);
    for (int p = 0; p < n; ++p)
        for (int j = 0; j < d; ++j) want[(size_t)ids[p] * d + j] += dout[(size_t)p * d + j];
    check("embed_backward", dtable, want, 1e-6);

    // Residual add + RMSNorm, forward and backward (rows per block 8: 5 blocks, the last partial).
    auto x = random((size_t)n * d), delta = random((size_t)n * d), weight = random(d), dy = random((size_t)n * d);
    std::vector<float> y((size_t)n * d), rstd(n);
    const float eps = 1e-5f;
    const auto x0 = x;
    emu_launch({(unsigned)n, 1, 1}, {64, 1, 1}, 0, [&] { rmsnorm_forward_f32(x.data(), delta.data(), weight.data(), y.data(), rstd.data(), d, eps); });
    std::vector<double> want_y((size_t)n * d), want_dx((size_t)n * d), want_dw(d, 0.0), xs((size_t)n * d), r(n);
    for (int i = 0; i < n; ++i) {
        double ss = 0;
        for (int j = 0; j < d; ++j) {
            xs[(size_t)i * d + j] = (double)(float)(x0[(size_t)i * d + j] + delta[(size_t)i * d + j]);
            ss += xs[(size_t)i * d + j] * xs[(size_t)i * d + j];
        }
        r[i] = 1.0 / std::sqrt(ss / d + eps);
        for (int j = 0; j < d; ++j) want_y[(size_t)i * d + j] = xs[(size_t)i * d + j] * r[i] * weight[j];
    }
    check("rmsnorm_forward (residual add)", x, xs, 0);
    check("rmsnorm_forward", y, want_y, 1e-5);
    std::vector<float> dresid((size_t)n * d, 0.25f), partial((size_t)5 * d), dw(d, 1.f);
    emu_launch({5, 1, 1}, {64, 1, 1}, 0, [&] {
        rmsnorm_backward_f32(x.data(), weight.data(), rstd.data(), dy.data(), dresid.data(), partial.data(), n, 8, d);
    });
    emu_launch({1, 1, 1}, {128, 1, 1}, 0, [&] { column_sum(partial.data(), dw.data(), 5, d, 1); });
    for (int i = 0; i < n; ++i) {
        double mean = 0;
        for (int j = 0; j < d; ++j) mean += dy[(size_t)i * d + j] * weight[j] * xs[(size_t)i * d + j] * r[i];
        mean /= d;
        for (int j = 0; j < d; ++j) {
            const double xhat = xs[(size_t)i * d + j] * r[i];
            want_dx[(size_t)i * d + j] = 0.25 + r[i] * (dy[(size_t)i * d + j] * weight[j] - xhat * mean);
            want_dw[j] += dy[(size_t)i * d + j] * xhat;
        }
    }
    for (auto& v : want_dw) v += 1.0;
    check("rmsnorm_backward", dresid, want_dx, 1e-5);
    check("column_sum (weight gradient)", dw, want_dw, 1e-5);

    // RoPE on 2 heads of 32 inside rows of stride 80, positions n % seq (seq 16), and back.
    const int seq = 16, hd = 32, half = 16, stride = 80;
    std::vector<float> cos_t(seq * half), sin_t(seq * half);
    for (int p = 0; p < seq; ++p)
        for (int j = 0; j < half; ++j) {
            const double a = p * std::pow(10000.0, -2.0 * j / hd);
            cos_t[p * half + j] = (float)std::cos(a);
            sin_t[p * half + j] = (float)std::sin(a);
        }
    auto rows = random((size_t)n * stride), rotated = rows;
    emu_launch({(unsigned)n, 1, 1}, {32, 1, 1}, 0, [&] { rope_f32(rotated.data(), cos_t.data(), sin_t.data(), 2, hd, seq, stride, 1.f); });
    want.assign(rows.begin(), rows.end());
    for (int i = 0; i < n; ++i)
        for (int h = 0; h < 2; ++h)
            for (int j = 0; j < half; ++j) {
                const size_t base = (size_t)i * stride + h * hd;
                const double c = cos_t[(i % seq) * half + j], s = sin_t[(i % seq) * half + j];
                want[base + j] = rows[base + j] * c - rows[base + j + half] * s;
                want[base + j + half] = rows[base + j + half] * c + rows[base + j] * s;
            }
    check("rope", rotated, want, 1e-6);
    emu_launch({(unsigned)n, 1, 1}, {32, 1, 1}, 0, [&] { rope_f32(rotated.data(), cos_t.data(), sin_t.data(), 2, hd, seq, stride, -1.f); });
    check("rope, then its transpose", rotated, std::vector<double>(rows.begin(), rows.end()), 1e-6);

    // SwiGLU on a fused [n, 2f] gate/up buffer.
    auto gu = random((size_t)n * 2 * f), dh = random((size_t)n * f);
    std::vector<float> h((size_t)n * f), dgu((size_t)n * 2 * f);
    emu_launch({3, 1, 1}, {64, 1, 1}, 0, [&] { swiglu_forward_f32(gu.data(), h.data(), n, f); });
    emu_launch({3, 1, 1}, {64, 1, 1}, 0, [&] { swiglu_backward_f32(gu.data(), dh.data(), dgu.data(), n, f); });
    std::vector<double> want_h((size_t)n * f), want_dgu((size_t)n * 2 * f);
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < f; ++j) {
            const double g = gu[(size_t)i * 2 * f + j], u = gu[(size_t)i * 2 * f + f + j], s = 1 / (1 + std::exp(-g));
            want_h[(size_t)i * f + j] = g * s * u;
            want_dgu[(size_t)i * 2 * f + j] = dh[(size_t)i * f + j] * u * s * (1 + g * (1 - s));
            want_dgu[(size_t)i * 2 * f + f + j] = dh[(size_t)i * f + j] * g * s;
        }
    check("swiglu_forward", h, want_h, 1e-6);
    check("swiglu_backward", dgu, want_dgu, 1e-6);

    // Cross-entropy over 45 of 64 columns (the rest padding), every third row masked.
    const int cv = 45, cs = 64;
    auto logits = random((size_t)n * cs, 3.f);
    const auto original = logits;
    std::vector<int> targets(n);
    std::vector<float> weights(n), losses(n, -1.f);
    for (int i = 0; i < n; ++i) targets[i] = (i * 13) % cv, weights[i] = i % 3 == 2 ? 0.f : 0.04f;
    emu_launch({(unsigned)n, 1, 1}, {64, 1, 1}, 0, [&] { cross_entropy_f32(logits.data(), targets.data(), weights.data(), losses.data(), cv, cs); });
    std::vector<double> want_loss(n), want_grad((size_t)n * cs, 0.0);
    for (int i = 0; i < n; ++i) {
        double mx = -INFINITY, sum = 0;
        for (int j = 0; j < cv; ++j) mx = std::max(mx, (double)original[(size_t)i * cs + j]);
        for (int j = 0; j < cv; ++j) sum += std::exp(original[(size_t)i * cs + j] - mx);
        const double lse = mx + std::log(sum);
        want_loss[i] = weights[i] > 0 ? lse - original[(size_t)i * cs + targets[i]] : 0;
        for (int j = 0; j < cv; ++j)
            want_grad[(size_t)i * cs + j] = weights[i] * (std::exp(original[(size_t)i * cs + j] - lse) - (j == targets[i]));
    }
    check("cross_entropy (loss)", losses, want_loss, 1e-5);
    check("cross_entropy (gradient)", logits, want_grad, 1e-5);

    // The global norm: fixed-grid partial sums, then one block.
    auto grads = random(10007, 0.1f);
    std::vector<double> partials(16), total(1);
    emu_launch({16, 1, 1}, {64, 1, 1}, 0, [&] { sum_squares(grads.data(), (long long)grads.size(), partials.data()); });
    emu_launch({1, 1, 1}, {32, 1, 1}, 0, [&] { sum_partials(partials.data(), 16, total.data(), 0); });
    double ss = 0;
    for (float g : grads) ss += (double)g * g;
    // (compared as a float: the check's own rounding is 6e-8)
    check("sum_squares + sum_partials", {(float)total[0]}, {ss}, 1e-7);

    // AdamW (decay 0.1, clip factor 0.5) with the bf16 copy.
    auto p = random(1000), m = random(1000, 0.01f), v = random(1000, 0.01f);
    for (auto& e : v) e = e * e;
    const auto p0 = p, m0 = m, v0 = v;
    std::vector<bf16> p16(1000);
    const double lr = 3e-4, b1 = 0.9, b2 = 0.95, c1 = 1 - std::pow(b1, 3), c2 = 1 - std::pow(b2, 3), weps = 1e-8, decay = 0.1;
    emu_launch({2, 1, 1}, {64, 1, 1}, 0, [&] {
        adamw(p.data(), grads.data(), m.data(), v.data(), p16.data(), 1000, 0.5f, lr, b1, b2, c1, c2, weps, decay);
    });
    std::vector<double> want_p(1000), want_16(1000);
    std::vector<float> got_16(1000);
    for (int i = 0; i < 1000; ++i) {
        const double g = (double)(grads[i] * 0.5f);
        const double mi = b1 * m0[i] + (1 - b1) * g, vi = b2 * v0[i] + (1 - b2) * g * g;
        want_p[i] = (double)(float)(p0[i] - lr * ((mi / c1) / (std::sqrt(vi / c2) + weps) + decay * p0[i]));
        want_16[i] = emu_from_bf16(emu_bf16((float)want_p[i]));
        got_16[i] = emu_from_bf16(p16[i].bits);
    }
    check("adamw (weights, exact)", p, want_p, 0);
    check("adamw (bf16 copy, exact)", got_16, want_16, 0);

    std::printf("%s\n", ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}
