//! The two training backends behind one interface: the CPU reference backend (`Trainer`) and
//! the CUDA backend (`GpuTrainer`, one GPU per rank). Both start from the same state (a fresh
//! init, `init_from` or a checkpoint, loaded on the CPU) and save the same checkpoints.

use super::group::Group;
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use safepipe_model::cuda::memory::MemoryPlan;
use safepipe_model::cuda::trainer::GpuTrainer;
use safepipe_model::cuda::{Gpu, Precision, nvrtc};
use safepipe_model::llama::{Batch, LlamaConfig};
use safepipe_model::train::{Collective, StepStats, Trainer};
use std::path::Path;
use tracing::info;

pub enum Backend {
    Cpu(Box<Trainer>),
    /// The trainer, and whether to shard its optimiser state once the group has formed.
    Cuda(Box<GpuTrainer>, bool),
}

/// With several CUDA ranks, NCCL must be loadable: see [`crate::gpu::reexec_for_nccl`].
pub fn ensure_nccl_loadable(t: &TrainConfig, world: usize) -> Result<()> {
    if t.backend != "cuda" || world == 1 {
        return Ok(());
    }
    crate::gpu::reexec_for_nccl()
}

/// The GPU this rank uses: LOCAL_RANK (torchrun, our launcher), else SLURM_LOCALID, else 0.
fn device_ordinal() -> Result<usize> {
    for var in ["LOCAL_RANK", "SLURM_LOCALID"] {
        if let Ok(value) = std::env::var(var)
            && !value.is_empty()
        {
            return value
                .parse()
                .map_err(|_| Error::Config(format!("{var} = {value:?} is not a number")));
        }
    }
    Ok(0)
}

impl Backend {
    /// The backend `t.backend` names, holding `trainer`'s state.
    pub fn open(t: &TrainConfig, trainer: Trainer, tokens_per_micro_batch: usize) -> Result<Backend> {
        if t.backend != "cuda" {
            return Ok(Backend::Cpu(Box::new(trainer)));
        }
        let precision = Precision::parse(&t.precision).expect("checked when the config loaded");
        let ordinal = device_ordinal()?;
        let gpu = Gpu::open(ordinal, &nvrtc::cache_dir())?;
        let config = &trainer.model.config;
        let plan = MemoryPlan::of(config, tokens_per_micro_batch, precision, t.recompute);
        let free = gpu.context.mem_get_info().map(|(f, _)| f).unwrap_or(0);
        info!(
            gpu = %gpu.name,
            arch = %gpu.arch.sm(),
            ordinal,
            precision = t.precision.as_str(),
            "memory plan per GPU: {} ({:.1} GiB free)",
            plan.describe(),
            free as f64 / (1u64 << 30) as f64
        );
        if plan.total() > free {
            return Err(Error::Config(format!(
                "the run needs about {:.1} GiB on the GPU ({}) but {:.1} GiB are free: set train.recompute = true, \
                 or lower train.micro_batch (and raise train.grad_accum to keep the global batch)",
                plan.total() as f64 / (1u64 << 30) as f64,
                plan.describe(),
                free as f64 / (1u64 << 30) as f64
            )));
        }
        let mut gpu_trainer = GpuTrainer::from_cpu(gpu, &trainer, precision)?;
        gpu_trainer.model.recompute = t.recompute;
        Ok(Backend::Cuda(Box::new(gpu_trainer), t.zero1))
    }

    pub fn step(&self) -> u64 {
        match self {
            Backend::Cpu(t) => t.step,
            Backend::Cuda(t, _) => t.step,
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        match self {
            Backend::Cpu(t) => &t.model.config,
            Backend::Cuda(t, _) => t.config(),
        }
    }

    /// Makes every rank hold rank 0's state before the first step.
    pub fn join(&mut self, comm: &dyn Collective, group: &Group) -> Result<()> {
        match self {
            Backend::Cpu(t) => t.sync_weights(comm).map_err(|e| group.error(e)),
            Backend::Cuda(t, zero1) => {
                t.join(comm)?;
                if *zero1 && comm.world_size() > 1 {
                    t.shard_optimizer()?;
                }
                Ok(())
            }
        }
    }

    /// One optimiser step; a lost peer fails as the group reports it.
    pub fn train_step(&mut self, micro: &[Batch], comm: &dyn Collective, group: &Group) -> Result<StepStats> {
        match self {
            Backend::Cpu(t) => t.train_step(micro, comm).map_err(|e| group.error(e)),
            Backend::Cuda(t, _) => Ok(t.train_step(micro, comm)?),
        }
    }

    /// What every rank does before rank 0 saves a checkpoint: a sharded optimiser state is
    /// gathered (a collective), nothing otherwise.
    pub fn prepare_checkpoint(&mut self) -> Result<()> {
        match self {
            Backend::Cpu(_) => Ok(()),
            Backend::Cuda(t, _) => Ok(t.prepare_checkpoint()?),
        }
    }

    /// Saves a checkpoint (the GPU's state is copied to the host first).
    pub fn save(&self, dir: &Path, bos: u32, eos: u32, extra: serde_json::Value) -> Result<(), String> {
        match self {
            Backend::Cpu(t) => t.save(dir, bos, eos, extra),
            Backend::Cuda(t, _) => t.to_cpu().map_err(|e| e.to_string())?.save(dir, bos, eos, extra),
        }
    }
}
