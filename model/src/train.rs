//! Training on the CPU reference backend: AdamW with decoupled weight decay and fp32 master
//! weights, global-norm clipping, warmup + cosine or WSD schedules, gradient accumulation,
//! data parallelism through a [`Collective`] (crate::collective), and Hugging Face-format
//! checkpoints.
//!
//! Determinism: the backend is bit-exact across runs, reductions across ranks are summed in rank
//! order, and the data order is a function of (seed, step): a run stopped at step k and resumed
//! from its checkpoint continues bit-identically (tested).

pub use crate::collective::{Collective, CollectiveError, Rendezvous, Single, TcpCollective, ThreadRank};
use crate::llama::{Batch, CpuModel, LlamaConfig, Params};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// Cosine from the peak down to `min_lr` at `total_steps`.
    Cosine,
    /// Warmup-stable-decay: constant, then linear down to `min_lr` over the last
    /// `decay_fraction` of the steps.
    Wsd { decay_fraction: f64 },
}

/// Optimiser and schedule settings (the `[train]` section's numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    pub clip: f64,
}

impl Default for OptimConfig {
    /// The paper's optimiser (AdamW, lr 5e-4, weight decay 0.01) with a cosine to lr / 10.
    fn default() -> Self {
        OptimConfig {
            lr: 5e-4,
            min_lr: 5e-5,
            warmup_steps: 0,
            total_steps: 1,
            schedule: Schedule::Cosine,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            clip: 1.0,
        }
    }
}

impl OptimConfig {
    /// The learning rate of (0-based) `step`.
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let total = self.total_steps.max(self.warmup_steps + 1);
        // The last step taken is total - 1: it reaches min_lr.
        let progress = (step - self.warmup_steps) as f64 / (total - self.warmup_steps - 1).max(1) as f64;
        let progress = progress.min(1.0);
        match self.schedule {
            Schedule::Cosine => {
                self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Wsd { decay_fraction } => {
                let start = 1.0 - decay_fraction;
                if progress < start {
                    self.lr
                } else {
                    let t = (progress - start) / decay_fraction.max(1e-12);
                    self.lr + (self.min_lr - self.lr) * t
                }
            }
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    pub step: u64,
    /// Mean loss of this rank's micro-batches, averaged over ranks.
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Targets counted on this rank.
    pub tokens: usize,
}

/// One AdamW update of one tensor (fp32 weights and moments, arithmetic in f64): the CPU
/// backend's, and the oracle of the GPU's fused kernel.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Bias corrections 1 - beta^t.
    pub c1: f64,
    pub c2: f64,
    pub eps: f64,
    /// Decoupled weight decay (0 for norm weights).
    pub decay: f64,
}

impl OptimConfig {
    /// The AdamW update of (0-based) step `step`: its learning rate and bias corrections, with
    /// the weight decay of a matrix (see [`AdamStep::with_decay`]).
    pub fn adam_step(&self, step: u64) -> AdamStep {
        let t = (step + 1) as i32;
        AdamStep {
            lr: self.lr_at(step),
            beta1: self.beta1,
            beta2: self.beta2,
            c1: 1.0 - self.beta1.powi(t),
            c2: 1.0 - self.beta2.powi(t),
            eps: self.eps,
            decay: self.weight_decay,
        }
    }
}

impl AdamStep {
    /// This update for a tensor with (matrices) or without (norm weights) weight decay.
    pub fn with_decay(self, decayed: bool) -> AdamStep {
        AdamStep {
            decay: if decayed { self.decay } else { 0.0 },
            ..self
        }
    }

    /// Updates `p`, `m` and `v` from the gradient `g` (all the same length).
    pub fn apply(&self, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        let (b1, b2) = (self.beta1, self.beta2);
        for i in 0..p.len() {
            let g = f64::from(g[i]);
            let mi = b1 * f64::from(m[i]) + (1.0 - b1) * g;
            let vi = b2 * f64::from(v[i]) + (1.0 - b2) * g * g;
            m[i] = mi as f32;
            v[i] = vi as f32;
            let update = (mi / self.c1) / ((vi / self.c2).sqrt() + self.eps) + self.decay * f64::from(p[i]);
            p[i] = (f64::from(p[i]) - self.lr * update) as f32;
        }
    }
}

/// Model, fp32 master weights and AdamW state.
pub struct Trainer {
    pub model: CpuModel,
    pub params: Params<f32>,
    m: Params<f32>,
    v: Params<f32>,
    /// Optimiser steps taken.
    pub step: u64,
    pub optim: OptimConfig,
}

impl Trainer {
    pub fn new(config: LlamaConfig, params: Params<f32>, optim: OptimConfig) -> Result<Trainer, String> {
        let model = CpuModel::new(config)?;
        let (m, v) = (Params::zeros(&model.config), Params::zeros(&model.config));
        Ok(Trainer {
            model,
            params,
            m,
            v,
            step: 0,
            optim,
        })
    }

    /// A trainer from saved state (the GPU backend hands its state back this way to save it).
    pub fn from_state(
        config: LlamaConfig,
        params: Params<f32>,
        moments: (Params<f32>, Params<f32>),
        step: u64,
        optim: OptimConfig,
    ) -> Result<Trainer, String> {
        let mut trainer = Trainer::new(config, params, optim)?;
        (trainer.m, trainer.v) = moments;
        trainer.step = step;
        Ok(trainer)
    }

    /// The AdamW moments (first, second).
    pub fn moments(&self) -> (&Params<f32>, &Params<f32>) {
        (&self.m, &self.v)
    }

    /// Makes every rank hold rank 0's weights (after init or loading).
    pub fn sync_weights(&mut self, comm: &dyn Collective) -> Result<(), CollectiveError> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        for (_, t, _) in self.params.tensors_mut() {
            comm.broadcast(t)?;
        }
        Ok(())
    }

    /// One optimiser step over this rank's micro-batches (gradient accumulation), averaged
    /// across ranks, clipped, AdamW. A failed exchange leaves the weights untouched.
    pub fn train_step(&mut self, micro_batches: &[Batch], comm: &dyn Collective) -> Result<StepStats, CollectiveError> {
        let config = self.model.config.clone();
        let mut grads = Params::<f32>::zeros(&config);
        let (mut loss, mut tokens) = (0f64, 0usize);
        for batch in micro_batches {
            let l = self.model.loss_and_grad(&self.params, batch, &mut grads);
            loss += l.mean;
            tokens += l.tokens;
        }
        let scale = 1.0 / micro_batches.len().max(1) as f32;
        let mut flat = flatten(&grads);
        flat.iter_mut().for_each(|g| *g *= scale);
        comm.all_reduce_mean(&mut flat)?;
        let mut loss_buf = [(loss / micro_batches.len().max(1) as f64) as f32];
        comm.all_reduce_mean(&mut loss_buf)?;
        let norm = flat.iter().map(|g| f64::from(*g) * f64::from(*g)).sum::<f64>().sqrt();
        if self.optim.clip > 0.0 && norm > self.optim.clip {
            let s = (self.optim.clip / norm) as f32;
            flat.iter_mut().for_each(|g| *g *= s);
        }
        let adam = self.optim.adam_step(self.step);
        self.step += 1;
        let mut offset = 0;
        let m_tensors = self.m.tensors_mut();
        let v_tensors = self.v.tensors_mut();
        for (((_, p, shape), (_, m, _)), (_, v, _)) in
            self.params.tensors_mut().into_iter().zip(m_tensors).zip(v_tensors)
        {
            // Decoupled weight decay on matrices only (not on norm weights).
            let adam = adam.with_decay(shape.len() == 2);
            adam.apply(p, &flat[offset..offset + p.len()], m, v);
            offset += p.len();
        }
        Ok(StepStats {
            step: self.step,
            loss: f64::from(loss_buf[0]),
            grad_norm: norm,
            lr: adam.lr,
            tokens,
        })
    }

    /// Writes `dir/model.safetensors` (Hugging Face Llama names), `config.json`,
    /// `optimizer.safetensors` (AdamW moments) and `trainer_state.json` (`extra` is the caller's
    /// JSON, e.g. the data position). Files are written to `*.partial` and renamed, the state
    /// file last: a checkpoint without `trainer_state.json` is incomplete.
    pub fn save(&self, dir: &Path, bos: u32, eos: u32, extra: serde_json::Value) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        write_safetensors(&dir.join("model.safetensors"), &self.params, "")?;
        let mut moments = Vec::new();
        moments.extend(named_bytes(&self.m, "m."));
        moments.extend(named_bytes(&self.v, "v."));
        write_named(&dir.join("optimizer.safetensors"), moments)?;
        // cannot fail (here and below): a `serde_json::Value` always serialises.
        let config = serde_json::to_vec_pretty(&self.model.config.hf_config_json(bos, eos)).expect("json");
        write_atomic(&dir.join("config.json"), &config)?;
        let state = serde_json::json!({ "step": self.step, "optim": self.optim, "extra": extra });
        write_atomic(
            &dir.join("trainer_state.json"),
            &serde_json::to_vec_pretty(&state).expect("json"),
        )
    }

    /// Loads a checkpoint written by [`Trainer::save`] (weights, moments, step); returns the
    /// caller's `extra` JSON. A directory with only `model.safetensors` + `config.json` (any
    /// Hugging Face Llama checkpoint with tied embeddings) starts fresh moments at step 0.
    pub fn load(dir: &Path, optim: OptimConfig) -> Result<(Trainer, serde_json::Value), String> {
        let config_text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| format!("cannot read {}: {e}", dir.join("config.json").display()))?;
        let json: serde_json::Value = serde_json::from_str(&config_text).map_err(|e| format!("config.json: {e}"))?;
        let config = LlamaConfig::from_hf_json(&json)?;
        // Allocate what config.json claims only when the weights file can hold it (F32).
        let weights = dir.join("model.safetensors");
        let size = std::fs::metadata(&weights)
            .map_err(|e| format!("cannot read {}: {e}", weights.display()))?
            .len();
        // cannot overflow: `from_hf_json` bounded every size, so the count is below 2^47.
        let need = config.parameter_count() as u64 * 4;
        if size < need {
            return Err(format!(
                "{} is {size} bytes, too small for the {} parameters config.json describes ({need} bytes as F32)",
                weights.display(),
                config.parameter_count()
            ));
        }
        let mut params = Params::<f32>::zeros(&config);
        read_safetensors(&weights, &mut params, "")?;
        let mut trainer = Trainer::new(config, params, optim)?;
        let state_path = dir.join("trainer_state.json");
        if !state_path.exists() {
            return Ok((trainer, serde_json::Value::Null));
        }
        read_safetensors(&dir.join("optimizer.safetensors"), &mut trainer.m, "m.")?;
        read_safetensors(&dir.join("optimizer.safetensors"), &mut trainer.v, "v.")?;
        let state: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&state_path).map_err(|e| format!("cannot read {}: {e}", state_path.display()))?,
        )
        .map_err(|e| format!("trainer_state.json: {e}"))?;
        // The step feeds `powi` (an i32) and data positions (step x global batch): bound it.
        trainer.step = match state["step"].as_u64() {
            Some(step) if i32::try_from(step).is_ok() => step,
            Some(step) => return Err(format!("trainer_state.json: step = {step} is out of range")),
            None => return Err("trainer_state.json has no step".into()),
        };
        Ok((trainer, state["extra"].clone()))
    }
}

fn flatten(p: &Params<f32>) -> Vec<f32> {
    p.tensors()
        .into_iter()
        .flat_map(|(_, t, _)| t.iter().copied())
        .collect()
}

fn named_bytes(p: &Params<f32>, prefix: &str) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    p.tensors()
        .into_iter()
        .map(|(name, t, shape)| {
            let bytes = t.iter().flat_map(|x| x.to_le_bytes()).collect();
            (format!("{prefix}{name}"), shape, bytes)
        })
        .collect()
}

fn write_safetensors(path: &Path, p: &Params<f32>, prefix: &str) -> Result<(), String> {
    write_named(path, named_bytes(p, prefix))
}

pub(crate) fn write_named(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<u8>)>) -> Result<(), String> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("{name}: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| e.to_string())?;
    write_atomic(path, &bytes)
}

fn read_safetensors(path: &Path, p: &mut Params<f32>, prefix: &str) -> Result<(), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    for (name, t, shape) in p.tensors_mut() {
        let full = format!("{prefix}{name}");
        let view = file
            .tensor(&full)
            .map_err(|_| format!("{} has no tensor {full}", path.display()))?;
        if view.shape() != shape.as_slice() || view.dtype() != safetensors::Dtype::F32 {
            return Err(format!(
                "{}: {full} is {:?} {:?}, expected F32 {shape:?}",
                path.display(),
                view.dtype(),
                view.shape()
            ));
        }
        for (x, b) in t.iter_mut().zip(view.data().chunks_exact(4)) {
            // cannot fail: chunks_exact(4) yields 4-byte slices.
            *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        }
    }
    Ok(())
}

/// Writes `bytes` to `path.partial`, then renames it over `path`: readers see the old file or the
/// whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    std::fs::write(&partial, bytes).map_err(|e| format!("cannot write {}: {e}", partial.display()))?;
    std::fs::rename(&partial, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optim(total: u64) -> OptimConfig {
        OptimConfig {
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 2,
            total_steps: total,
            weight_decay: 0.1,
            ..OptimConfig::default()
        }
    }

    /// A deterministic stream of batches with learnable structure (each token predicts the next
    /// by a fixed rule).
    fn batch(rows: usize, seq: usize, vocab: usize, offset: usize) -> Batch {
        let tokens = (0..rows * (seq + 1))
            .map(|i| {
                let (r, t) = ((i / (seq + 1)) + offset, i % (seq + 1));
                ((r * 7 + t * 3) % vocab) as u32
            })
            .collect();
        Batch {
            rows,
            seq_len: seq,
            tokens,
            segments: None,
            loss_mask: None,
        }
    }

    fn micro() -> LlamaConfig {
        LlamaConfig::preset("micro").unwrap()
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        let mut o = optim(102);
        assert!((o.lr_at(0) - 1.5e-3).abs() < 1e-12);
        assert!((o.lr_at(1) - 3e-3).abs() < 1e-12);
        assert!((o.lr_at(102) - 3e-4).abs() < 1e-9);
        o.schedule = Schedule::Wsd { decay_fraction: 0.2 };
        assert_eq!(o.lr_at(50), 3e-3);
        assert!((o.lr_at(102) - 3e-4).abs() < 1e-9);
    }

    #[test]
    fn loss_falls_on_a_learnable_stream() {
        let cfg = micro();
        let mut o = optim(80);
        o.lr = 1e-2;
        let mut t = Trainer::new(cfg.clone(), Params::init(&cfg, 0), o).unwrap();
        let first = t.train_step(&[batch(4, 12, cfg.vocab_size, 0)], &Single).unwrap().loss;
        let mut last = first;
        for step in 1..80 {
            last = t
                .train_step(&[batch(4, 12, cfg.vocab_size, step * 4)], &Single)
                .unwrap()
                .loss;
        }
        // ln(61) = 4.11 at the start; the next token is a fixed function of the current one.
        assert!(last < first * 0.4, "loss {first} -> {last}");
    }

    #[test]
    fn two_ranks_of_b_equal_one_rank_of_2b_and_accumulation() {
        let cfg = micro();
        let steps = 4;
        // One rank, batch 2b.
        let mut one = Trainer::new(cfg.clone(), Params::init(&cfg, 1), optim(10)).unwrap();
        for s in 0..steps {
            one.train_step(&[batch(4, 10, cfg.vocab_size, s * 4)], &Single).unwrap();
        }
        // Two thread ranks, batch b each (rows 0-1 and 2-3 of the same global batch).
        let ranks = ThreadRank::group(2);
        let results: Vec<Params<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|comm| {
                    let cfg = cfg.clone();
                    scope.spawn(move || {
                        let mut t = Trainer::new(cfg.clone(), Params::init(&cfg, 1), optim(10)).unwrap();
                        for s in 0..steps {
                            let b = batch(2, 10, cfg.vocab_size, s * 4 + comm.rank() * 2);
                            t.train_step(&[b], comm).unwrap();
                        }
                        t.params
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Gradient accumulation: two micro-batches of b on one rank.
        let mut acc = Trainer::new(cfg.clone(), Params::init(&cfg, 1), optim(10)).unwrap();
        for s in 0..steps {
            acc.train_step(
                &[
                    batch(2, 10, cfg.vocab_size, s * 4),
                    batch(2, 10, cfg.vocab_size, s * 4 + 2),
                ],
                &Single,
            )
            .unwrap();
        }
        let reference = flatten(&one.params);
        for other in [flatten(&results[0]), flatten(&results[1]), flatten(&acc.params)] {
            let worst = reference
                .iter()
                .zip(&other)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-5, "max difference {worst}");
        }
        assert_eq!(
            flatten(&results[0]),
            flatten(&results[1]),
            "ranks must hold identical weights"
        );
    }

    #[test]
    fn resume_from_a_checkpoint_is_bit_exact() {
        let cfg = micro();
        let dir = tempfile::tempdir().unwrap();
        let mut straight = Trainer::new(cfg.clone(), Params::init(&cfg, 2), optim(8)).unwrap();
        let mut stopped = Trainer::new(cfg.clone(), Params::init(&cfg, 2), optim(8)).unwrap();
        for s in 0..8 {
            straight
                .train_step(&[batch(3, 9, cfg.vocab_size, s * 3)], &Single)
                .unwrap();
        }
        for s in 0..3 {
            stopped
                .train_step(&[batch(3, 9, cfg.vocab_size, s * 3)], &Single)
                .unwrap();
        }
        stopped
            .save(dir.path(), 1, 0, serde_json::json!({"rows_seen": 9}))
            .unwrap();
        let (mut resumed, extra) = Trainer::load(dir.path(), optim(8)).unwrap();
        assert_eq!(extra["rows_seen"], 9);
        assert_eq!(resumed.step, 3);
        for s in 3..8 {
            resumed
                .train_step(&[batch(3, 9, cfg.vocab_size, s * 3)], &Single)
                .unwrap();
        }
        assert_eq!(flatten(&resumed.params), flatten(&straight.params));
        // Weights-only directories (a Hugging Face checkpoint) load too, at step 0.
        std::fs::remove_file(dir.path().join("trainer_state.json")).unwrap();
        let (fresh, _) = Trainer::load(dir.path(), optim(8)).unwrap();
        assert_eq!(fresh.step, 0);
        assert_eq!(fresh.params, stopped.params);
    }
}
