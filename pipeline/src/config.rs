//! The run's TOML config: parsed, validated and resolved before any work starts.
//! docs/config.md documents every key; errors name the key and the fix.

use crate::error::{Error, Result};
use crate::llm::{AnnotateConfig, LlmConfig, SharedGenerator, SynthesizeConfig};
use safepipe_model::classifier::{Device, Precision, RunOptions};
use safepipe_model::{TextTokenizer, TokenizerOptions};
use safepipe_operators::ingest::IngestOptions;
use safepipe_operators::route::{Route, RouteRule, RouteRules};
use safepipe_operators::synthesize::{AnnotateSettings, SynthesisSettings};
use safepipe_operators::tag::Tagger;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
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
    score: Option<ScoreConfig>,
    tokenize: Option<TokenizeConfig>,
    pack: Option<PackConfig>,
    train: Option<TrainConfig>,
    llm: Option<LlmConfig>,
    synthesize: Option<SynthesizeConfig>,
    annotate: Option<AnnotateConfig>,
}

/// One named input: files in one format and schema. The name becomes `documents.source`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    /// Paths or URLs (`file://`, `s3://`, `gs://`, `az://`); globs (`*`, `?`, `[..]`) and
    /// directories are expanded. Relative paths are relative to the config file.
    pub paths: Vec<String>,
    #[serde(default)]
    pub format: InputFormat,
    #[serde(default)]
    pub columns: ColumnConfig,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// From the extension: `.parquet`; `.jsonl`/`.json`/`.ndjson`, optionally `.gz`/`.zst`.
    #[default]
    Auto,
    Parquet,
    Jsonl,
}

/// Input column (or JSON field) names; the defaults are FineWeb's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnConfig {
    pub text: String,
    pub id: String,
    pub dump: String,
    pub url: String,
    pub date: String,
    pub file_path: String,
    pub language: String,
    pub language_score: String,
    pub token_count: String,
}

impl Default for ColumnConfig {
    fn default() -> Self {
        let s = |x: &str| x.to_string();
        ColumnConfig {
            text: s("text"),
            id: s("id"),
            dump: s("dump"),
            url: s("url"),
            date: s("date"),
            file_path: s("file_path"),
            language: s("language"),
            language_score: s("language_score"),
            token_count: s("token_count"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Target size of one work unit of an uncompressed JSON Lines file.
    pub jsonl_unit_bytes: u64,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            jsonl_unit_bytes: 64 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Texts longer than this many bytes are quarantined (`text_too_long`).
    pub max_text_bytes: usize,
    /// Rows per record batch.
    pub batch_rows: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_text_bytes: 4 << 20,
            batch_rows: 4096,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// Route of documents no rule matches.
    pub default: Route,
    /// Ordered rules; the first whose `when` is true decides.
    pub rules: Vec<RouteRule>,
}

/// Algorithm 1: the harmfulness tag inserted before words of documents with `routes.also_tag`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TagConfig {
    /// The tag string (one special token of the tokenizer later on).
    pub tag: String,
    /// Chance of a tag before each word after the first (the paper found 5% best).
    pub probability: f64,
    /// With the document id, seeds the draws: same seed, same tags.
    pub seed: u64,
}

impl Default for TagConfig {
    fn default() -> Self {
        TagConfig {
            tag: safepipe_operators::tag::DEFAULT_TAG.to_string(),
            probability: 0.05,
            seed: 0,
        }
    }
}

/// `[score]`: present = the score stage runs and route predicates may use its columns.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreConfig {
    /// The classifier's manifest (`classifier.toml`, docs/classifier.md).
    pub model: String,
    #[serde(default)]
    pub precision: Precision,
    #[serde(default)]
    pub device: Device,
    /// ONNX Runtime intra-op threads; 0 = one per core.
    #[serde(default)]
    pub threads: usize,
    /// Padded tokens per inference batch (rows x longest row).
    #[serde(default = "default_batch_tokens")]
    pub batch_tokens: usize,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Tokens shared by consecutive chunks of a long document.
    #[serde(default)]
    pub overlap: usize,
    /// Documents tokenized ahead (and sorted by length together) while the previous window runs.
    #[serde(default = "default_window")]
    pub window: usize,
    /// The ONNX Runtime library (default: ORT_DYLIB_PATH, else models/onnxruntime/ from `make setup`).
    #[serde(default)]
    pub onnxruntime: Option<String>,
}

fn default_batch_tokens() -> usize {
    RunOptions::default().batch_tokens
}
fn default_max_batch() -> usize {
    RunOptions::default().max_batch
}
fn default_window() -> usize {
    4096
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
    fn new(load: impl Fn() -> std::result::Result<T, String> + Send + Sync + 'static) -> Self {
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

/// The score stage's settings; the model's identity is read from its files on first use.
#[derive(Debug, Clone)]
pub struct ScoreSettings {
    pub manifest: PathBuf,
    pub options: RunOptions,
    pub window: usize,
    /// [`safepipe_model::classifier::model_identity`]: changes when the model's files do.
    pub identity: Lazy<String>,
}

/// `[tokenize]`: present = the tokenize stage runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// A `.gguf` model (its tokenizer metadata is used) or a `tokenizer.json`.
    pub tokenizer: String,
    /// Appended after every document; must be in the vocabulary.
    #[serde(default = "default_eos")]
    pub eos: String,
}

fn default_eos() -> String {
    "<|endoftext|>".into()
}

/// `[pack]`: present = the global mix & pack stage runs (needs `[tokenize]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackConfig {
    /// Tokens per training sequence; rows hold `seq_len + 1` (inputs and shifted targets).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Seeds document selection and the shuffle.
    #[serde(default)]
    pub seed: u64,
    /// Sequences per shard file.
    #[serde(default = "default_shard_sequences")]
    pub shard_sequences: usize,
    /// Weight mode only: tokens to pack (default: as many as the mixture allows without
    /// exceeding any source's `max_epochs`).
    #[serde(default)]
    pub total_tokens: Option<u64>,
    /// Memory per shuffle bucket; the shuffle spills `tokens` into buckets of this size.
    #[serde(default = "default_bucket_bytes")]
    pub bucket_bytes: u64,
    /// Local directory for the shuffle's spill files (default: the system temp directory).
    #[serde(default)]
    pub spill_dir: Option<String>,
    /// The mixture; default: one source per kind present, each taken once.
    #[serde(default)]
    pub mix: Vec<MixSourceConfig>,
}

fn default_seq_len() -> usize {
    2048
}
fn default_shard_sequences() -> usize {
    8192
}
fn default_bucket_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MixSourceConfig {
    pub name: String,
    /// `tokens.kind` values this source takes (default: `[name]`).
    #[serde(default)]
    pub kinds: Vec<String>,
    pub weight: Option<f64>,
    pub epochs: Option<f64>,
    #[serde(default = "one")]
    pub max_epochs: f64,
}

fn one() -> f64 {
    1.0
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

/// The tokenize stage's settings; the tokenizer is loaded on first use.
#[derive(Debug, Clone)]
pub struct TokenizeSettings {
    pub path: String,
    pub tokenizer: Lazy<Arc<TextTokenizer>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// Units processed at once per rank; 0 = the number of CPU cores.
    pub jobs: usize,
    /// How long a unit's lease lasts without renewal before another process may take the unit
    /// over (its holder renews it every third of this while working).
    pub lease_seconds: u64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            jobs: 0,
            lease_seconds: 600,
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
        if raw.inputs.is_empty() {
            return Err(fail("no [[inputs]]; add at least one with a name and paths".into()));
        }
        let mut names = BTreeSet::new();
        let mut inputs = Vec::new();
        for (i, input) in raw.inputs.into_iter().enumerate() {
            if !valid_name(&input.name) {
                return Err(fail(format!(
                    "inputs[{i}].name = {:?}: use letters, digits, '_', '-' or '.'",
                    input.name
                )));
            }
            if !names.insert(input.name.clone()) {
                return Err(fail(format!(
                    "inputs[{i}].name = {:?} is used twice; names must be unique",
                    input.name
                )));
            }
            if input.paths.is_empty() {
                return Err(fail(format!(
                    "inputs[{i}].paths is empty; list files, directories or globs"
                )));
            }
            let paths = input.paths.iter().map(|p| resolve(&dir, p)).collect();
            inputs.push(InputConfig { paths, ..input });
        }
        if raw.plan.jsonl_unit_bytes < 4096 {
            return Err(fail(format!(
                "plan.jsonl_unit_bytes = {} is too small; use at least 4096",
                raw.plan.jsonl_unit_bytes
            )));
        }
        if raw.ingest.max_text_bytes == 0 {
            return Err(fail("ingest.max_text_bytes must be at least 1".into()));
        }
        if !(1..=1_000_000).contains(&raw.ingest.batch_rows) {
            return Err(fail(format!(
                "ingest.batch_rows = {} must be between 1 and 1000000",
                raw.ingest.batch_rows
            )));
        }
        let mut rule_names = BTreeSet::new();
        for (i, rule) in raw.route.rules.iter().enumerate() {
            if !valid_name(&rule.name) || rule.name.contains(['-', '.']) {
                return Err(fail(format!(
                    "route.rules[{i}].name = {:?}: use letters, digits and '_'",
                    rule.name
                )));
            }
            if !rule_names.insert(rule.name.clone()) {
                return Err(fail(format!("route.rules[{i}].name = {:?} is used twice", rule.name)));
            }
        }
        for (i, rule) in raw.route.rules.iter().enumerate() {
            if rule.also_tag && matches!(rule.route, Route::Keep | Route::Drop) {
                return Err(fail(format!(
                    "route.rules[{i}] (name = {:?}): also_tag is for `rephrase` and `refuse` routes (use route = \"tag\" to keep the text tagged)",
                    rule.name
                )));
            }
        }
        let shown = path.display().to_string();
        let score = match raw.score {
            None => None,
            Some(s) => Some(validate_score(s, &dir, &shown).map_err(fail)?),
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
        let route = RouteRules {
            rules: raw.route.rules,
            default: raw.route.default,
            with_scores: score.is_some(),
            with_llm_scores: annotate.is_some(),
        };
        route.validate().await.map_err(fail)?;
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
        let tokenize = match raw.tokenize {
            None => None,
            Some(t) => {
                let file = resolve(&dir, &t.tokenizer);
                let options = TokenizerOptions {
                    eos: t.eos.clone(),
                    tag: Some(tagger.tag.clone()),
                };
                let (key, at, shown) = (t.tokenizer.clone(), file.clone(), shown.clone());
                let tokenizer = Lazy::new(move || {
                    if !Path::new(&at).exists() {
                        return Err(format!(
                            "{shown}: tokenize.tokenizer = {key:?}: {at} does not exist (`make setup` fetches the \
                             SmolLM2 model into models/)"
                        ));
                    }
                    TextTokenizer::load(Path::new(&at), &options)
                        .map(Arc::new)
                        .map_err(|e| format!("{shown}: tokenize.tokenizer: {e}"))
                });
                Some(TokenizeSettings { path: file, tokenizer })
            }
        };
        if let Some(pack) = &raw.pack {
            validate_pack(pack, tokenize.is_some()).map_err(fail)?;
        }
        let train = match raw.train {
            None => None,
            Some(t) => Some(validate_train(t, &dir).map_err(fail)?),
        };
        Ok(Config {
            path: path.to_path_buf(),
            run_dir,
            inputs,
            plan: raw.plan,
            ingest: raw.ingest,
            route,
            tagger,
            jobs,
            lease_seconds: raw.runner.lease_seconds,
            score,
            tokenize,
            pack: raw.pack,
            train,
            llm,
            synthesize,
            annotate,
        })
    }

    /// How ingest reads records of `input`.
    pub fn ingest_options(&self, input: &InputConfig) -> IngestOptions {
        let c = &input.columns;
        IngestOptions {
            source: input.name.clone(),
            text_column: c.text.clone(),
            id_column: c.id.clone(),
            metadata_columns: [
                &c.dump,
                &c.url,
                &c.date,
                &c.file_path,
                &c.language,
                &c.language_score,
                &c.token_count,
            ]
            .map(String::clone)
            .to_vec(),
            max_text_bytes: self.ingest.max_text_bytes,
            batch_rows: self.ingest.batch_rows,
        }
    }

    pub fn input(&self, name: &str) -> Option<&InputConfig> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

fn validate_train(mut t: TrainConfig, dir: &Path) -> std::result::Result<TrainConfig, String> {
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

fn validate_score(s: ScoreConfig, dir: &Path, shown: &str) -> std::result::Result<ScoreSettings, String> {
    let manifest = PathBuf::from(resolve(dir, &s.model));
    if s.window == 0 || s.max_batch == 0 {
        return Err("score.window and score.max_batch must be at least 1".into());
    }
    let options = RunOptions {
        precision: s.precision,
        device: s.device,
        threads: s.threads,
        batch_tokens: s.batch_tokens,
        max_batch: s.max_batch,
        overlap: s.overlap,
        onnxruntime: s.onnxruntime.as_ref().map(|p| PathBuf::from(resolve(dir, p))),
    };
    let (key, at, opts, shown) = (s.model.clone(), manifest.clone(), options.clone(), shown.to_string());
    let identity = Lazy::new(move || {
        if !at.is_file() {
            return Err(format!(
                "{shown}: score.model = {key:?}: {} does not exist (`make setup` fetches the demo encoder; \
                 classifiers/ holds its head)",
                at.display()
            ));
        }
        safepipe_model::classifier::model_identity(&at, &opts).map_err(|e| format!("{shown}: score.model: {e}"))
    });
    Ok(ScoreSettings {
        manifest,
        options,
        window: s.window,
        identity,
    })
}

fn validate_pack(pack: &PackConfig, tokenize: bool) -> std::result::Result<(), String> {
    if !tokenize {
        return Err("[pack] needs a [tokenize] section (it packs the tokens stage's output)".into());
    }
    if !(1..=1 << 20).contains(&pack.seq_len) {
        return Err(format!("pack.seq_len = {} must be between 1 and 1048576", pack.seq_len));
    }
    if pack.shard_sequences == 0 {
        return Err("pack.shard_sequences must be at least 1".into());
    }
    if pack.bucket_bytes < 1 << 20 {
        return Err(format!(
            "pack.bucket_bytes = {} is too small; use at least 1048576",
            pack.bucket_bytes
        ));
    }
    let mut names = BTreeSet::new();
    for (i, m) in pack.mix.iter().enumerate() {
        if !valid_name(&m.name) || !names.insert(m.name.as_str()) {
            return Err(format!(
                "pack.mix[{i}].name = {:?} must be a unique name (letters, digits, '_', '-', '.')",
                m.name
            ));
        }
        for (key, value) in [
            ("weight", m.weight),
            ("epochs", m.epochs),
            ("max_epochs", Some(m.max_epochs)),
        ] {
            if let Some(v) = value
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("pack.mix[{i}].{key} = {v} must be a number >= 0"));
            }
        }
        if m.weight.is_some() && m.epochs.is_some() {
            return Err(format!(
                "pack.mix[{i}]: give `weight` (a token fraction) or `epochs` (passes), not both"
            ));
        }
    }
    let mut kinds: BTreeMap<&str, &str> = BTreeMap::new();
    for m in &pack.mix {
        let own = if m.kinds.is_empty() {
            std::slice::from_ref(&m.name)
        } else {
            m.kinds.as_slice()
        };
        for k in own {
            if let Some(other) = kinds.insert(k, &m.name) {
                return Err(format!(
                    "pack.mix: kind {k:?} is in both {other:?} and {:?}; a kind belongs to one source",
                    m.name
                ));
            }
        }
    }
    let weighted = pack.mix.iter().filter(|m| m.weight.is_some()).count();
    if weighted != 0 && weighted != pack.mix.len() {
        return Err("pack.mix: give every source a weight, or none (then each takes `epochs` passes)".into());
    }
    if weighted != 0 && pack.mix.iter().filter_map(|m| m.weight).sum::<f64>() <= 0.0 {
        return Err("pack.mix: the weights sum to 0".into());
    }
    Ok(())
}

fn valid_name(name: &str) -> bool {
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
