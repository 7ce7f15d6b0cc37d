//! Training on the GPU: the optimiser step around [`GpuModel`]'s passes, data parallelism over
//! NCCL, and checkpoints in the CPU backend's format (through [`Trainer`], so a GPU checkpoint
//! loads in the CPU backend and in `transformers`, and the other way round).
//!
//! One step, as the CPU backend's (train.rs), so the two agree:
//! 1. weight gradients of each micro-batch's mean loss accumulate in fp32, then are scaled by
//!    1 / micro-batches;
//! 2. with several ranks, NCCL averages them, overlapped with the backward pass: during the last
//!    micro-batch each layer's gradients (one contiguous bucket of the flat layout) are
//!    all-reduced on a second stream as soon as that layer's backward pass is queued; the
//!    embedding and final norm follow the pass; the 1 / micro-batches scale comes after;
//! 3. the global norm is summed in fp64 in a fixed order (two passes, no atomics) and the
//!    gradients clipped to `clip`;
//! 4. fused AdamW per tensor (decay on matrices only) updates the fp32 master weights and
//!    writes their bf16 copy. With the optimiser state sharded ([`GpuTrainer::shard_optimizer`],
//!    ZeRO-1), each rank keeps the AdamW moments of its shard of the flat layout only, updates
//!    that shard of the weights, and NCCL all-gathers the updated weights.

use super::layout::Shard;
use super::memory::{DevBuf, download, launch, zero};
use super::model::GpuModel;
use super::nccl::NcclGroup;
use super::{CudaError, Gpu, Precision};
use crate::collective::Collective;
use crate::llama::{Batch, LlamaConfig, Params};
use crate::train::{OptimConfig, StepStats, Trainer};

/// Blocks of the gradient-norm sum: fixed, so the sum's order never changes.
const NORM_BLOCKS: usize = 1024;

pub struct GpuTrainer {
    pub gpu: Gpu,
    pub model: GpuModel,
    /// Optimiser steps taken.
    pub step: u64,
    pub optim: OptimConfig,
    nccl: Option<NcclGroup>,
    /// The stream NCCL runs on, beside the GPU's compute stream.
    comm_stream: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
    norm_partials: super::memory::DevBuf,
    /// This rank's part of the optimiser state, when it is sharded (the moments then hold only it).
    shard: Option<Shard>,
    /// Every rank's moments at a step, gathered for a checkpoint ([`GpuTrainer::prepare_checkpoint`]).
    gathered: Option<(u64, Vec<f32>, Vec<f32>)>,
}

impl GpuTrainer {
    /// A trainer on `gpu` starting from the CPU trainer's state (fresh or loaded).
    pub fn from_cpu(gpu: Gpu, trainer: &Trainer, precision: Precision) -> Result<GpuTrainer, CudaError> {
        let config = trainer.model.config.clone();
        let model = GpuModel::new(&gpu, config, &trainer.params, precision)?;
        let (m, v) = trainer.moments();
        super::memory::upload(&gpu, model.m.ptr, &model.layout.flatten(m))?;
        super::memory::upload(&gpu, model.v.ptr, &model.layout.flatten(v))?;
        let norm_partials = super::memory::DevBuf::zeros(&gpu, (NORM_BLOCKS + 1) * 8)?;
        Ok(GpuTrainer {
            gpu,
            model,
            step: trainer.step,
            optim: trainer.optim.clone(),
            nccl: None,
            comm_stream: None,
            norm_partials,
            shard: None,
            gathered: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.model.config
    }

    /// Joins the NCCL group of `comm`'s ranks when there are several (see [`GpuTrainer::join_nccl`]).
    pub fn join(&mut self, comm: &dyn Collective) -> Result<(), CudaError> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        self.join_nccl(comm)
    }

    /// Joins the NCCL group of `comm`'s ranks (any world size, 1 included: the GPU check runs
    /// it so), on a stream of its own, and makes every rank hold rank 0's weights and moments.
    pub fn join_nccl(&mut self, comm: &dyn Collective) -> Result<(), CudaError> {
        let stream = self.gpu.context.new_stream().map_err(super::memory::driver)?;
        // The weights were uploaded on the compute stream: NCCL's stream waits for them.
        stream.join(&self.gpu.stream).map_err(super::memory::driver)?;
        let nccl = NcclGroup::join(stream.clone(), comm)?;
        let total = self.model.layout.total;
        for buf in [&self.model.master, &self.model.m, &self.model.v] {
            nccl.broadcast(buf.ptr, total)?;
        }
        self.gpu.stream.join(&stream).map_err(super::memory::driver)?;
        self.nccl = Some(nccl);
        self.comm_stream = Some(stream);
        self.model.refresh_working_copy(&self.gpu)
    }

    /// One optimiser step over this rank's micro-batches, averaged across ranks.
    pub fn train_step(&mut self, micro_batches: &[Batch], comm: &dyn Collective) -> Result<StepStats, CudaError> {
        let gpu = &self.gpu;
        let total = self.model.layout.total;
        zero(gpu, self.model.grads.ptr, total * 4)?;
        let (mut loss, mut tokens) = (0f64, 0usize);
        let accum = micro_batches.len().max(1);
        for (i, batch) in micro_batches.iter().enumerate() {
            let l = match (&self.nccl, &self.comm_stream) {
                (Some(nccl), Some(comm_stream)) if i + 1 == micro_batches.len() => {
                    // Each layer's bucket is averaged across ranks on NCCL's stream while the
                    // earlier layers go back on the compute stream.
                    let (model, gpu) = (&mut self.model, &self.gpu);
                    let buckets: Vec<_> = (0..model.config.num_hidden_layers)
                        .map(|l| model.layout.layer_range(l))
                        .collect();
                    let grads = model.grads.ptr;
                    model.forward_backward_with(gpu, batch, &mut |layer| {
                        let range = &buckets[layer];
                        comm_stream.join(&gpu.stream).map_err(super::memory::driver)?;
                        nccl.all_reduce_mean(grads + (range.start * 4) as u64, range.len())
                    })?
                }
                _ => self.model.forward_backward(&self.gpu, batch)?,
            };
            loss += if l.counted > 0 { l.sum / l.counted as f64 } else { 0.0 };
            tokens += l.counted;
        }
        if let (Some(nccl), Some(comm_stream)) = (&self.nccl, &self.comm_stream) {
            // The embedding's and the final norm's gradients are complete after the pass.
            comm_stream.join(&self.gpu.stream).map_err(super::memory::driver)?;
            let layout = &self.model.layout;
            for slot in [&layout.slots[0], &layout.slots[layout.slots.len() - 1]] {
                nccl.all_reduce_mean(self.model.grads.at(slot.offset, 4), slot.len)?;
            }
            self.gpu.stream.join(comm_stream).map_err(super::memory::driver)?;
        }
        let gpu = &self.gpu;
        if accum > 1 {
            launch!(gpu, "scale_f32", (1024, 1), 256, 0; self.model.grads.ptr, total as i64, 1.0f32 / accum as f32)?;
        }
        let mut loss_buf = [(loss / accum as f64) as f32];
        comm.all_reduce_mean(&mut loss_buf)
            .map_err(|e| CudaError::Driver(format!("averaging the loss across ranks: {e}")))?;
        let norm = self.grad_norm()?;
        let clip_scale = if self.optim.clip > 0.0 && norm > self.optim.clip {
            (self.optim.clip / norm) as f32
        } else {
            1.0
        };
        let adam = self.optim.adam_step(self.step);
        self.step += 1;
        let model = &self.model;
        let (first, end) = self.shard.map_or((0, usize::MAX), |s| (s.start, s.start + s.len));
        for slot in &model.layout.slots {
            // The part of the tensor in this rank's shard (all of it when not sharded).
            let (lo, hi) = (slot.offset.max(first), (slot.offset + slot.len).min(end));
            if lo >= hi {
                continue;
            }
            let a = adam.with_decay(slot.decay);
            let p16 = model.weights16.as_ref().map_or(0u64, |w| w.at(lo, 2));
            launch!(gpu, "adamw", ((hi - lo).div_ceil(256).min(4096), 1), 256, 0;
                model.master.at(lo, 4), model.grads.at(lo, 4), model.m.at(lo - first, 4),
                model.v.at(lo - first, 4), p16, (hi - lo) as i64, clip_scale,
                a.lr, a.beta1, a.beta2, a.c1, a.c2, a.eps, a.decay)?;
        }
        if let (Some(shard), Some(nccl), Some(comm_stream)) = (self.shard, &self.nccl, &self.comm_stream) {
            // Every rank's updated shard of the weights, then their bf16 copy.
            comm_stream.join(&gpu.stream).map_err(super::memory::driver)?;
            nccl.all_gather(model.master.ptr, shard.len)?;
            gpu.stream.join(comm_stream).map_err(super::memory::driver)?;
            model.refresh_working_copy(gpu)?;
        }
        gpu.stream.synchronize().map_err(super::memory::driver)?;
        Ok(StepStats {
            step: self.step,
            loss: f64::from(loss_buf[0]),
            grad_norm: norm,
            lr: adam.lr,
            tokens,
        })
    }

    /// The global L2 norm of the gradients (fp64, fixed order).
    fn grad_norm(&self) -> Result<f64, CudaError> {
        let gpu = &self.gpu;
        let total = self.model.layout.total as i64;
        let partials = self.norm_partials.ptr;
        let out = self.norm_partials.at(NORM_BLOCKS, 8);
        launch!(gpu, "sum_squares", (NORM_BLOCKS, 1), 256, 0; self.model.grads.ptr, total, partials)?;
        launch!(gpu, "sum_partials", (1, 1), 1024, 0; partials, NORM_BLOCKS as i32, out, 0i32)?;
        let mut sum = [0f64];
        download(gpu, &mut sum, out)?;
        Ok(sum[0].sqrt())
    }

    /// Shards the AdamW moments across the NCCL group's ranks (ZeRO-1): this rank keeps only
    /// its [`Shard`] of them (1 / world of 8 bytes per parameter). Call after joining.
    pub fn shard_optimizer(&mut self) -> Result<(), CudaError> {
        let Some(nccl) = &self.nccl else {
            return Err(CudaError::Driver(
                "sharding the optimiser state needs the NCCL group (join first)".into(),
            ));
        };
        let shard = self.model.layout.shard(nccl.rank(), nccl.world_size())?;
        for full in [&mut self.model.m, &mut self.model.v] {
            let part = DevBuf::zeros(&self.gpu, shard.len * 4)?;
            super::memory::copy(&self.gpu, part.ptr, full.at(shard.start, 4), shard.len * 4)?;
            *full = part;
        }
        self.shard = Some(shard);
        Ok(())
    }

    /// Makes the state complete on this rank for [`GpuTrainer::to_cpu`]: with a sharded
    /// optimiser, every rank must call it (it gathers the moments, through the gradient
    /// buffer, which is free between steps). Without sharding it does nothing.
    pub fn prepare_checkpoint(&mut self) -> Result<(), CudaError> {
        let (Some(shard), Some(nccl), Some(comm_stream)) = (self.shard, &self.nccl, &self.comm_stream) else {
            return Ok(());
        };
        let (gpu, total) = (&self.gpu, self.model.layout.total);
        let mut gathered = Vec::with_capacity(2);
        for part in [&self.model.m, &self.model.v] {
            super::memory::copy(gpu, self.model.grads.at(shard.start, 4), part.ptr, shard.len * 4)?;
            comm_stream.join(&gpu.stream).map_err(super::memory::driver)?;
            nccl.all_gather(self.model.grads.ptr, shard.len)?;
            gpu.stream.join(comm_stream).map_err(super::memory::driver)?;
            let mut flat = vec![0f32; total];
            download(gpu, &mut flat, self.model.grads.ptr)?;
            gathered.push(flat);
        }
        let v = gathered.pop().expect("two gathered");
        let m = gathered.pop().expect("two gathered");
        self.gathered = Some((self.step, m, v));
        Ok(())
    }

    /// The state as a CPU trainer (weights, moments, step): for checkpoints. With a sharded
    /// optimiser, after [`GpuTrainer::prepare_checkpoint`].
    pub fn to_cpu(&self) -> Result<Trainer, CudaError> {
        let total = self.model.layout.total;
        let layout = &self.model.layout;
        let fetch = |ptr: u64| -> Result<Params<f32>, CudaError> {
            let mut flat = vec![0f32; total];
            download(&self.gpu, &mut flat, ptr)?;
            Ok(layout.unflatten(&flat, &self.model.config))
        };
        let params = fetch(self.model.master.ptr)?;
        let moments = match (&self.shard, &self.gathered) {
            (None, _) => (fetch(self.model.m.ptr)?, fetch(self.model.v.ptr)?),
            (Some(_), Some((step, m, v))) if *step == self.step => (
                layout.unflatten(m, &self.model.config),
                layout.unflatten(v, &self.model.config),
            ),
            (Some(_), _) => {
                return Err(CudaError::Driver(
                    "the optimiser state is sharded: every rank calls prepare_checkpoint before a checkpoint".into(),
                ));
            }
        };
        Trainer::from_state(
            self.model.config.clone(),
            params,
            moments,
            self.step,
            self.optim.clone(),
        )
        .map_err(CudaError::Driver)
    }
}
