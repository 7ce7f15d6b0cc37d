//! The run's TOML config: parsed and validated before any work starts, without touching a
//! model file ([`Lazy`] loads those on first use). docs/config.md documents every key; errors
//! name the key and the fix.
//!
//! Each stage's section (its raw form, checks and resolved settings) lives beside the stage:
//! `[[inputs]]`/`[ingest]` in `stages/ingest.rs`, `[score]` in `stages/score.rs`, `[route]`,
//! `[tag]`, `[tokenize]` in theirs, `[synthesize]`/`[annotate]` in `stages/synthesize.rs`,
//! `[pack]` in `pack/stage.rs`, `[plan]` in `engine/plan.rs`, `[llm]` in `llm.rs`. This file
//! holds the whole (`RawConfig` -> [`Config`]), `[runner]` and `[train]` (`[sql]` is in
//! `sql.rs`), and checks the stage
//! graph the sections make ([`crate::stages::StageGraph`]).

use crate::engine::plan::PlanConfig;
use crate::error::{Error, Result};
use crate::llm::{LlmConfig, SharedGenerator};
use crate::pack::PackConfig;
use crate::sql::SqlConfig;
use crate::stages::ingest::{IngestConfig, InputConfig, check_inputs};
use crate::stages::route::RouteConfig;
use crate::stages::score::{ScoreConfig, ScoreSettings};
use crate::stages::synthesize::{AnnotateConfig, SynthesizeConfig};
use crate::stages::tag::TagConfig;
use crate::stages::tokenize::{TokenizeConfig, TokenizeSettings};
use safepipe_operators::route::{RouteRules, ScoreTable};
use safepipe_operators::synthesize::{AnnotateSettings, SynthesisSettings};
use safepipe_operators::tag::Tagger;
use serde::{Deserialize, Serialize};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, OnceLock};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    run_dir: String,
    #[serde(default)]
    inputs: Vec<InputConfig>,
    #[serde(default)]
    plan: PlanConfig,
    #[serde(default)]
    ingest: IngestConfig,
    #[serde(default)]
    route: RouteConfig,
    #[serde(default)]
    tag: TagConfig,
    #[serde(default)]
    runner: RunnerConfig,
    #[serde(default)]
    sql: SqlConfig,
    score: Option<ScoreConfig>,
    tokenize: Option<TokenizeConfig>,
    pack: Option<PackConfig>,
    train: Option<TrainConfig>,
    llm: Option<LlmConfig>,
    synthesize: Option<SynthesizeConfig>,
    annotate: Option<AnnotateConfig>,
    eval: Option<crate::eval::EvalConfig>,
}

/// A part of the config that reads model files (a tokenizer, a model's identity, the LLM
/// backend): checked and loaded on first use, then shared. `plan`, `gc` and `sql` never load
/// it, so they need only the config and the run directory; `run`, `status`, `train` and
/// `generate` load it before any work (the stage fingerprints hold it), so a missing model is
/// still an error at the start, naming the key.
pub struct Lazy<T> {
    cell: Arc<OnceLock<std::result::Result<T, String>>>,
    load: Arc<dyn Fn() -> std::result::Result<T, String> + Send + Sync>,
}

impl<T> Clone for Lazy<T> {
    fn clone(&self) -> Self {
        Lazy {
            cell: self.cell.clone(),
            load: self.load.clone(),
        }
    }
}

impl<T> Lazy<T> {
    pub(crate) fn new(load: impl Fn() -> std::result::Result<T, String> + Send + Sync + 'static) -> Self {
        Lazy {
            cell: Arc::new(OnceLock::new()),
            load: Arc::new(load),
        }
    }

    /// Loads on the first call; every later call returns the same value or error.
    pub fn get(&self) -> Result<&T> {
        self.cell
            .get_or_init(|| (self.load)())
            .as_ref()
            .map_err(|e| Error::Config(e.clone()))
    }
}

impl<T> std::fmt::Debug for Lazy<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match self.cell.get() {
            None => "not loaded",
            Some(Ok(_)) => "loaded",
            Some(Err(_)) => "failed",
        };
        write!(f, "Lazy({state})")
    }
}

/// `[train]`: `safepipe train CONFIG` pretrains on this run's packed shards.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A model preset (`smollm2-135m`, `smollm2-360m`, `smollm2-1.7b`, `tiny`, `micro`).
    #[serde(default = "default_preset")]
    pub model: String,
    /// Start from this Hugging Face-format checkpoint directory instead of a fresh init.
    #[serde(default)]
    pub init_from: Option<String>,
    /// Train on the packed shards of this run directory (path or URL) instead of this config's.
    #[serde(default)]
    pub shards: Option<String>,
    /// Where checkpoints go (`step-NNNNNNNN/` + `latest`).
    pub checkpoint_dir: String,
    /// Save every this many steps (and at the end); 0 = only at the end.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Optimiser steps to take in total.
    pub steps: u64,
    /// Rows (sequences of seq_len + 1) per micro-batch per rank.
    #[serde(default = "default_micro_batch")]
    pub micro_batch: usize,
    /// Micro-batches per optimiser step (global batch = micro_batch x grad_accum x ranks).
    #[serde(default = "one_usize")]
    pub grad_accum: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default)]
    pub warmup_steps: u64,
    /// `cosine` or `wsd`.
    #[serde(default = "default_schedule")]
    pub schedule: String,
    /// WSD: the share of steps spent decaying.
    #[serde(default = "default_decay_fraction")]
    pub decay_fraction: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "one")]
    pub clip: f64,
    /// Seeds the initial weights and the data order.
    #[serde(default)]
    pub seed: u64,
    /// Keep attention within documents (from the shards' `doc_offsets`).
    #[serde(default = "yes")]
    pub document_mask: bool,
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// The machine's peak FLOP/s, to report MFU (default: only achieved FLOP/s is logged).
    #[serde(default)]
    pub peak_flops: Option<f64>,
    /// The CPU backend's matrix products: `blocked` (SIMD GEMM) or `reference` (plain loops).
    #[serde(default = "default_kernels")]
    pub kernels: String,
    /// `cpu` (the reference backend) or `cuda` (one GPU per rank: LOCAL_RANK picks it).
    #[serde(default = "default_backend")]
    pub backend: String,
    /// The CUDA backend's storage of weights and activations: `bf16` or `fp32` (checks).
    #[serde(default = "default_precision")]
    pub precision: String,
    /// The CUDA backend keeps only each layer's input and recomputes the rest when going back.
    #[serde(default)]
    pub recompute: bool,
    /// The CUDA backend shards the AdamW moments across the ranks (ZeRO-1).
    #[serde(default)]
    pub zero1: bool,
}

fn default_backend() -> String {
    "cpu".into()
}

fn default_precision() -> String {
    "bf16".into()
}

fn default_kernels() -> String {
    "blocked".into()
}

fn default_preset() -> String {
    "tiny".into()
}
fn default_micro_batch() -> usize {
    4
}
fn one_usize() -> usize {
    1
}
fn one_u64() -> u64 {
    1
}
fn yes() -> bool {
    true
}
fn default_lr() -> f64 {
    5e-4
}
fn default_schedule() -> String {
    "cosine".into()
}
fn default_decay_fraction() -> f64 {
    0.2
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.95
}
fn default_eps() -> f64 {
    1e-8
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// Units processed at once per rank; 0 = the number of CPU cores.
    pub jobs: usize,
    /// How long a unit's lease lasts without renewal before another process may take the unit
    /// over (its holder renews it every third of this while working).
    pub lease_seconds: u64,
    /// A rank that ends a stage with at least this many of the stage's records missing from its
    /// snapshot writes a new one (0: never).
    pub snapshot_records: usize,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            jobs: 0,
            lease_seconds: 600,
            snapshot_records: 1000,
        }
    }
}

/// A validated config with every path resolved.
#[derive(Debug, Clone)]
pub struct Config {
    /// The config file itself.
    pub path: PathBuf,
    /// Run directory: an absolute local path or an object-store URL.
    pub run_dir: String,
    pub inputs: Vec<InputConfig>,
    pub plan: PlanConfig,
    pub ingest: IngestConfig,
    pub route: RouteRules,
    pub tagger: Tagger,
    pub jobs: usize,
    /// `runner.lease_seconds`.
    pub lease_seconds: u64,
    /// `runner.snapshot_records`.
    pub snapshot_records: usize,
    /// `[sql]`: limits of the SQL commands (`sql`, `shell`, `report`); its spill directory resolved.
    pub sql: SqlConfig,
    pub score: Option<ScoreSettings>,
    pub tokenize: Option<TokenizeSettings>,
    /// An empty `mix` means one source per kind present, decided when the stage runs.
    pub pack: Option<PackConfig>,
    /// Paths resolved; the model preset and the schedule checked.
    pub train: Option<TrainConfig>,
    /// The generation backend of `synthesize` and `annotate` (present when either runs).
    pub llm: Option<Lazy<Arc<SharedGenerator>>>,
    pub synthesize: Option<SynthesisSettings>,
    pub annotate: Option<AnnotateSettings>,
    /// `[eval]`: what `safepipe eval` reads (its inputs checked to have a holdout).
    pub eval: Option<crate::eval::EvalConfig>,
}

impl Config {
    /// Reads, parses and validates `path`. Every error names the file and the key. Model files
    /// are not touched here ([`Lazy`]).
    pub async fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read config {}: {e}", path.display())))?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = if dir.is_absolute() {
            dir
        } else {
            std::env::current_dir().unwrap_or_default().join(dir)
        };
        let fail = |msg: String| Error::Config(format!("{}: {msg}", path.display()));

        if raw.run_dir.trim().is_empty() {
            return Err(fail(
                "run_dir is empty; set it to a local directory or an s3:// / gs:// / az:// URL".into(),
            ));
        }
        let inputs = check_inputs(raw.inputs, &dir).map_err(fail)?;
        raw.plan.check().map_err(fail)?;
        raw.ingest.check().map_err(fail)?;
        let shown = path.display().to_string();
        let score = match raw.score {
            None => None,
            Some(s) => Some(s.settings(&dir, &shown).map_err(fail)?),
        };
        let run_dir = resolve(&dir, &raw.run_dir);
        let llm = match (&raw.llm, raw.synthesize.is_some() || raw.annotate.is_some()) {
            (None, true) => {
                return Err(fail(
                    "[synthesize] and [annotate] need an [llm] section (backend = \"in-process\" with a GGUF model, or \"openai\" with base_url)".into(),
                ));
            }
            (Some(l), true) => {
                let checked = l.clone().validate(&dir).map_err(fail)?;
                if checked.backend == crate::llm::Backend::Openai
                    && let Some(s) = &raw.synthesize
                {
                    s.require_sampling().map_err(fail)?;
                }
                let (dir, run_dir, shown) = (dir.clone(), run_dir.clone(), shown.clone());
                SharedGenerator::cache_dir(&checked, &dir, &run_dir).map_err(fail)?;
                Some(Lazy::new(move || {
                    SharedGenerator::new(checked.clone(), &dir, &run_dir)
                        .map(Arc::new)
                        .map_err(|e| format!("{shown}: {e}"))
                }))
            }
            (_, false) => None,
        };
        let synthesize = match &raw.synthesize {
            None => None,
            Some(s) => Some(s.settings(&dir).map_err(fail)?),
        };
        let annotate = match &raw.annotate {
            None => None,
            Some(a) => Some(a.settings(&dir).map_err(fail)?),
        };
        // Route predicates may use the score tables of the stages this config runs.
        let sides: Vec<ScoreTable> = ScoreTable::ALL
            .into_iter()
            .filter(|t| match t {
                ScoreTable::Scores => score.is_some(),
                ScoreTable::LlmScores => annotate.is_some(),
            })
            .collect();
        let route = raw.route.rules(&sides).await.map_err(fail)?;
        let tagger = Tagger::new(raw.tag.tag, raw.tag.probability, raw.tag.seed).map_err(fail)?;
        if raw.runner.lease_seconds < 2 {
            return Err(fail(format!(
                "runner.lease_seconds = {} is too short; use at least 2",
                raw.runner.lease_seconds
            )));
        }
        let jobs = match raw.runner.jobs {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        let tokenize = raw.tokenize.map(|t| t.settings(&dir, &shown, &tagger.tag));
        if let Some(pack) = &raw.pack {
            pack.check().map_err(fail)?;
        }
        let train = match raw.train {
            None => None,
            Some(t) => Some(validate_train(t, &dir).map_err(fail)?),
        };
        if let Some(e) = &raw.eval {
            e.check(&inputs).map_err(fail)?;
        }
        let config = Config {
            path: path.to_path_buf(),
            run_dir,
            inputs,
            plan: raw.plan,
            ingest: raw.ingest,
            route,
            tagger,
            jobs,
            lease_seconds: raw.runner.lease_seconds,
            snapshot_records: raw.runner.snapshot_records,
            sql: SqlConfig {
                spill_dir: raw.sql.spill_dir.as_deref().map(|d| resolve(&dir, d)),
                ..raw.sql
            },
            score,
            tokenize,
            pack: raw.pack,
            train,
            llm,
            synthesize,
            annotate,
            eval: raw.eval.map(|mut e| {
                e.classifier = e.classifier.map(|c| resolve(&dir, &c));
                e
            }),
        };
        // A stage whose required upstream is not configured (e.g. [pack] without [tokenize]).
        crate::stages::StageGraph::new(&Arc::new(config.clone()))?;
        Ok(config)
    }

    pub fn input(&self, name: &str) -> Option<&InputConfig> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

fn validate_train(mut t: TrainConfig, dir: &Path) -> std::result::Result<TrainConfig, String> {
    safepipe_model::llama::Kernels::parse(&t.kernels).map_err(|e| format!("train.{e}"))?;
    if !matches!(t.backend.as_str(), "cpu" | "cuda") {
        return Err(format!("train.backend = {:?}: use \"cpu\" or \"cuda\"", t.backend));
    }
    if safepipe_model::cuda::Precision::parse(&t.precision).is_none() {
        return Err(format!("train.precision = {:?}: use \"bf16\" or \"fp32\"", t.precision));
    }
    if safepipe_model::llama::LlamaConfig::preset(&t.model).is_none() {
        return Err(format!(
            "train.model = {:?}: use one of {:?}",
            t.model,
            safepipe_model::llama::LlamaConfig::PRESETS
        ));
    }
    if !matches!(t.schedule.as_str(), "cosine" | "wsd") {
        return Err(format!("train.schedule = {:?}: use \"cosine\" or \"wsd\"", t.schedule));
    }
    if t.steps == 0 || t.micro_batch == 0 || t.grad_accum == 0 || t.log_every == 0 {
        return Err("train.steps, train.micro_batch, train.grad_accum and train.log_every must be at least 1".into());
    }
    if !(t.lr > 0.0 && t.lr.is_finite() && (0.0..1.0).contains(&t.decay_fraction)) {
        return Err("train.lr must be > 0 and train.decay_fraction in [0, 1)".into());
    }
    t.checkpoint_dir = resolve(dir, &t.checkpoint_dir);
    t.init_from = t.init_from.map(|p| resolve(dir, &p));
    t.shards = t.shards.map(|p| resolve(dir, &p));
    Ok(t)
}

fn one() -> f64 {
    1.0
}

/// A name of an input, rule or mixture source: letters, digits, `_`, `-`, `.`.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// URLs stay as they are; local paths become absolute (relative ones against the config's
/// folder) and lexically normalised.
pub fn resolve(dir: &Path, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let joined = dir.join(location);
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn load(text: &str) -> Result<Config> {
        let dir = std::env::temp_dir().join(format!("safepipe-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("c{}.toml", text.len()));
        std::fs::write(&path, text).unwrap();
        Config::load(&path).await
    }

    #[tokio::test]
    async fn minimal_config_resolves_relative_paths() {
        let c = load("run_dir = 'runs/x'\n[[inputs]]\nname = 'a'\npaths = ['../data/*.jsonl']\n")
            .await
            .unwrap();
        assert!(c.run_dir.ends_with("runs/x") && c.run_dir.starts_with('/'));
        assert!(!c.inputs[0].paths[0].contains(".."), "{}", c.inputs[0].paths[0]);
        assert_eq!(c.ingest.batch_rows, 4096);
    }

    #[tokio::test]
    async fn example_configs_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path)
                    .await
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 2);
    }

    #[tokio::test]
    async fn unknown_key_is_named() {
        let err = load("run_dir = 'x'\nrundir = 'y'\n[[inputs]]\nname='a'\npaths=['b']\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("rundir"), "{err}");
    }

    #[tokio::test]
    async fn semantic_errors_name_the_key() {
        let err = load("run_dir = 'x'\n[[inputs]]\nname='a b'\npaths=['b']\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("inputs[0].name"), "{err}");
        let err = load("run_dir = 'x'\n[[inputs]]\nname='a'\npaths=['b']\n[[route.rules]]\nname='r'\nwhen='nope > 1'\nroute='drop'\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("route.rules[0]"), "{err}");
        let err = load("run_dir = 'x'\n[[inputs]]\nname='a'\npaths=['b']\n[route]\ndefault='explode'\n")
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("explode"), "{err}");
    }
}
