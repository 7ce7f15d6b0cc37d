//! Checks of the reference and fused attention kernels against the CPU backend.

use super::{Bench, KernelCheck, ROWS, SEQ, f64s, launch, shape};
use crate::cuda::{CudaError, Precision};
use crate::llama::cpu::AttentionSaved;
use crate::llama::{Batch, CpuModel};
use crate::rng::Normal;

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
    let (q_d, k_d, v_d, dout_d) = (b.upload(&q)?, b.upload(&k)?, b.upload(&v)?, b.upload(&dout)?);
    let (out_d, dq_d, dk_d, dv_d) = (
        b.upload(&vec![0.0; n * d])?,
        b.upload(&vec![0.0; n * d])?,
        b.upload(&vec![0.0; n * kv])?,
        b.upload(&vec![0.0; n * kv])?,
    );
    let seg_i: Vec<i32> = segments.iter().map(|&x| x as i32).collect();
    let seg_d = b.raw(&seg_i)?;
    let (lse_d, delta_d) = (b.raw(&vec![0f32; n * heads])?, b.raw(&vec![0f32; n * heads])?);
    let gpu = b.gpu;
    // The arguments after the tensors, shared by every attention kernel (the reference ones
    // take head_dim too).
    let (seq_i, heads_i, kvh_i, hd_i, q_stride, kv_stride) =
        (SEQ as i32, heads as i32, kvh as i32, hd as i32, d as i64, kv as i64);
    let scale = (1.0 / (hd as f64).sqrt()) as f32;
    let (q_p, k_p, v_p, dout_p) = (q_d.ptr(), k_d.ptr(), v_d.ptr(), dout_d.ptr());
    launch!(gpu, b.name("attention_forward"), (n, heads), 128, SEQ * 4;
        q_p, k_p, v_p, out_d.ptr(), lse_d.ptr(), seg_d.ptr(), seq_i, heads_i, kvh_i, hd_i, q_stride, kv_stride, scale)?;
    launch!(gpu, b.name("attention_delta"), (n, 1), 64, 0; out_d.ptr(), dout_p, delta_d.ptr(), heads_i, hd_i)?;
    launch!(gpu, b.name("attention_backward_query"), (n, heads), 64, 0;
        q_p, k_p, v_p, dout_p, lse_d.ptr(), delta_d.ptr(), dq_d.ptr(), seg_d.ptr(), seq_i, heads_i, kvh_i, hd_i, q_stride, kv_stride, scale)?;
    launch!(gpu, b.name("attention_backward_key"), (n, kvh), 64, 0;
        q_p, k_p, v_p, dout_p, lse_d.ptr(), delta_d.ptr(), dk_d.ptr(), dv_d.ptr(), seg_d.ptr(), seq_i, heads_i, kvh_i, hd_i, q_stride, kv_stride, scale)?;

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
        let doc_d = b.raw(&doc_start)?;
        let (fo, fdq, fdk, fdv) = (
            b.upload(&vec![0.0; n * d])?,
            b.upload(&vec![0.0; n * d])?,
            b.upload(&vec![0.0; n * kv])?,
            b.upload(&vec![0.0; n * kv])?,
        );
        let (flse, fdelta) = (b.raw(&vec![0f32; n * heads])?, b.raw(&vec![0f32; n * heads])?);
        let tiles = SEQ.div_ceil(64);
        launch!(gpu, "flash_forward_bf16", (tiles, heads), 128, 0, ROWS;
            q_p, k_p, v_p, fo.ptr(), flse.ptr(), doc_d.ptr(), seq_i, heads_i, kvh_i, q_stride, kv_stride, scale)?;
        launch!(gpu, "attention_delta_bf16", (n, 1), 64, 0; fo.ptr(), dout_p, fdelta.ptr(), heads_i, hd_i)?;
        launch!(gpu, "flash_backward_query_bf16", (tiles, heads), 128, 0, ROWS;
            q_p, k_p, v_p, dout_p, flse.ptr(), fdelta.ptr(), fdq.ptr(), doc_d.ptr(), seq_i, heads_i, kvh_i, q_stride, kv_stride, scale)?;
        launch!(gpu, "flash_backward_key_bf16", (tiles, kvh), 128, 0, ROWS;
            q_p, k_p, v_p, dout_p, flse.ptr(), fdelta.ptr(), fdk.ptr(), fdv.ptr(), doc_d.ptr(), seq_i, heads_i, kvh_i, q_stride, kv_stride, scale)?;
        flash = vec![
            ("flash_forward_bf16", b.download(&fo)?),
            ("flash_forward_bf16 (log-sum-exp)", b.fetch::<f32>(&flse)?),
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
            &b.fetch::<f32>(&lse_d)?,
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
