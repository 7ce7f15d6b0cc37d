//! Checks of the elementwise kernels, the fused cross-entropy and the optimiser.

use super::{
    Bench, Buf, KernelCheck, ROWS, SEQ, buf_arg, compare, driver, f64s, from_bf16, launch_config, shape, to_bf16,
};
use crate::cuda::{CudaError, Gpu, Precision};
use crate::llama::CpuModel;
use crate::llama::cpu::{rmsnorm, rmsnorm_backward, silu, silu_grad};
use crate::rng::Normal;
use crate::train::AdamStep;
use cudarc::driver::PushKernelArg;

/// Embedding, RMSNorm, RoPE and SwiGLU, forward and backward.
pub(super) fn elementwise(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
    let cfg = shape();
    let (n, d, f) = (ROWS * SEQ, cfg.hidden_size, cfg.intermediate_size);
    let mut rng = Normal::new(7);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.sample() as f32).collect() };
    let s = &b.gpu.stream;
    let mut out = Vec::new();

    // Embedding gather and its token-grouped backward.
    let vocab = 50usize;
    let ids: Vec<i32> = (0..n).map(|i| ((i * 7 + i / 5) % vocab) as i32).collect();
    let table = b.stored(&random(vocab * d));
    let (ids_d, table_d) = (b.i32s(&ids)?, b.upload(&table)?);
    let out_d = b.upload(&vec![0.0; n * d])?;
    let func = b.gpu.function(&b.name("embed_forward"))?;
    let mut l = s.launch_builder(func);
    l.arg(&ids_d);
    buf_arg!(l, &table_d);
    buf_arg!(l, &out_d);
    let d_i = d as i32;
    l.arg(&d_i);
    // SAFETY: the arguments match embed_forward's signature; buffers hold n*d and vocab*d values.
    unsafe { l.launch(launch_config((n as u32, 1), 128, 0)) }.map_err(driver)?;
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
    let (tokens_d, starts_d, positions_d) = (b.i32s(&tokens)?, b.i32s(&starts)?, b.i32s(&positions)?);
    let dout_d = b.upload(&dout)?;
    let dtable_d = b.f32s(&vec![0.0; vocab * d])?;
    let func = b.gpu.function(&b.name("embed_backward"))?;
    let mut l = s.launch_builder(func);
    l.arg(&tokens_d).arg(&starts_d).arg(&positions_d);
    buf_arg!(l, &dout_d);
    l.arg(&dtable_d).arg(&d_i);
    // SAFETY: as above; groups cover every position once.
    unsafe { l.launch(launch_config((tokens.len() as u32, 1), 128, 0)) }.map_err(driver)?;
    let mut want = vec![0f64; vocab * d];
    for (p, &t) in ids.iter().enumerate() {
        for j in 0..d {
            want[t as usize * d + j] += f64::from(dout[p * d + j]);
        }
    }
    out.push(b.compare(
        &b.name("embed_backward"),
        &s.clone_dtoh(&dtable_d).map_err(driver)?,
        &want,
    ));

    // RMSNorm with the residual add, forward; then backward into a residual gradient.
    let (x, delta, w) = (b.stored(&random(n * d)), b.stored(&random(n * d)), b.stored(&random(d)));
    let (x_d, delta_d, w_d, y_d) = (
        b.upload(&x)?,
        b.upload(&delta)?,
        b.upload(&w)?,
        b.upload(&vec![0.0; n * d])?,
    );
    let rstd_d = b.f32s(&vec![0.0; n])?;
    let eps = 1e-5f32;
    let func = b.gpu.function(&b.name("rmsnorm_forward"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &x_d);
    buf_arg!(l, &delta_d);
    buf_arg!(l, &w_d);
    buf_arg!(l, &y_d);
    l.arg(&rstd_d).arg(&d_i).arg(&eps);
    // SAFETY: matches rmsnorm_forward; n rows of d.
    unsafe { l.launch(launch_config((n as u32, 1), 256, 0)) }.map_err(driver)?;
    let summed = b.stored(&x.iter().zip(&delta).map(|(a, c)| a + c).collect::<Vec<_>>());
    let (want_y, want_r) = rmsnorm(&f64s(&summed), &f64s(&w), d, f64::from(eps));
    out.push(b.compare(&b.name("rmsnorm_forward"), &b.download(&y_d)?, &want_y));

    let dy = b.stored(&random(n * d));
    let dy_d = b.upload(&dy)?;
    let dresid_d = b.upload(&vec![0.0; n * d])?;
    let rows_per_block = 8usize;
    let blocks = n.div_ceil(rows_per_block);
    let partial_d = b.f32s(&vec![0.0; blocks * d])?;
    let dw_d = b.f32s(&vec![0.0; d])?;
    let func = b.gpu.function(&b.name("rmsnorm_backward"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &x_d);
    buf_arg!(l, &w_d);
    l.arg(&rstd_d);
    buf_arg!(l, &dy_d);
    buf_arg!(l, &dresid_d);
    let (n_i, rpb_i) = (n as i32, rows_per_block as i32);
    l.arg(&partial_d).arg(&n_i).arg(&rpb_i).arg(&d_i);
    // SAFETY: matches rmsnorm_backward; the partial buffer holds blocks*d values.
    unsafe { l.launch(launch_config((blocks as u32, 1), 256, 0)) }.map_err(driver)?;
    let func = b.gpu.function("column_sum")?;
    let mut l = s.launch_builder(func);
    let (blocks_i, zero) = (blocks as i32, 0i32);
    l.arg(&partial_d).arg(&dw_d).arg(&blocks_i).arg(&d_i).arg(&zero);
    // SAFETY: matches column_sum.
    unsafe { l.launch(launch_config((d.div_ceil(256) as u32, 1), 256, 0)) }.map_err(driver)?;
    let mut want_dw = vec![0f64; d];
    let want_dx = rmsnorm_backward(&f64s(&summed), &want_r, &f64s(&w), &f64s(&dy), &mut want_dw, d);
    out.push(b.compare(&b.name("rmsnorm_backward"), &b.download(&dresid_d)?, &want_dx));
    out.push(b.compare(
        "column_sum (rmsnorm weight gradient)",
        &s.clone_dtoh(&dw_d).map_err(driver)?,
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
    let (cos_d, sin_d) = (b.f32s(&cos)?, b.f32s(&sin)?);
    for sign in [1f32, -1f32] {
        let q = b.stored(&random(n * d));
        let q_d = b.upload(&q)?;
        let func = b.gpu.function(&b.name("rope"))?;
        let mut l = s.launch_builder(func);
        buf_arg!(l, &q_d);
        let (heads_i, hd_i, seq_i, stride) = (heads as i32, hd as i32, SEQ as i32, d as i64);
        l.arg(&cos_d)
            .arg(&sin_d)
            .arg(&heads_i)
            .arg(&hd_i)
            .arg(&seq_i)
            .arg(&stride)
            .arg(&sign);
        // SAFETY: matches rope; n rows of `stride`.
        unsafe { l.launch(launch_config((n as u32, 1), 128, 0)) }.map_err(driver)?;
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
    let func = b.gpu.function(&b.name("swiglu_forward"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &gu_d);
    buf_arg!(l, &h_d);
    l.arg(&n_l).arg(&f_i);
    // SAFETY: matches swiglu_forward.
    unsafe { l.launch(launch_config((64, 1), 256, 0)) }.map_err(driver)?;
    let func = b.gpu.function(&b.name("swiglu_backward"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &gu_d);
    buf_arg!(l, &dh_d);
    buf_arg!(l, &dgu_d);
    l.arg(&n_l).arg(&f_i);
    // SAFETY: matches swiglu_backward.
    unsafe { l.launch(launch_config((64, 1), 256, 0)) }.map_err(driver)?;
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
    let s = &b.gpu.stream;
    let logits_d = b.upload(&logits)?;
    let (targets_d, weights_d, losses_d) = (b.i32s(&targets)?, b.f32s(&weights)?, b.f32s(&vec![0.0; rows])?);
    let func = b.gpu.function(&b.name("cross_entropy"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &logits_d);
    let (vocab_i, stride_l) = (vocab as i32, stride as i64);
    l.arg(&targets_d)
        .arg(&weights_d)
        .arg(&losses_d)
        .arg(&vocab_i)
        .arg(&stride_l);
    // SAFETY: matches cross_entropy; rows x stride logits.
    unsafe { l.launch(launch_config((rows as u32, 1), 256, 0)) }.map_err(driver)?;
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
            &s.clone_dtoh(&losses_d).map_err(driver)?,
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
    let s = &gpu.stream;
    let len = 100_003usize;
    let mut rng = Normal::new(17);
    let mut random = |scale: f32| -> Vec<f32> { (0..len).map(|_| scale * rng.sample() as f32).collect() };
    let (p, g, m) = (random(1.0), random(0.1), random(0.01));
    let v: Vec<f32> = random(0.01).iter().map(|x| x * x).collect();
    let grid = 256usize;
    let (g_d, partial_d, total_d) = (
        s.clone_htod(&g).map_err(driver)?,
        s.alloc_zeros::<f64>(grid).map_err(driver)?,
        s.alloc_zeros::<f64>(1).map_err(driver)?,
    );
    let len_l = len as i64;
    let mut l = s.launch_builder(gpu.function("sum_squares")?);
    l.arg(&g_d).arg(&len_l).arg(&partial_d);
    // SAFETY: matches sum_squares; `grid` partials.
    unsafe { l.launch(launch_config((grid as u32, 1), 256, 0)) }.map_err(driver)?;
    let (grid_i, zero) = (grid as i32, 0i32);
    let mut l = s.launch_builder(gpu.function("sum_partials")?);
    l.arg(&partial_d).arg(&grid_i).arg(&total_d).arg(&zero);
    // SAFETY: matches sum_partials.
    unsafe { l.launch(launch_config((1, 1), 256, 0)) }.map_err(driver)?;
    let total = s.clone_dtoh(&total_d).map_err(driver)?[0];
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
    let (p_d, m_d, v_d, p16_d) = (
        s.clone_htod(&p).map_err(driver)?,
        s.clone_htod(&m).map_err(driver)?,
        s.clone_htod(&v).map_err(driver)?,
        s.alloc_zeros::<u16>(len).map_err(driver)?,
    );
    let clip = 1f32;
    let mut l = s.launch_builder(gpu.function("adamw")?);
    l.arg(&p_d)
        .arg(&g_d)
        .arg(&m_d)
        .arg(&v_d)
        .arg(&p16_d)
        .arg(&len_l)
        .arg(&clip);
    l.arg(&adam.lr)
        .arg(&adam.beta1)
        .arg(&adam.beta2)
        .arg(&adam.c1)
        .arg(&adam.c2)
        .arg(&adam.eps)
        .arg(&adam.decay);
    // SAFETY: matches adamw; every buffer holds `len` values.
    unsafe { l.launch(launch_config((256, 1), 256, 0)) }.map_err(driver)?;
    let (mut wp, mut wm, mut wv) = (p.clone(), m.clone(), v.clone());
    adam.apply(&mut wp, &g, &mut wm, &mut wv);
    let got_p = s.clone_dtoh(&p_d).map_err(driver)?;
    let got_p16: Vec<f32> = s
        .clone_dtoh(&p16_d)
        .map_err(driver)?
        .into_iter()
        .map(from_bf16)
        .collect();
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
            &s.clone_dtoh(&m_d).map_err(driver)?,
            &f64s(&wm),
        ),
        compare(
            "adamw (second moment)",
            Precision::F32,
            &s.clone_dtoh(&v_d).map_err(driver)?,
            &f64s(&wv),
        ),
    ])
}
