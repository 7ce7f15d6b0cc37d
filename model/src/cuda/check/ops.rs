//! Checks of the elementwise kernels, the fused cross-entropy and the optimiser.

use super::{Bench, KernelCheck, ROWS, SEQ, compare, f64s, from_bf16, launch, shape, to_bf16};
use crate::cuda::{CudaError, Gpu, Precision};
use crate::llama::CpuModel;
use crate::llama::cpu::{rmsnorm, rmsnorm_backward, silu, silu_grad};
use crate::rng::Normal;
use crate::train::AdamStep;

/// Embedding, RMSNorm, RoPE and SwiGLU, forward and backward.
pub(super) fn elementwise(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
    let cfg = shape();
    let (n, d, f) = (ROWS * SEQ, cfg.hidden_size, cfg.intermediate_size);
    let mut rng = Normal::new(7);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.sample() as f32).collect() };
    let (gpu, d_i) = (b.gpu, d as i32);
    let mut out = Vec::new();

    // Embedding gather and its token-grouped backward.
    let vocab = 50usize;
    let ids: Vec<i32> = (0..n).map(|i| ((i * 7 + i / 5) % vocab) as i32).collect();
    let table = b.stored(&random(vocab * d));
    let (ids_d, table_d) = (b.raw(&ids)?, b.upload(&table)?);
    let out_d = b.upload(&vec![0.0; n * d])?;
    launch!(gpu, b.name("embed_forward"), (n, 1), 128, 0; ids_d.ptr(), table_d.ptr(), out_d.ptr(), d_i)?;
    let want: Vec<f64> = ids
        .iter()
        .flat_map(|&t| f64s(&table[t as usize * d..(t as usize + 1) * d]))
        .collect();
    out.push(b.compare(&b.name("embed_forward"), &b.download(&out_d)?, &want));

    let dout = b.stored(&random(n * d));
    let mut groups: Vec<(i32, Vec<i32>)> = Vec::new();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&p| (ids[p], p));
    for p in order {
        match groups.last_mut() {
            Some((t, ps)) if *t == ids[p] => ps.push(p as i32),
            _ => groups.push((ids[p], vec![p as i32])),
        }
    }
    let tokens: Vec<i32> = groups.iter().map(|g| g.0).collect();
    let mut starts = vec![0i32];
    for g in &groups {
        starts.push(starts.last().copied().unwrap_or(0) + g.1.len() as i32);
    }
    let positions: Vec<i32> = groups.iter().flat_map(|g| g.1.clone()).collect();
    let (tokens_d, starts_d, positions_d) = (b.raw(&tokens)?, b.raw(&starts)?, b.raw(&positions)?);
    let dout_d = b.upload(&dout)?;
    let dtable_d = b.raw(&vec![0f32; vocab * d])?;
    launch!(gpu, b.name("embed_backward"), (tokens.len(), 1), 128, 0;
        tokens_d.ptr(), starts_d.ptr(), positions_d.ptr(), dout_d.ptr(), dtable_d.ptr(), d_i)?;
    let mut want = vec![0f64; vocab * d];
    for (p, &t) in ids.iter().enumerate() {
        for j in 0..d {
            want[t as usize * d + j] += f64::from(dout[p * d + j]);
        }
    }
    out.push(b.compare(&b.name("embed_backward"), &b.fetch::<f32>(&dtable_d)?, &want));

    // RMSNorm with the residual add, forward; then backward into a residual gradient.
    let (x, delta, w) = (b.stored(&random(n * d)), b.stored(&random(n * d)), b.stored(&random(d)));
    let (x_d, delta_d, w_d, y_d) = (
        b.upload(&x)?,
        b.upload(&delta)?,
        b.upload(&w)?,
        b.upload(&vec![0.0; n * d])?,
    );
    let rstd_d = b.raw(&vec![0f32; n])?;
    let eps = 1e-5f32;
    launch!(gpu, b.name("rmsnorm_forward"), (n, 1), 256, 0;
        x_d.ptr(), delta_d.ptr(), w_d.ptr(), y_d.ptr(), rstd_d.ptr(), d_i, eps)?;
    let summed = b.stored(&x.iter().zip(&delta).map(|(a, c)| a + c).collect::<Vec<_>>());
    let (want_y, want_r) = rmsnorm(&f64s(&summed), &f64s(&w), d, f64::from(eps));
    out.push(b.compare(&b.name("rmsnorm_forward"), &b.download(&y_d)?, &want_y));

    let dy = b.stored(&random(n * d));
    let dy_d = b.upload(&dy)?;
    let dresid_d = b.upload(&vec![0.0; n * d])?;
    let rows_per_block = 8usize;
    let blocks = n.div_ceil(rows_per_block);
    let partial_d = b.raw(&vec![0f32; blocks * d])?;
    let dw_d = b.raw(&vec![0f32; d])?;
    launch!(gpu, b.name("rmsnorm_backward"), (blocks, 1), 256, 0;
        x_d.ptr(), w_d.ptr(), rstd_d.ptr(), dy_d.ptr(), dresid_d.ptr(), partial_d.ptr(), n as i32, rows_per_block as i32, d_i)?;
    launch!(gpu, "column_sum", (d.div_ceil(256), 1), 256, 0; partial_d.ptr(), dw_d.ptr(), blocks as i32, d_i, 0i32)?;
    let mut want_dw = vec![0f64; d];
    let want_dx = rmsnorm_backward(&f64s(&summed), &want_r, &f64s(&w), &f64s(&dy), &mut want_dw, d);
    out.push(b.compare(&b.name("rmsnorm_backward"), &b.download(&dresid_d)?, &want_dx));
    out.push(b.compare(
        "column_sum (rmsnorm weight gradient)",
        &b.fetch::<f32>(&dw_d)?,
        &want_dw,
    ));

    // RoPE on q (heads x 64), forward then the transpose, against the CPU's.
    let model = CpuModel::new(cfg.clone()).map_err(CudaError::Driver)?;
    let (hd, heads) = (cfg.head_dim(), cfg.num_attention_heads);
    let half = hd / 2;
    let (mut cos, mut sin) = (vec![0f32; SEQ * half], vec![0f32; SEQ * half]);
    for p in 0..SEQ {
        for j in 0..half {
            let freq = cfg.rope_theta.powf(-2.0 * j as f64 / hd as f64);
            let (sn, cs) = (p as f64 * freq).sin_cos();
            cos[p * half + j] = cs as f32;
            sin[p * half + j] = sn as f32;
        }
    }
    let (cos_d, sin_d) = (b.raw(&cos)?, b.raw(&sin)?);
    for sign in [1f32, -1f32] {
        let q = b.stored(&random(n * d));
        let q_d = b.upload(&q)?;
        launch!(gpu, b.name("rope"), (n, 1), 128, 0;
            q_d.ptr(), cos_d.ptr(), sin_d.ptr(), heads as i32, hd as i32, SEQ as i32, d as i64, sign)?;
        let mut want = f64s(&q);
        model.rope(&mut want, d, SEQ, sign < 0.0);
        out.push(b.compare(
            &format!("{}{}", b.name("rope"), if sign < 0.0 { " (transpose)" } else { "" }),
            &b.download(&q_d)?,
            &want,
        ));
    }

    // SwiGLU forward and backward on a fused [n, 2f] gate/up buffer.
    let gu = b.stored(&random(n * 2 * f));
    let dh = b.stored(&random(n * f));
    let (gu_d, h_d, dh_d, dgu_d) = (
        b.upload(&gu)?,
        b.upload(&vec![0.0; n * f])?,
        b.upload(&dh)?,
        b.upload(&vec![0.0; n * 2 * f])?,
    );
    let (n_l, f_i) = (n as i64, f as i32);
    launch!(gpu, b.name("swiglu_forward"), (64, 1), 256, 0; gu_d.ptr(), h_d.ptr(), n_l, f_i)?;
    launch!(gpu, b.name("swiglu_backward"), (64, 1), 256, 0; gu_d.ptr(), dh_d.ptr(), dgu_d.ptr(), n_l, f_i)?;
    let (mut want_h, mut want_dgu) = (vec![0f64; n * f], vec![0f64; n * 2 * f]);
    for r in 0..n {
        for j in 0..f {
            let (g, u, dd) = (
                f64::from(gu[r * 2 * f + j]),
                f64::from(gu[r * 2 * f + f + j]),
                f64::from(dh[r * f + j]),
            );
            want_h[r * f + j] = silu(g) * u;
            want_dgu[r * 2 * f + j] = dd * u * silu_grad(g);
            want_dgu[r * 2 * f + f + j] = dd * silu(g);
        }
    }
    out.push(b.compare(&b.name("swiglu_forward"), &b.download(&h_d)?, &want_h));
    out.push(b.compare(&b.name("swiglu_backward"), &b.download(&dgu_d)?, &want_dgu));
    Ok(out)
}

/// The fused softmax cross-entropy: per-row losses and the in-place gradient, with a loss mask
/// and device-only vocabulary padding.
pub(super) fn cross_entropy(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
    let (rows, vocab, stride) = (37usize, 1000usize, 1024usize);
    let mut rng = Normal::new(11);
    let logits: Vec<f32> = b.stored(
        &(0..rows * stride)
            .map(|_| 3.0 * rng.sample() as f32)
            .collect::<Vec<_>>(),
    );
    let targets: Vec<i32> = (0..rows).map(|r| ((r * 131) % vocab) as i32).collect();
    let counted = rows - rows / 4;
    let weights: Vec<f32> = (0..rows)
        .map(|r| if r % 4 == 3 { 0.0 } else { 1.0 / counted as f32 })
        .collect();
    let logits_d = b.upload(&logits)?;
    let (targets_d, weights_d, losses_d) = (b.raw(&targets)?, b.raw(&weights)?, b.raw(&vec![0f32; rows])?);
    launch!(b.gpu, b.name("cross_entropy"), (rows, 1), 256, 0;
        logits_d.ptr(), targets_d.ptr(), weights_d.ptr(), losses_d.ptr(), vocab as i32, stride as i64)?;
    let (mut want_loss, mut want_grad) = (vec![0f64; rows], vec![0f64; rows * stride]);
    for r in 0..rows {
        let row = &logits[r * stride..r * stride + vocab];
        let max = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(f64::from(x)));
        let sum: f64 = row.iter().map(|&x| (f64::from(x) - max).exp()).sum();
        let lse = max + sum.ln();
        let t = targets[r] as usize;
        let w = f64::from(weights[r]);
        if w > 0.0 {
            want_loss[r] = lse - f64::from(row[t]);
        }
        for j in 0..vocab {
            let p = (f64::from(row[j]) - lse).exp();
            want_grad[r * stride + j] = w * (p - if j == t { 1.0 } else { 0.0 });
        }
    }
    Ok(vec![
        b.compare(
            &format!("{} (loss)", b.name("cross_entropy")),
            &b.fetch::<f32>(&losses_d)?,
            &want_loss,
        ),
        b.compare(
            &format!("{} (gradient)", b.name("cross_entropy")),
            &b.download(&logits_d)?,
            &want_grad,
        ),
    ])
}

/// The global norm's two-pass sum and AdamW (fp32 master weights; the bf16 copy) against the
/// trainer's AdamW.
pub(super) fn optimizer(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
    let b = Bench {
        gpu,
        precision: Precision::F32,
    };
    let len = 100_003usize;
    let mut rng = Normal::new(17);
    let mut random = |scale: f32| -> Vec<f32> { (0..len).map(|_| scale * rng.sample() as f32).collect() };
    let (p, g, m) = (random(1.0), random(0.1), random(0.01));
    let v: Vec<f32> = random(0.01).iter().map(|x| x * x).collect();
    let grid = 256usize;
    let (g_d, partial_d, total_d) = (b.raw(&g)?, b.raw(&vec![0f64; grid])?, b.raw(&[0f64])?);
    let len_l = len as i64;
    launch!(gpu, "sum_squares", (grid, 1), 256, 0; g_d.ptr(), len_l, partial_d.ptr())?;
    launch!(gpu, "sum_partials", (1, 1), 256, 0; partial_d.ptr(), grid as i32, total_d.ptr(), 0i32)?;
    let total = b.fetch::<f64>(&total_d)?[0];
    let want_total: f64 = g.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let norm_check = compare(
        "sum_squares + sum_partials",
        Precision::F32,
        &[total as f32],
        &[want_total],
    );

    let adam = AdamStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        c1: 1.0 - 0.9f64.powi(3),
        c2: 1.0 - 0.95f64.powi(3),
        eps: 1e-8,
        decay: 0.1,
    };
    let (p_d, m_d, v_d, p16_d) = (b.raw(&p)?, b.raw(&m)?, b.raw(&v)?, b.raw(&vec![0u16; len])?);
    launch!(gpu, "adamw", (256, 1), 256, 0;
        p_d.ptr(), g_d.ptr(), m_d.ptr(), v_d.ptr(), p16_d.ptr(), len_l, 1f32,
        adam.lr, adam.beta1, adam.beta2, adam.c1, adam.c2, adam.eps, adam.decay)?;
    let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
    adam.apply(&mut wp, &g, &mut wm, &mut wv);
    let got_p = b.fetch::<f32>(&p_d)?;
    let got_p16: Vec<f32> = b.fetch::<u16>(&p16_d)?.into_iter().map(from_bf16).collect();
    let want_p16: Vec<f64> = wp.iter().map(|&x| f64::from(from_bf16(to_bf16(x)))).collect();
    let mut exact = compare("adamw (fp32 weights)", Precision::F32, &got_p, &f64s(&wp));
    // Same f64 arithmetic as the CPU: the weights must agree exactly, not within a tolerance.
    exact.tolerance = 0.0;
    exact.ok = exact.max_abs_error == 0.0;
    let mut cast = compare("adamw (bf16 copy)", Precision::Bf16, &got_p16, &want_p16);
    cast.tolerance = 0.0;
    cast.ok = cast.max_abs_error == 0.0;
    Ok(vec![
        norm_check,
        exact,
        cast,
        compare(
            "adamw (first moment)",
            Precision::F32,
            &b.fetch::<f32>(&m_d)?,
            &f64s(&wm),
        ),
        compare(
            "adamw (second moment)",
            Precision::F32,
            &b.fetch::<f32>(&v_d)?,
            &f64s(&wv),
        ),
    ])
}
