//! Checks of the reference and fused attention kernels against the CPU backend.

use super::{Bench, Buf, KernelCheck, ROWS, SEQ, buf_arg, driver, f64s, launch_config, shape};
use crate::cuda::{CudaError, Precision};
use crate::llama::cpu::AttentionSaved;
use crate::llama::{Batch, CpuModel};
use crate::rng::Normal;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Reference attention forward and backward against the CPU backend's, with GQA and documents.
pub(super) fn attention(b: &Bench) -> Result<Vec<KernelCheck>, CudaError> {
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
        let (fo, fdq, fdk, fdv) = (
            b.upload(&vec![0.0; n * d])?,
            b.upload(&vec![0.0; n * d])?,
            b.upload(&vec![0.0; n * kv])?,
            b.upload(&vec![0.0; n * kv])?,
        );
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
        l.arg(&flse)
            .arg(&doc_d)
            .arg(&seq_i)
            .arg(&heads_i)
            .arg(&kvh_i)
            .arg(&q_stride)
            .arg(&kv_stride)
            .arg(&scale);
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
        l.arg(&doc_d)
            .arg(&seq_i)
            .arg(&heads_i)
            .arg(&kvh_i)
            .arg(&q_stride)
            .arg(&kv_stride)
            .arg(&scale);
        // SAFETY: matches flash_backward_query_bf16.
        unsafe { l.launch(grid(heads)) }.map_err(driver)?;
        let mut l = s.launch_builder(b.gpu.function("flash_backward_key_bf16")?);
        for x in [&q_d, &k_d, &v_d, &dout_d] {
            buf_arg!(l, x);
        }
        l.arg(&flse).arg(&fdelta);
        buf_arg!(l, &fdk);
        buf_arg!(l, &fdv);
        l.arg(&doc_d)
            .arg(&seq_i)
            .arg(&heads_i)
            .arg(&kvh_i)
            .arg(&q_stride)
            .arg(&kv_stride)
            .arg(&scale);
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
    let mut checks: Vec<KernelCheck> = flash
        .iter()
        .zip(wants)
        .map(|((name, got), want)| b.compare(name, got, want))
        .collect();
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
