//! Model-level checks: a two-layer model's loss and gradients against the CPU backend, and the
//! GPU trainer's determinism and resume.

use super::{KernelCheck, ROWS, SEQ, compare, shape};
use crate::cuda::{CudaError, Gpu, Precision};
use crate::llama::{Batch, CpuModel};
use crate::rng::Normal;

/// A two-layer model's loss and every weight gradient against the CPU backend (f64), in both
/// precisions; then determinism: the same two steps twice give the same bits, and a run stopped
/// after one step and resumed (through the CPU trainer's state, as a checkpoint does) too.
pub(super) fn model_checks(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
    use crate::cuda::model::GpuModel;
    use crate::cuda::trainer::GpuTrainer;
    use crate::llama::Params;
    use crate::train::{OptimConfig, Single, Trainer};
    let mut cfg = shape();
    cfg.num_hidden_layers = 2;
    let params = Params::<f32>::init(&cfg, 5);
    let batch = |seed: u64| {
        let mut rng = Normal::new(seed);
        let tokens: Vec<u32> = (0..ROWS * (SEQ + 1))
            .map(|_| (rng.sample().abs() * 300.0) as u32 % cfg.vocab_size as u32)
            .collect();
        let segments: Vec<u32> = (0..ROWS * SEQ)
            .map(|i| ((i % SEQ) >= 10) as u32 + 2 * (i / SEQ) as u32)
            .collect();
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
    // One micro-batch's loss and raw (flat) gradients in `precision`.
    let gradients = |precision: Precision, recompute: bool| -> Result<(f64, GpuModel, Vec<f32>), CudaError> {
        let mut model = GpuModel::new(gpu, cfg.clone(), &params, precision)?;
        model.recompute = recompute;
        crate::cuda::memory::zero(gpu, model.grads.ptr, model.layout.total * 4)?;
        let loss = model.forward_backward(gpu, &first)?;
        let mut flat = vec![0f32; model.layout.total];
        crate::cuda::memory::download(gpu, &mut flat, model.grads.ptr)?;
        Ok((loss.sum / loss.counted as f64, model, flat))
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let (loss, model, flat) = gradients(precision, false)?;
        if precision == Precision::Bf16 {
            // Recomputing each layer in the backward pass reruns the same kernels: same bits.
            let (_, _, again) = gradients(precision, true)?;
            out.push(identical("recompute: identical gradients", &flat, &again));
        }
        let got_grads: Vec<f32> = model
            .layout
            .unflatten(&flat, &cfg)
            .tensors()
            .into_iter()
            .flat_map(|(_, t, _)| t.to_vec())
            .collect();
        let mut loss_check = compare("model loss (2 layers)", precision, &[loss as f32], &[want.mean]);
        // bf16 activations through two layers: the loss within 1e-2 (the PyTorch target's bound).
        loss_check.tolerance = if precision == Precision::F32 { 1e-5 } else { 1e-2 };
        loss_check.ok = loss_check.relative_error <= loss_check.tolerance;
        out.push(loss_check);
        let mut grad_check = compare(
            "model gradients (2 layers, all tensors)",
            precision,
            &got_grads,
            &want_grads,
        );
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
    // Two steps; the weights, then (with `state`) the AdamW moments, as one vector.
    let straight = |gpu: Gpu, nccl: bool, zero1: bool| -> Result<Vec<f32>, CudaError> {
        let start = Trainer::new(cfg.clone(), params.clone(), optim.clone()).map_err(CudaError::Driver)?;
        let mut t = GpuTrainer::from_cpu(gpu, &start, Precision::Bf16)?;
        if nccl {
            t.join_nccl(&Single)?;
        }
        if zero1 {
            t.shard_optimizer()?;
        }
        for b in &batches {
            t.train_step(b, &Single)?;
        }
        t.prepare_checkpoint()?;
        Ok(flat_state(&t.to_cpu()?))
    };
    let reopen = || Gpu::open(gpu.context.ordinal(), &crate::cuda::nvrtc::cache_dir());
    let a = straight(reopen()?, false, false)?;
    // NCCL with one rank: its all-reduce (overlapped, per layer) and, with the optimiser state
    // sharded, its all-gather are the identity.
    for (name, zero1) in [
        ("NCCL, world size 1", false),
        ("NCCL, world size 1, optimiser sharded", true),
    ] {
        match straight(reopen()?, true, zero1) {
            Ok(state) => out.push(identical(&format!("{name}: identical weights and moments"), &a, &state)),
            Err(e) => out.push(KernelCheck {
                kernel: format!("{name}: {e}"),
                precision: Precision::Bf16,
                max_abs_error: f64::INFINITY,
                max_abs_reference: 0.0,
                relative_error: f64::INFINITY,
                tolerance: 0.0,
                ok: false,
            }),
        }
    }
    let b = straight(reopen()?, false, false)?;
    let start = Trainer::new(cfg.clone(), params.clone(), optim.clone()).map_err(CudaError::Driver)?;
    let mut t = GpuTrainer::from_cpu(reopen()?, &start, Precision::Bf16)?;
    t.train_step(&batches[0], &Single)?;
    let saved = t.to_cpu()?;
    drop(t);
    let mut resumed = GpuTrainer::from_cpu(reopen()?, &saved, Precision::Bf16)?;
    resumed.train_step(&batches[1], &Single)?;
    let r = flat_state(&resumed.to_cpu()?);
    out.push(identical("same two steps twice: identical weights and moments", &a, &b));
    out.push(identical(
        "one step, resume, one step: identical weights and moments",
        &a,
        &r,
    ));
    Ok(out)
}

/// A trainer's weights and AdamW moments, as one vector.
fn flat_state(state: &crate::train::Trainer) -> Vec<f32> {
    let (m, v) = state.moments();
    [&state.params, m, v]
        .into_iter()
        .flat_map(|p| p.tensors().into_iter().flat_map(|(_, x, _)| x.to_vec()))
        .collect()
}

/// Whether two states are the same bit for bit, as a check.
fn identical(name: &str, a: &[f32], b: &[f32]) -> KernelCheck {
    let differing = a.iter().zip(b).filter(|(x, y)| x.to_bits() != y.to_bits()).count() + a.len().abs_diff(b.len());
    KernelCheck {
        kernel: name.into(),
        precision: Precision::Bf16,
        max_abs_error: differing as f64,
        max_abs_reference: a.len() as f64,
        relative_error: differing as f64 / a.len().max(1) as f64,
        tolerance: 0.0,
        ok: differing == 0,
    }
}
