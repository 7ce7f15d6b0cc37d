//! `safepipe gpu check`: every kernel run on the GPU against the CPU backend on small random
//! shapes, in fp32 (tight) and bf16 storage (loose), one [`KernelCheck`] per kernel and
//! precision. The references are the CPU backend's own ops ([`crate::llama::cpu`]) and the
//! trainer's AdamW ([`crate::train::AdamStep`]), in f64, on the inputs as the GPU sees them
//! (rounded to bf16 in bf16 mode), so a check measures the kernel's error alone.
//!
//! Needs a GPU: on a machine without one, [`run`] fails at [`Gpu::open`] with the reason.

use super::{CudaError, Gpu, Precision};
use crate::llama::cpu::{AttentionSaved, rmsnorm, rmsnorm_backward, silu, silu_grad};
use crate::llama::{Batch, CpuModel, LlamaConfig};
use crate::rng::Normal;
use crate::train::AdamStep;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use serde::Serialize;

/// The largest error allowed, relative to the largest reference value: fp32 storage is limited
/// by fp32 arithmetic, bf16 storage by its 8-bit mantissa (2^-8 = 0.4% per rounding).
fn tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 2e-2,
    }
}

/// One kernel's result.
#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    pub kernel: String,
    pub precision: Precision,
    pub max_abs_error: f64,
    pub max_abs_reference: f64,
    /// max_abs_error / max_abs_reference.
    pub relative_error: f64,
    pub tolerance: f64,
    pub ok: bool,
}

/// bf16 bits of `x`, rounded to nearest even (the kernels' rounding).
pub fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// A device buffer in the check's storage precision.
enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// The GPU and the precision of the checks being run.
struct Bench<'g> {
    gpu: &'g Gpu,
    precision: Precision,
}

impl Bench<'_> {
    /// `values` as the GPU stores them: rounded to bf16 in bf16 mode.
    fn stored(&self, values: &[f32]) -> Vec<f32> {
        match self.precision {
            Precision::F32 => values.to_vec(),
            Precision::Bf16 => values.iter().map(|&x| from_bf16(to_bf16(x))).collect(),
        }
    }

    fn upload(&self, values: &[f32]) -> Result<Buf, CudaError> {
        let s = &self.gpu.stream;
        Ok(match self.precision {
            Precision::F32 => Buf::F32(s.clone_htod(values).map_err(driver)?),
            Precision::Bf16 => {
                let bits: Vec<u16> = values.iter().map(|&x| to_bf16(x)).collect();
                Buf::Bf16(s.clone_htod(&bits).map_err(driver)?)
            }
        })
    }

    fn download(&self, buf: &Buf) -> Result<Vec<f32>, CudaError> {
        let s = &self.gpu.stream;
        Ok(match buf {
            Buf::F32(b) => s.clone_dtoh(b).map_err(driver)?,
            Buf::Bf16(b) => s.clone_dtoh(b).map_err(driver)?.into_iter().map(from_bf16).collect(),
        })
    }

    fn f32s(&self, values: &[f32]) -> Result<CudaSlice<f32>, CudaError> {
        self.gpu.stream.clone_htod(values).map_err(driver)
    }

    fn i32s(&self, values: &[i32]) -> Result<CudaSlice<i32>, CudaError> {
        self.gpu.stream.clone_htod(values).map_err(driver)
    }

    fn name(&self, base: &str) -> String {
        format!("{base}_{}", self.precision.suffix())
    }

    fn compare(&self, kernel: &str, got: &[f32], want: &[f64]) -> KernelCheck {
        compare(kernel, self.precision, got, want)
    }
}

/// Compares `got` with `want` under `precision`'s tolerance.
pub fn compare(kernel: &str, precision: Precision, got: &[f32], want: &[f64]) -> KernelCheck {
    let max_abs_reference = want.iter().fold(0f64, |a, b| a.max(b.abs()));
    let max_abs_error = if got.len() == want.len() {
        got.iter().zip(want).fold(0f64, |a, (g, w)| {
            let e = (f64::from(*g) - w).abs();
            if e.is_nan() { f64::INFINITY } else { a.max(e) }
        })
    } else {
        f64::INFINITY
    };
    let relative_error = max_abs_error / max_abs_reference.max(1e-30);
    let tolerance = tolerance(precision);
    KernelCheck {
        kernel: kernel.to_string(),
        precision,
        max_abs_error,
        max_abs_reference,
        relative_error,
        tolerance,
        ok: relative_error.is_finite() && relative_error <= tolerance,
    }
}

/// Pushes a [`Buf`] as a kernel argument.
macro_rules! buf_arg {
    ($builder:expr, $buf:expr) => {
        match $buf {
            Buf::F32(b) => $builder.arg(b),
            Buf::Bf16(b) => $builder.arg(b),
        }
    };
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// The small model shape every check uses: GQA (4 heads over 2 key/value heads), head_dim 64
/// (every SmolLM2 shape's), two rows of 24 tokens with document boundaries.
fn shape() -> LlamaConfig {
    let mut c = LlamaConfig::preset("tiny").expect("the tiny preset exists");
    c.hidden_size = 256;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.intermediate_size = 96;
    c.vocab_size = 1000;
    c
}

const ROWS: usize = 2;
const SEQ: usize = 24;

/// Runs every check on `gpu`.
pub fn run(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
    let mut results = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let bench = Bench { gpu, precision };
        results.extend(elementwise(&bench)?);
        results.extend(cross_entropy(&bench)?);
        results.extend(attention(&bench)?);
    }
    results.extend(optimizer(gpu)?);
    results.extend(model_checks(gpu)?);
    Ok(results)
}

fn launch_config(grid: (u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Embedding, RMSNorm, RoPE and SwiGLU, forward and backward.
fn elementwise(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
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
fn cross_entropy(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
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

/// Reference attention forward and backward against the CPU backend's, with GQA and documents.
fn attention(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
    let cfg = shape();
    let model = CpuModel::new(cfg.clone()).map_err(CudaError::Driver)?;
    let (n, d, kv, heads, kvh, hd) = (
        ROWS * SEQ,
        cfg.hidden_size,
        cfg.kv_dim(),
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    // Documents: each row splits at a different place, so masks cross row boundaries' logic.
    let segments: Vec<u32> = (0..n)
        .map(|i| ((i % SEQ) >= 9 + 5 * (i / SEQ)) as u32 + 2 * (i / SEQ) as u32)
        .collect();
    let batch = Batch {
        rows: ROWS,
        seq_len: SEQ,
        tokens: vec![0; ROWS * (SEQ + 1)],
        segments: Some(segments.clone()),
        loss_mask: None,
    };
    let mut rng = Normal::new(13);
    let mut random = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.sample() as f32).collect() };
    let (q, k, v, dout) = (
        b.stored(&random(n * d)),
        b.stored(&random(n * kv)),
        b.stored(&random(n * kv)),
        b.stored(&random(n * d)),
    );
    let s = &b.gpu.stream;
    let (q_d, k_d, v_d, dout_d) = (b.upload(&q)?, b.upload(&k)?, b.upload(&v)?, b.upload(&dout)?);
    let (out_d, dq_d, dk_d, dv_d) = (
        b.upload(&vec![0.0; n * d])?,
        b.upload(&vec![0.0; n * d])?,
        b.upload(&vec![0.0; n * kv])?,
        b.upload(&vec![0.0; n * kv])?,
    );
    let seg_i: Vec<i32> = segments.iter().map(|&x| x as i32).collect();
    let seg_d = b.i32s(&seg_i)?;
    let (lse_d, delta_d) = (b.f32s(&vec![0.0; n * heads])?, b.f32s(&vec![0.0; n * heads])?);
    let (seq_i, heads_i, kvh_i, hd_i, q_stride, kv_stride) =
        (SEQ as i32, heads as i32, kvh as i32, hd as i32, d as i64, kv as i64);
    let scale = (1.0 / (hd as f64).sqrt()) as f32;

    let func = b.gpu.function(&b.name("attention_forward"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &q_d);
    buf_arg!(l, &k_d);
    buf_arg!(l, &v_d);
    buf_arg!(l, &out_d);
    l.arg(&lse_d)
        .arg(&seg_d)
        .arg(&seq_i)
        .arg(&heads_i)
        .arg(&kvh_i)
        .arg(&hd_i)
        .arg(&q_stride)
        .arg(&kv_stride)
        .arg(&scale);
    // SAFETY: matches attention_forward; seq_len floats of dynamic shared memory.
    unsafe { l.launch(launch_config((n as u32, heads as u32), 128, (SEQ * 4) as u32)) }.map_err(driver)?;

    let func = b.gpu.function(&b.name("attention_delta"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &out_d);
    buf_arg!(l, &dout_d);
    l.arg(&delta_d).arg(&heads_i).arg(&hd_i);
    // SAFETY: matches attention_delta.
    unsafe { l.launch(launch_config((n as u32, 1), 64, 0)) }.map_err(driver)?;

    let func = b.gpu.function(&b.name("attention_backward_query"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &q_d);
    buf_arg!(l, &k_d);
    buf_arg!(l, &v_d);
    buf_arg!(l, &dout_d);
    l.arg(&lse_d).arg(&delta_d);
    buf_arg!(l, &dq_d);
    l.arg(&seg_d)
        .arg(&seq_i)
        .arg(&heads_i)
        .arg(&kvh_i)
        .arg(&hd_i)
        .arg(&q_stride)
        .arg(&kv_stride)
        .arg(&scale);
    // SAFETY: matches attention_backward_query.
    unsafe { l.launch(launch_config((n as u32, heads as u32), 64, 0)) }.map_err(driver)?;

    let func = b.gpu.function(&b.name("attention_backward_key"))?;
    let mut l = s.launch_builder(func);
    buf_arg!(l, &q_d);
    buf_arg!(l, &k_d);
    buf_arg!(l, &v_d);
    buf_arg!(l, &dout_d);
    l.arg(&lse_d).arg(&delta_d);
    buf_arg!(l, &dk_d);
    buf_arg!(l, &dv_d);
    l.arg(&seg_d)
        .arg(&seq_i)
        .arg(&heads_i)
        .arg(&kvh_i)
        .arg(&hd_i)
        .arg(&q_stride)
        .arg(&kv_stride)
        .arg(&scale);
    // SAFETY: matches attention_backward_key.
    unsafe { l.launch(launch_config((n as u32, kvh as u32), 64, 0)) }.map_err(driver)?;

    // The fused kernels (bf16 only) on the same inputs, into their own outputs.
    let mut flash = Vec::new();
    if b.precision == Precision::Bf16 {
        let doc_start: Vec<i32> = (0..n)
            .scan(0i32, |start, i| {
                let t = i % SEQ;
                if t == 0 || segments[i] != segments[i - 1] {
                    *start = t as i32;
                }
                Some(*start)
            })
            .collect();
        let doc_d = b.i32s(&doc_start)?;
        let (fo, fdq, fdk, fdv) = (b.upload(&vec![0.0; n * d])?, b.upload(&vec![0.0; n * d])?, b.upload(&vec![0.0; n * kv])?, b.upload(&vec![0.0; n * kv])?);
        let (flse, fdelta) = (b.f32s(&vec![0.0; n * heads])?, b.f32s(&vec![0.0; n * heads])?);
        let tiles = SEQ.div_ceil(64) as u32;
        let grid = |y: usize| LaunchConfig {
            grid_dim: (tiles, y as u32, ROWS as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = s.launch_builder(b.gpu.function("flash_forward_bf16")?);
        buf_arg!(l, &q_d);
        buf_arg!(l, &k_d);
        buf_arg!(l, &v_d);
        buf_arg!(l, &fo);
        l.arg(&flse).arg(&doc_d).arg(&seq_i).arg(&heads_i).arg(&kvh_i).arg(&q_stride).arg(&kv_stride).arg(&scale);
        // SAFETY: matches flash_forward_bf16.
        unsafe { l.launch(grid(heads)) }.map_err(driver)?;
        let mut l = s.launch_builder(b.gpu.function("attention_delta_bf16")?);
        buf_arg!(l, &fo);
        buf_arg!(l, &dout_d);
        l.arg(&fdelta).arg(&heads_i).arg(&hd_i);
        // SAFETY: matches attention_delta.
        unsafe { l.launch(launch_config((n as u32, 1), 64, 0)) }.map_err(driver)?;
        let mut l = s.launch_builder(b.gpu.function("flash_backward_query_bf16")?);
        for x in [&q_d, &k_d, &v_d, &dout_d] {
            buf_arg!(l, x);
        }
        l.arg(&flse).arg(&fdelta);
        buf_arg!(l, &fdq);
        l.arg(&doc_d).arg(&seq_i).arg(&heads_i).arg(&kvh_i).arg(&q_stride).arg(&kv_stride).arg(&scale);
        // SAFETY: matches flash_backward_query_bf16.
        unsafe { l.launch(grid(heads)) }.map_err(driver)?;
        let mut l = s.launch_builder(b.gpu.function("flash_backward_key_bf16")?);
        for x in [&q_d, &k_d, &v_d, &dout_d] {
            buf_arg!(l, x);
        }
        l.arg(&flse).arg(&fdelta);
        buf_arg!(l, &fdk);
        buf_arg!(l, &fdv);
        l.arg(&doc_d).arg(&seq_i).arg(&heads_i).arg(&kvh_i).arg(&q_stride).arg(&kv_stride).arg(&scale);
        // SAFETY: matches flash_backward_key_bf16.
        unsafe { l.launch(grid(kvh)) }.map_err(driver)?;
        flash = vec![
            ("flash_forward_bf16", b.download(&fo)?),
            ("flash_forward_bf16 (log-sum-exp)", s.clone_dtoh(&flse).map_err(driver)?),
            ("flash_backward_query_bf16", b.download(&fdq)?),
            ("flash_backward_key_bf16 (dk)", b.download(&fdk)?),
            ("flash_backward_key_bf16 (dv)", b.download(&fdv)?),
        ];
    }
    let (q64, k64, v64) = (f64s(&q), f64s(&k), f64s(&v));
    let (want_out, want_lse) = model.attention(&q64, &k64, &v64, &batch);
    let saved = AttentionSaved {
        q: &q64,
        k: &k64,
        v: &v64,
        lse: &want_lse,
        out: &want_out,
    };
    let (want_dq, want_dk, want_dv) = model.attention_backward(saved, &f64s(&dout), &batch);
    let wants = [&want_out, &want_lse, &want_dq, &want_dk, &want_dv];
    let mut checks: Vec<KernelCheck> = flash.iter().zip(wants).map(|((name, got), want)| b.compare(name, got, want)).collect();
    checks.extend([
        b.compare(&b.name("attention_forward"), &b.download(&out_d)?, &want_out),
        b.compare(
            &format!("{} (log-sum-exp)", b.name("attention_forward")),
            &s.clone_dtoh(&lse_d).map_err(driver)?,
            &want_lse,
        ),
        b.compare(&b.name("attention_backward_query"), &b.download(&dq_d)?, &want_dq),
        b.compare(
            &format!("{} (dk)", b.name("attention_backward_key")),
            &b.download(&dk_d)?,
            &want_dk,
        ),
        b.compare(
            &format!("{} (dv)", b.name("attention_backward_key")),
            &b.download(&dv_d)?,
            &want_dv,
        ),
    ]);
    Ok(checks)
}

/// The global norm's two-pass sum and AdamW (fp32 master weights; the bf16 copy) against the
/// trainer's AdamW.
fn optimizer(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
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

/// A two-layer model's loss and every weight gradient against the CPU backend (f64), in both
/// precisions; then determinism: the same two steps twice give the same bits, and a run stopped
/// after one step and resumed (through the CPU trainer's state, as a checkpoint does) too.
fn model_checks(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
    use super::model::GpuModel;
    use super::trainer::GpuTrainer;
    use crate::llama::Params;
    use crate::train::{OptimConfig, Single, Trainer};
    let mut cfg = shape();
    cfg.num_hidden_layers = 2;
    let params = Params::<f32>::init(&cfg, 5);
    let batch = |seed: u64| {
        let mut rng = Normal::new(seed);
        let tokens: Vec<u32> = (0..ROWS * (SEQ + 1)).map(|_| (rng.sample().abs() * 300.0) as u32 % cfg.vocab_size as u32).collect();
        let segments: Vec<u32> = (0..ROWS * SEQ).map(|i| ((i % SEQ) >= 10) as u32 + 2 * (i / SEQ) as u32).collect();
        let loss_mask: Vec<bool> = (0..ROWS * SEQ).map(|i| i % 7 != 3).collect();
        Batch {
            rows: ROWS,
            seq_len: SEQ,
            tokens,
            segments: Some(segments),
            loss_mask: Some(loss_mask),
        }
    };
    let first = batch(21);
    let cpu = CpuModel::new(cfg.clone()).map_err(CudaError::Driver)?;
    let params64 = params.cast::<f64>(&cfg);
    let mut grads64 = Params::<f64>::zeros(&cfg);
    let want = cpu.loss_and_grad(&params64, &first, &mut grads64);
    let want_grads: Vec<f64> = grads64.tensors().into_iter().flat_map(|(_, t, _)| t.to_vec()).collect();
    let mut out = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let mut model = GpuModel::new(gpu, cfg.clone(), &params, precision)?;
        super::memory::zero(gpu, model.grads.ptr, model.layout.total * 4)?;
        let loss = model.forward_backward(gpu, &first)?;
        let mut flat = vec![0f32; model.layout.total];
        super::memory::download(gpu, &mut flat, model.grads.ptr)?;
        let got_grads: Vec<f32> = model.layout.unflatten(&flat, &cfg).tensors().into_iter().flat_map(|(_, t, _)| t.to_vec()).collect();
        let mut loss_check = compare("model loss (2 layers)", precision, &[(loss.sum / loss.counted as f64) as f32], &[want.mean]);
        // bf16 activations through two layers: the loss within 1e-2 (the PyTorch target's bound).
        loss_check.tolerance = if precision == Precision::F32 { 1e-5 } else { 1e-2 };
        loss_check.ok = loss_check.relative_error <= loss_check.tolerance;
        out.push(loss_check);
        let mut grad_check = compare("model gradients (2 layers, all tensors)", precision, &got_grads, &want_grads);
        if precision == Precision::Bf16 {
            grad_check.tolerance = 5e-2;
            grad_check.ok = grad_check.relative_error <= grad_check.tolerance;
        }
        out.push(grad_check);
    }
    // Determinism and resume, in bf16 (the training mode).
    let optim = OptimConfig {
        total_steps: 10,
        ..OptimConfig::default()
    };
    let batches = [vec![first.clone()], vec![batch(22), batch(23)]];
    let straight = |gpu: Gpu| -> Result<Vec<f32>, CudaError> {
        let start = Trainer::new(cfg.clone(), params.clone(), optim.clone()).map_err(CudaError::Driver)?;
        let mut t = GpuTrainer::from_cpu(gpu, &start, Precision::Bf16)?;
        for b in &batches {
            t.train_step(b, &Single)?;
        }
        Ok(t.to_cpu()?.params.tensors().into_iter().flat_map(|(_, x, _)| x.to_vec()).collect())
    };
    let reopen = || Gpu::open(gpu.context.ordinal(), &super::nvrtc::cache_dir());
    let a = straight(reopen()?)?;
    let b = straight(reopen()?)?;
    let start = Trainer::new(cfg.clone(), params.clone(), optim.clone()).map_err(CudaError::Driver)?;
    let mut t = GpuTrainer::from_cpu(reopen()?, &start, Precision::Bf16)?;
    t.train_step(&batches[0], &Single)?;
    let saved = t.to_cpu()?;
    drop(t);
    let mut resumed = GpuTrainer::from_cpu(reopen()?, &saved, Precision::Bf16)?;
    resumed.train_step(&batches[1], &Single)?;
    let r: Vec<f32> = resumed.to_cpu()?.params.tensors().into_iter().flat_map(|(_, x, _)| x.to_vec()).collect();
    for (name, other) in [("same two steps twice: identical weights", &b), ("one step, resume, one step: identical weights", &r)] {
        let differing = a.iter().zip(other.iter()).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        out.push(KernelCheck {
            kernel: name.into(),
            precision: Precision::Bf16,
            max_abs_error: differing as f64,
            max_abs_reference: a.len() as f64,
            relative_error: differing as f64 / a.len() as f64,
            tolerance: 0.0,
            ok: differing == 0,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even_and_keeps_nans() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: rounds to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn a_check_passes_within_its_tolerance_and_fails_outside_it() {
        assert!(compare("k", Precision::F32, &[1.0, 2.0], &[1.0, 2.0 + 1e-5]).ok);
        assert!(!compare("k", Precision::F32, &[1.0, 2.1], &[1.0, 2.0]).ok);
        assert!(compare("k", Precision::Bf16, &[1.0, 2.01], &[1.0, 2.0]).ok);
        assert!(
            !compare("k", Precision::Bf16, &[1.0], &[1.0, 2.0]).ok,
            "a length mismatch fails"
        );
        assert!(!compare("k", Precision::F32, &[f32::NAN], &[1.0]).ok, "a NaN fails");
    }
}
