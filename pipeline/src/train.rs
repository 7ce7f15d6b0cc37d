//! `safepipe train CONFIG`: pretrains a SmolLM2-family model on the run's packed shards with the
//! CPU reference backend (the `[train]` section; docs/training.md).
//!
//! Data order: each epoch is a permutation of the shard rows seeded by (seed, epoch); global row
//! position `p = step * global_batch + i` maps to row `perm(p / rows)[p % rows]`, and rank `r`
//! takes positions `r * micro_batch ..` of each micro-batch slot. So the rows a step sees depend
//! only on (seed, step): resuming at step k repeats and skips nothing.

use crate::config::{Config, TrainConfig};
use crate::error::{Error, Result};
use crate::pack::{Manifest, load_manifest, open_shard};
use crate::storage::Stores;
use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, UInt16Type, UInt32Type};
use futures::TryStreamExt;
use safepipe_model::llama::{Batch, LlamaConfig, Params};
use safepipe_model::train::{Collective, OptimConfig, Schedule, Single, StepStats, TcpCollective, Trainer};
use safepipe_operators::pack::doc_hash;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::info;

/// The packed rows, in memory.
pub struct ShardRows {
    pub seq_len: usize,
    /// `rows * (seq_len + 1)` ids.
    pub tokens: Vec<u32>,
    /// Per row: segment starts and whether the first continues a document.
    pub offsets: Vec<Vec<u32>>,
}

impl ShardRows {
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// Reads every shard the manifest names.
    pub async fn load(stores: &Stores, manifest: &Manifest) -> Result<ShardRows> {
        let row_len = manifest.seq_len + 1;
        let mut tokens = Vec::with_capacity(manifest.tokens as usize);
        let mut offsets = Vec::new();
        for shard in &manifest.shards {
            let mut stream = open_shard(&stores.resolve(&shard.file)?).await?;
            while let Some(batch) = stream.try_next().await? {
                let ids = batch.column(0).as_list::<i32>();
                let starts = batch.column(1).as_list::<i32>();
                match ids.values().data_type() {
                    DataType::UInt16 => tokens.extend(
                        ids.values()
                            .as_primitive::<UInt16Type>()
                            .values()
                            .iter()
                            .map(|&t| u32::from(t)),
                    ),
                    _ => tokens.extend(ids.values().as_primitive::<UInt32Type>().values().iter().copied()),
                }
                for row in 0..batch.num_rows() {
                    offsets.push(starts.value(row).as_primitive::<UInt32Type>().values().to_vec());
                }
            }
        }
        if tokens.len() != offsets.len() * row_len {
            return Err(Error::Internal(format!(
                "shards hold {} ids for {} rows of {row_len}",
                tokens.len(),
                offsets.len()
            )));
        }
        Ok(ShardRows {
            seq_len: manifest.seq_len,
            tokens,
            offsets,
        })
    }

    /// A batch of the given rows; with `document_mask`, attention stays within documents.
    pub fn batch(&self, rows: &[usize], document_mask: bool) -> Batch {
        let row_len = self.seq_len + 1;
        let mut tokens = Vec::with_capacity(rows.len() * row_len);
        let mut segments = Vec::with_capacity(rows.len() * self.seq_len);
        for &r in rows {
            tokens.extend_from_slice(&self.tokens[r * row_len..(r + 1) * row_len]);
            let starts = &self.offsets[r];
            let mut segment = 0u32;
            for t in 0..self.seq_len {
                while (segment as usize + 1) < starts.len() && starts[segment as usize + 1] as usize <= t {
                    segment += 1;
                }
                segments.push(segment);
            }
        }
        Batch {
            rows: rows.len(),
            seq_len: self.seq_len,
            tokens,
            segments: document_mask.then_some(segments),
            loss_mask: None,
        }
    }
}

/// The seeded order of rows: epoch permutations computed on demand.
pub struct RowOrder {
    seed: u64,
    rows: usize,
    epoch: Option<(u64, Vec<usize>)>,
}

impl RowOrder {
    pub fn new(seed: u64, rows: usize) -> Self {
        RowOrder {
            seed,
            rows,
            epoch: None,
        }
    }

    /// The row at global position `p`.
    pub fn row(&mut self, p: u64) -> usize {
        let epoch = p / self.rows as u64;
        if self.epoch.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..self.rows).collect();
            perm.sort_by_key(|&i| (doc_hash(self.seed, 3, epoch as u32, i as u32, 0), i));
            self.epoch = Some((epoch, perm));
        }
        self.epoch.as_ref().expect("set above").1[(p % self.rows as u64) as usize]
    }
}

fn optim(t: &TrainConfig) -> OptimConfig {
    OptimConfig {
        lr: t.lr,
        min_lr: t.min_lr.unwrap_or(t.lr / 10.0),
        warmup_steps: t.warmup_steps,
        total_steps: t.steps,
        schedule: if t.schedule == "wsd" {
            Schedule::Wsd {
                decay_fraction: t.decay_fraction,
            }
        } else {
            Schedule::Cosine
        },
        weight_decay: t.weight_decay,
        beta1: t.beta1,
        beta2: t.beta2,
        eps: t.eps,
        clip: t.clip,
    }
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub first: Option<StepStats>,
    pub last: Option<StepStats>,
    pub start_step: u64,
    pub tokens_per_second: f64,
    pub checkpoint: Option<PathBuf>,
}

const LATEST: &str = "latest";

/// Runs `[train]` of `config`; `resume` continues from `checkpoint_dir/latest`; `until` stops
/// (with a checkpoint) after that step.
pub async fn train(config: &Config, resume: bool, until: Option<u64>) -> Result<TrainSummary> {
    let t = config.train.as_ref().ok_or_else(|| {
        Error::Config(format!(
            "{} has no [train] section (docs/training.md)",
            config.path.display()
        ))
    })?;
    let stores = Stores::default();
    let run_dir = stores.resolve(&config.run_dir)?;
    let manifest = load_manifest(&run_dir).await?.ok_or_else(|| {
        Error::Config(format!(
            "no packed shards in {}: run `safepipe run {}` (with [tokenize] and [pack]) first",
            run_dir.display(),
            config.path.display()
        ))
    })?;
    let data = ShardRows::load(&stores, &manifest).await?;
    if data.is_empty() {
        return Err(Error::Config("the shards hold no rows: nothing to train on".into()));
    }
    let fail = |e: String| Error::Config(format!("train: {e}"));
    let checkpoint_dir = PathBuf::from(&t.checkpoint_dir);
    let latest = checkpoint_dir.join(LATEST);
    let mut trainer = if resume {
        let name = std::fs::read_to_string(&latest).map_err(|e| {
            Error::Config(format!(
                "--resume: cannot read {} ({e}); no checkpoint to resume from",
                latest.display()
            ))
        })?;
        let dir = checkpoint_dir.join(name.trim());
        info!(checkpoint = %dir.display(), "resuming");
        Trainer::load(&dir, optim(t)).map_err(fail)?.0
    } else if let Some(init) = &t.init_from {
        let mut trainer = Trainer::load(Path::new(init), optim(t)).map_err(fail)?.0;
        trainer.step = 0;
        trainer
    } else {
        let model = LlamaConfig::preset(&t.model).expect("checked when the config loaded");
        Trainer::new(model.clone(), Params::init(&model, t.seed), optim(t)).map_err(fail)?
    };
    let vocab = manifest.tokenizer.vocab_size;
    if trainer.model.config.vocab_size < vocab {
        return Err(fail(format!(
            "the model's vocabulary ({}) is smaller than the tokenizer's ({vocab})",
            trainer.model.config.vocab_size
        )));
    }
    let comm = connect()?;
    trainer.sync_weights(comm.as_ref());
    let global = t.micro_batch * t.grad_accum * comm.world_size();
    let flops_per_token = trainer.model.config.flops_per_token(data.seq_len);
    info!(
        model = %t.model,
        parameters = trainer.model.config.parameter_count(),
        rows = data.len(),
        seq_len = data.seq_len,
        global_batch = global,
        from_step = trainer.step,
        steps = t.steps,
        "training"
    );
    let mut order = RowOrder::new(t.seed, data.len());
    let bar = crate::progress::step_bar(t.steps, "train");
    bar.set_position(trainer.step);
    let start_step = trainer.step;
    let clock = Instant::now();
    let (mut first, mut last, mut tokens_total) = (None, None, 0usize);
    let mut saved = None;
    let stop = until.unwrap_or(t.steps).min(t.steps);
    while trainer.step < stop {
        let step = trainer.step;
        let micro: Vec<Batch> = (0..t.grad_accum)
            .map(|j| {
                let base = step * global as u64 + ((j * comm.world_size() + comm.rank()) * t.micro_batch) as u64;
                let rows: Vec<usize> = (0..t.micro_batch as u64).map(|i| order.row(base + i)).collect();
                data.batch(&rows, t.document_mask)
            })
            .collect();
        let step_clock = Instant::now();
        let stats = tokio::task::block_in_place(|| trainer.train_step(&micro, comm.as_ref()));
        let seconds = step_clock.elapsed().as_secs_f64();
        tokens_total += stats.tokens;
        let tokens_per_second = stats.tokens as f64 / seconds;
        let achieved = tokens_per_second * flops_per_token;
        let leader = comm.rank() == 0;
        if leader && (stats.step % t.log_every == 0 || stats.step == t.steps) {
            let mfu = t.peak_flops.map(|peak| achieved / peak);
            info!(
                step = stats.step,
                loss = format!("{:.4}", stats.loss),
                lr = format!("{:.3e}", stats.lr),
                grad_norm = format!("{:.3}", stats.grad_norm),
                tokens_per_second = format!("{tokens_per_second:.0}"),
                gflops = format!("{:.2}", achieved / 1e9),
                mfu = mfu
                    .map(|m| format!("{:.1}%", m * 100.0))
                    .unwrap_or_else(|| "n/a (set train.peak_flops)".into()),
                "step"
            );
        }
        bar.set_message(format!("loss {:.4}", stats.loss));
        bar.inc(1);
        first.get_or_insert(stats);
        last = Some(stats);
        let due = t.checkpoint_every > 0 && stats.step % t.checkpoint_every == 0;
        if leader && (due || stats.step == stop) {
            saved = Some(save(&trainer, config, &checkpoint_dir, global)?);
        }
    }
    bar.finish_and_clear();
    Ok(TrainSummary {
        first,
        last,
        start_step,
        tokens_per_second: tokens_total as f64 / clock.elapsed().as_secs_f64().max(1e-9),
        checkpoint: saved,
    })
}

/// The data-parallel group from the environment: torchrun-style `RANK` / `WORLD_SIZE`, else
/// Slurm's `SLURM_PROCID` / `SLURM_NTASKS`, else one rank. Rank 0 listens at
/// `MASTER_ADDR:MASTER_PORT` (default 127.0.0.1:29500); `SAFEPIPE_RENDEZVOUS_TIMEOUT` seconds
/// (default 300) bound the wait for the others.
fn connect() -> Result<Box<dyn Collective>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let number = |k: &str, v: String| {
        v.parse::<usize>()
            .map_err(|_| Error::Config(format!("{k} = {v:?} is not a number")))
    };
    let (rank, world) = match (var("RANK"), var("WORLD_SIZE"), var("SLURM_PROCID"), var("SLURM_NTASKS")) {
        (Some(r), Some(w), _, _) => (number("RANK", r)?, number("WORLD_SIZE", w)?),
        (_, _, Some(r), Some(w)) => (number("SLURM_PROCID", r)?, number("SLURM_NTASKS", w)?),
        _ => (0, 1),
    };
    if world <= 1 {
        return Ok(Box::new(Single));
    }
    let host = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
    let port = var("MASTER_PORT").unwrap_or_else(|| "29500".into());
    let timeout = var("SAFEPIPE_RENDEZVOUS_TIMEOUT").map_or(Ok(300), |v| number("SAFEPIPE_RENDEZVOUS_TIMEOUT", v))?;
    let master = std::net::ToSocketAddrs::to_socket_addrs(&format!("{host}:{port}"))
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| Error::Config(format!("MASTER_ADDR:MASTER_PORT = {host}:{port} does not resolve")))?;
    info!(rank, world_size = world, master = %master, "joining the data-parallel group");
    let comm = TcpCollective::connect(rank, world, master, std::time::Duration::from_secs(timeout as u64))
        .map_err(Error::Config)?;
    Ok(Box::new(comm))
}

/// Saves `step-NNNNNNNN/` with the tokenizer beside the weights, then points `latest` at it.
fn save(trainer: &Trainer, config: &Config, dir: &Path, global: usize) -> Result<PathBuf> {
    let name = format!("step-{:08}", trainer.step);
    let target = dir.join(&name);
    let (bos, eos) = match &config.tokenize {
        Some(t) => (t.tokenizer.eos_id(), t.tokenizer.eos_id()),
        None => (0, 0),
    };
    let extra = serde_json::json!({ "rows_seen": trainer.step * global as u64, "global_batch": global });
    trainer
        .save(&target, bos, eos, extra)
        .map_err(|e| Error::Config(format!("saving a checkpoint: {e}")))?;
    if let Some(t) = &config.tokenize {
        std::fs::write(target.join("tokenizer.json"), t.tokenizer.json())
            .map_err(|e| Error::Config(format!("saving the tokenizer: {e}")))?;
    }
    let partial = dir.join(format!("{LATEST}.partial"));
    std::fs::write(&partial, &name).map_err(|e| Error::Config(format!("{}: {e}", partial.display())))?;
    std::fs::rename(&partial, dir.join(LATEST)).map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
    info!(checkpoint = %target.display(), step = trainer.step, "saved");
    Ok(target)
}
