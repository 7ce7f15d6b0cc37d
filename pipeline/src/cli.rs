//! Command-line interface: flags parsed into typed options, then one function per command.

use crate::config::Config;
use crate::engine::plan::Plan;
use crate::engine::ranks;
use crate::engine::run_dir::RunDir;
use crate::engine::runner::{self, RunOptions, StageSummary};
use crate::error::{Error, Result};
use crate::progress::Bars;
use crate::sql::{self, Format};
use crate::{classifier, export, gc, status};
use clap::{Parser, Subcommand, ValueEnum};
use safepipe_model::classifier::{HeadTraining, Precision, RunOptions as ClassifierOptions};
use std::path::PathBuf;
use std::sync::Arc;
use tracing::info;

#[derive(Debug, Parser)]
#[command(
    name = "safepipe",
    version,
    about = "Safety pretraining data pipeline: ingest, score, route, synthesize, tag, tokenize, pack."
)]
pub struct Cli {
    /// Log format on stderr: human-readable text or JSON lines (for cluster log collectors).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info`, `debug`, `safepipe=debug` (also from RUST_LOG). ONNX Runtime's
    /// own messages come under the target `ort`.
    #[arg(long, global = true, env = "RUST_LOG", default_value = "info,ort=warn")]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every stage for this rank's work units; current units are skipped, each unit is
    /// taken under a lease, then this rank packs its part of the shards.
    Run {
        config: PathBuf,
        /// This process's rank (default: from Slurm / Kubernetes variables, else 0).
        #[arg(long)]
        rank: Option<u32>,
        /// Number of ranks (default: from Slurm / Kubernetes variables, else 1).
        #[arg(long)]
        world_size: Option<u32>,
        /// Redo this stage and everything downstream even if committed (repeatable; `all`).
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Units processed at once (default: runner.jobs from the config, else the CPU count).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Split the inputs into work units and store the plan (once, before starting many ranks).
    Plan {
        config: PathBuf,
        /// Add units for input files that appeared since planning (e.g. a new dump), leaving
        /// every existing unit and result as it is.
        #[arg(long)]
        extend: bool,
    },
    /// Show per stage how many units are committed, stale, failed, damaged or pending, what the
    /// next run redoes and why, last errors, and input files changed since planning.
    Status {
        config: PathBuf,
        /// `json` prints one object per stage, for scripts and dashboards.
        #[arg(long, value_enum, default_value_t = StatusFormat::Text)]
        format: StatusFormat,
        /// Refresh every `--interval` seconds: redrawn in place on a terminal, one line per
        /// refresh otherwise (logs), with units committed / running / failed across all ranks,
        /// the rate and an ETA.
        #[arg(long)]
        watch: bool,
        /// Seconds between refreshes of `--watch`.
        #[arg(long, default_value_t = 10.0, requires = "watch")]
        interval: f64,
        /// With `--watch`: exit once every stage has every unit committed and current.
        #[arg(long, requires = "watch")]
        until_done: bool,
    },
    /// Write one self-contained HTML page of the run (flow of documents, scores, synthetic
    /// data, tagging, the mixture, stage timings, quarantine, training curves).
    Report {
        config: PathBuf,
        /// Write here instead of `report.html` in the run directory.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run one read-only SQL query over the run's tables.
    Sql {
        config: PathBuf,
        query: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        #[command(flatten)]
        limits: SqlLimits,
    },
    /// Interactive read-only SQL (statements end with `;`).
    Shell {
        config: PathBuf,
        #[command(flatten)]
        limits: SqlLimits,
    },
    /// Delete files no completion record names (leftovers of killed or superseded attempts).
    Gc {
        config: PathBuf,
        /// Only delete files at least this many seconds old (a unit being written is unnamed
        /// until it commits).
        #[arg(long, default_value_t = 3600)]
        min_age_secs: u64,
        /// List what would be deleted without deleting.
        #[arg(long)]
        dry_run: bool,
    },
    /// The run's tokenizer (the `[tokenize]` section, with the tag as one special token).
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Pretrain on the run's packed shards (the `[train]` section; docs/training.md).
    Train {
        config: PathBuf,
        /// Continue from the latest checkpoint in train.checkpoint_dir.
        #[arg(long)]
        resume: bool,
        /// Stop after this step (a checkpoint is saved there), e.g. to fit a job's time limit;
        /// `--resume` later continues exactly where it stopped.
        #[arg(long, value_name = "STEP")]
        until: Option<u64>,
        /// Start N ranks on this machine (one per GPU) and supervise them: a failed rank stops
        /// the others. Across machines, start one process per GPU with the scheduler instead.
        #[arg(long, value_name = "N")]
        nproc_per_node: Option<usize>,
    },
    /// Write the packed shards in another trainer's format.
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// Generate completions for prompts with the in-process engine or an OpenAI-compatible
    /// server (docs/synthesis.md): one JSON object per prompt, tokens/s on stderr.
    Generate(crate::llm::GenerateFlags),
    /// Evaluate a checkpoint on the run's held-out prompts under each decoder: unsafe rates by
    /// the classifier and an LLM judge, refusals, tag AUROC, perplexity (docs/evaluation.md).
    Eval(crate::eval::EvalFlags),
    /// Train a safety classifier's head, or score texts with one (docs/classifier.md).
    Classifier {
        #[command(subcommand)]
        command: ClassifierCommand,
    },
    /// The CUDA backend on this machine: libraries found, kernels compiled, kernels checked
    /// against the CPU backend on a GPU (docs/training.md).
    Gpu {
        #[command(subcommand)]
        command: crate::gpu::GpuCommand,
    },
}

/// Limits of `sql` and `shell` over `[sql]`.
#[derive(Debug, clap::Args)]
pub struct SqlLimits {
    /// Memory one query's operators may hold, MiB (beyond it they spill; 0 = no limit).
    #[arg(long, value_name = "MIB")]
    memory_limit_mb: Option<u64>,
    /// Stop a statement after this many seconds (0 = no limit).
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
}

impl SqlLimits {
    fn apply(self, mut config: Config) -> Config {
        if let Some(mb) = self.memory_limit_mb {
            config.sql.memory_limit_mb = mb;
        }
        if let Some(s) = self.timeout {
            config.sql.timeout_seconds = s;
        }
        config
    }
}

/// The flags of `safepipe classifier train`.
#[derive(Debug, clap::Args)]
pub struct TrainFlags {
    /// The encoder's manifest (e.g. models/minilm-l6/encoder.toml from `make setup`).
    #[arg(long)]
    encoder: PathBuf,
    /// Parquet with a text column and an integer score column (0..labels-1).
    #[arg(long)]
    data: PathBuf,
    /// The directory to write.
    #[arg(long)]
    out: PathBuf,
    /// The classifier's name (scores.model).
    #[arg(long, default_value = "safety-head")]
    name: String,
    #[arg(long, default_value = "text")]
    text_column: String,
    #[arg(long, default_value = "score")]
    score_column: String,
    /// A column with `train` / `test`; when absent, --test-fraction of texts are held out.
    #[arg(long, default_value = "split")]
    split_column: String,
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// Folds of the training rows: the threshold is chosen on out-of-fold judgements.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// A column naming each text's kind (e.g. mail, request): false-positive rates are bounded
    /// and reported per kind (optional).
    #[arg(long, default_value = "group")]
    group_column: String,
    /// The threshold keeps every group's false-positive rate on safe out-of-fold documents at
    /// or below this.
    #[arg(long, default_value_t = 0.04)]
    max_fpr: f64,
    /// A target for one group, GROUP=RATE (repeatable), e.g. request=0.08.
    #[arg(long, value_parser = group_target)]
    group_max_fpr: Vec<(String, f64)>,
    /// Cache the chunk embeddings in this file, so a retrain with other settings skips the
    /// encoder.
    #[arg(long)]
    embeddings_cache: Option<PathBuf>,
    /// At most this many examples per label in each part (0 = all), for quick runs.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Loss weight of examples with score > 0 (the paper upweights them).
    #[arg(long, default_value_t = HeadTraining::default().upweight)]
    upweight: f32,
    /// Units of the head's hidden layer (0: a linear head).
    #[arg(long, default_value_t = HeadTraining::default().hidden)]
    hidden: usize,
    #[arg(long, default_value_t = HeadTraining::default().epochs)]
    epochs: usize,
    /// Examples per Adam step.
    #[arg(long, default_value_t = HeadTraining::default().batch)]
    batch: usize,
    #[arg(long, default_value_t = HeadTraining::default().lr)]
    lr: f32,
    /// Seeds the head's initial weights and the order of examples.
    #[arg(long, default_value_t = HeadTraining::default().seed)]
    seed: u64,
    /// Multiple-instance rounds: refits where each unsafe document keeps only its most
    /// unsafe-looking chunk (0: every chunk carries its document's label).
    #[arg(long, default_value_t = 1)]
    instance_rounds: usize,
    /// Embed with the int8 encoder.
    #[arg(long)]
    int8: bool,
}

/// `GROUP=RATE` of `--group-max-fpr`.
fn group_target(s: &str) -> Result<(String, f64), String> {
    let (group, rate) = s.split_once('=').ok_or_else(|| format!("{s:?} is not GROUP=RATE"))?;
    let rate: f64 = rate.parse().map_err(|e| format!("{s:?}: {e}"))?;
    Ok((group.to_string(), rate))
}

impl TrainFlags {
    fn into_args(self) -> classifier::TrainArgs {
        classifier::TrainArgs {
            encoder: self.encoder,
            data: self.data,
            out: self.out,
            name: self.name,
            columns: classifier::LabelColumns {
                text: self.text_column,
                score: self.score_column,
                split: self.split_column,
                group: self.group_column,
            },
            division: classifier::Division {
                test_fraction: self.test_fraction,
                folds: self.folds,
                limit: self.limit,
            },
            targets: classifier::Targets {
                default: self.max_fpr,
                groups: self.group_max_fpr.into_iter().collect(),
            },
            embeddings_cache: self.embeddings_cache,
            instance_rounds: self.instance_rounds,
            training: HeadTraining {
                hidden: self.hidden,
                upweight: self.upweight,
                epochs: self.epochs,
                batch: self.batch,
                lr: self.lr,
                seed: self.seed,
                ..Default::default()
            },
            options: ClassifierOptions {
                precision: precision(self.int8),
                ..Default::default()
            },
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ClassifierCommand {
    /// Fit a head on frozen encoder embeddings of a labelled Parquet table, choose its threshold
    /// out of fold, and write a classifier directory (classifier.toml, head.safetensors,
    /// metrics.json).
    Train(Box<TrainFlags>),
    /// Score texts with a classifier manifest: one JSON object per text.
    Score {
        manifest: PathBuf,
        /// Texts to score; `-` reads one JSON string per line from stdin.
        #[arg(required = true)]
        texts: Vec<String>,
        #[arg(long)]
        int8: bool,
        /// Also print every chunk's token ids, logits and probabilities.
        #[arg(long)]
        chunks: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenizerCommand {
    /// Write the complete tokenizer.json (what trainers and `transformers` should load).
    Export {
        config: PathBuf,
        /// A file, or a directory to write `tokenizer.json` into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the token ids of a text (one JSON list), as the tokenize stage would, without EOS.
    Encode { config: PathBuf, text: String },
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Megatron-LM / NeMo indexed dataset: PREFIX.bin + PREFIX.idx (MMIDIDX).
    Megatron {
        config: PathBuf,
        /// Output path prefix, e.g. `out/safe_pretraining_text_document`.
        #[arg(long)]
        out: PathBuf,
    },
}

fn precision(int8: bool) -> Precision {
    if int8 { Precision::Int8 } else { Precision::Fp32 }
}

pub async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            rank,
            world_size,
            force,
            jobs,
        } => {
            let config = Arc::new(Config::load(&config).await?);
            let who = ranks::resolve(rank, world_size, |name| std::env::var(name).ok())?;
            info!(rank = who.rank, world_size = who.world_size, from = who.source, "rank");
            let options = RunOptions {
                rank: who.rank,
                world_size: who.world_size,
                force,
                jobs: jobs.unwrap_or(config.jobs),
            };
            let summaries = runner::run(config, options, Arc::new(Bars::new())).await?;
            print_summary(&summaries);
            let failed: usize = summaries.iter().map(|s| s.failed).sum();
            if failed > 0 {
                return Err(Error::UnitsFailed { failed });
            }
            let busy: usize = summaries.iter().map(|s| s.busy).sum();
            if busy > 0 {
                return Err(Error::UnitsBusy { busy });
            }
            Ok(())
        }
        Command::Plan { config, extend } => {
            let config = Config::load(&config).await?;
            let run_dir = RunDir::open(&config.run_dir)?;
            let (mut plan, created) = Plan::load_or_create(&config, &run_dir).await?;
            if extend && !created {
                let before = plan.units.len();
                let added = plan.extend(&config, &run_dir).await?;
                for file in &added {
                    println!("added {file}");
                }
                println!(
                    "{}: {} new file(s), {} new unit(s); {} units in all",
                    run_dir.display(),
                    added.len(),
                    plan.units.len() - before,
                    plan.units.len()
                );
                return Ok(());
            }
            let verb = if created { "made" } else { "already had" };
            println!(
                "{} {verb} a work plan of {} units ({})",
                run_dir.display(),
                plan.units.len(),
                plan.fingerprint
            );
            if !created {
                for line in plan.check_inputs(&config, &run_dir).await?.describe() {
                    println!("input {line}");
                }
            }
            Ok(())
        }
        Command::Status {
            config,
            format,
            watch,
            interval,
            until_done,
        } => {
            let config = Config::load(&config).await?;
            if watch {
                if !(interval.is_finite() && interval > 0.0) {
                    return Err(Error::Config(format!(
                        "--interval {interval}: give a number of seconds > 0"
                    )));
                }
                let options = crate::watch::WatchOptions {
                    interval: std::time::Duration::from_secs_f64(interval),
                    until_done,
                };
                return crate::watch::watch(&config, options).await;
            }
            let found = status::collect(&config).await?;
            match format {
                StatusFormat::Text => print!("{}", status::render(&config, &found)),
                StatusFormat::Json => {
                    let stages = found.as_ref().map(|r| r.stages.as_slice()).unwrap_or_default();
                    let json = serde_json::to_string_pretty(stages).map_err(|e| Error::Internal(e.to_string()))?;
                    println!("{json}");
                }
            }
            Ok(())
        }
        Command::Report { config, out } => {
            let config = Config::load(&config).await?;
            let written = crate::report::write(&config, out.as_deref()).await?;
            println!("report: {written}");
            Ok(())
        }
        Command::Sql {
            config,
            query,
            format,
            limits,
        } => {
            let config = limits.apply(Config::load(&config).await?);
            sql::sql(&config, &query, format).await
        }
        Command::Shell { config, limits } => {
            let config = limits.apply(Config::load(&config).await?);
            sql::shell(&config).await
        }
        Command::Gc {
            config,
            min_age_secs,
            dry_run,
        } => {
            let config = Config::load(&config).await?;
            let report = gc::collect(&config, std::time::Duration::from_secs(min_age_secs), dry_run).await?;
            for file in &report.orphans {
                println!("{} {file}", if dry_run { "would delete" } else { "deleted" });
            }
            println!(
                "{} unreferenced file(s), {} bytes{}; {} committed file(s) kept; {} unreferenced file(s) younger than {min_age_secs}s left alone",
                report.orphans.len(),
                report.orphan_bytes,
                if dry_run {
                    " (dry run: nothing deleted)"
                } else {
                    " deleted"
                },
                report.kept,
                report.too_young
            );
            Ok(())
        }
        Command::Tokenizer { command } => match command {
            TokenizerCommand::Export { config, out } => {
                let config = Config::load(&config).await?;
                let file = export::tokenizer_json(&config, &out)?;
                let t = config.tokenize.as_ref().expect("checked by export").tokenizer.get()?;
                println!(
                    "wrote {} (vocabulary {}, eos id {}, tag id {}, sha256 {})",
                    file.display(),
                    t.vocab_size(),
                    t.eos_id(),
                    t.tag_id().map_or("none".into(), |id| id.to_string()),
                    t.hash()
                );
                Ok(())
            }
            TokenizerCommand::Encode { config, text } => {
                let config = Config::load(&config).await?;
                let settings = config
                    .tokenize
                    .as_ref()
                    .ok_or_else(|| Error::Config(format!("{} has no [tokenize] section", config.path.display())))?;
                let ids = settings
                    .tokenizer
                    .get()?
                    .encode_text(&text)
                    .map_err(|e| Error::Internal(e.to_string()))?;
                println!("{}", serde_json::to_string(&ids).expect("ids serialise"));
                Ok(())
            }
        },
        Command::Train {
            config,
            resume,
            until,
            nproc_per_node: Some(n),
        } => crate::train::launch::launch(&config, n, resume, until).await,
        Command::Train {
            config, resume, until, ..
        } => {
            let config = Config::load(&config).await?;
            let summary = crate::train::train(&config, resume, until).await?;
            match (&summary.first, &summary.last) {
                (Some(first), Some(last)) => eprintln!(
                    "train: steps {}..{}, loss {:.4} -> {:.4}, {:.0} tokens/s{}",
                    summary.start_step + 1,
                    last.step,
                    first.loss,
                    last.loss,
                    summary.tokens_per_second,
                    summary
                        .checkpoint
                        .as_ref()
                        .map(|c| format!(", checkpoint {}", c.display()))
                        .unwrap_or_default()
                ),
                _ => eprintln!("train: nothing to do (already at train.steps)"),
            }
            Ok(())
        }
        Command::Gpu { command } => tokio::task::block_in_place(|| crate::gpu::run(command)),
        Command::Classifier { command } => match command {
            ClassifierCommand::Train(flags) => {
                let args = flags.into_args();
                let report = tokio::task::spawn_blocking(move || classifier::train(&args))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))??;
                classifier::print_report(&report);
                Ok(())
            }
            ClassifierCommand::Score {
                manifest,
                texts,
                int8,
                chunks,
            } => {
                let texts = classifier::expand_stdin(texts)?;
                tokio::task::spawn_blocking(move || classifier::score_texts(&manifest, precision(int8), &texts, chunks))
                    .await
                    .map_err(|e| Error::Internal(e.to_string()))?
            }
        },
        Command::Eval(flags) => crate::eval::run(flags).await,
        Command::Generate(flags) => {
            let prompts = classifier::expand_stdin(flags.prompts.clone())?;
            tokio::task::spawn_blocking(move || crate::llm::generate(flags, prompts))
                .await
                .map_err(|e| Error::Internal(e.to_string()))?
        }
        Command::Export { command } => match command {
            ExportCommand::Megatron { config, out } => {
                let config = Config::load(&config).await?;
                let report = export::megatron(&config, &out).await?;
                println!(
                    "wrote {} and {}: {} tokens, {} sequences, {} documents",
                    report.bin.display(),
                    report.idx.display(),
                    report.tokens,
                    report.sequences,
                    report.documents
                );
                Ok(())
            }
        },
    }
}

fn print_summary(summaries: &[StageSummary]) {
    for s in summaries {
        let c = &s.counts;
        let busy = if s.busy > 0 {
            format!(", {} held by another process", s.busy)
        } else {
            String::new()
        };
        eprintln!(
            "{}: {} unit(s) done, {} already committed, {} failed, {} waiting{busy}; rows in {} -> out {}, dropped {}, quarantined {} ({:.1}s)",
            s.stage,
            s.done_total(),
            s.skipped,
            s.failed,
            s.blocked,
            c.rows_in,
            c.rows_out,
            c.dropped_total(),
            c.quarantined,
            s.seconds
        );
    }
    let sent = crate::engine::requests::requests();
    if sent.total() > 0 {
        eprintln!("storage: {sent} sent to object stores");
    }
    let retried = crate::engine::retry::retries();
    if retried > 0 {
        eprintln!("storage: {retried} request(s) retried after transport errors");
    }
    if let Some(peak) = crate::progress::peak_memory_bytes() {
        eprintln!("peak memory: {} MiB", peak >> 20);
    }
}

/// Sets up `tracing` on stderr in the chosen format.
pub fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).map_err(|e| Error::Config(format!("--log {filter:?}: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| crate::progress::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    match format {
        LogFormat::Text => builder.compact().init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}
