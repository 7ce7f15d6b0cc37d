//! Adapter of the score operator: the unit's `documents` -> `scores`.
//!
//! The classifier (ONNX session, tokenizer, head) is loaded once per process, when the first unit
//! runs, and shared by the units running at once; commands that never score never load it.

use super::{OutputTable, Stage, StageBatch, UnitInput, UnitStage, Upstream, unit_session};
use crate::config::{Lazy, resolve};
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_model::classifier::Classifier;
use safepipe_model::classifier::{Device, Precision, RunOptions};
use safepipe_operators::score::{SELECT_FOR_SCORING, score_batch};
use safepipe_operators::{UnitCounts, schema};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tracing::debug;

pub struct ScoreStage {
    settings: ScoreSettings,
    classifier: Arc<Mutex<Option<Arc<Classifier>>>>,
}

impl ScoreStage {
    pub fn new(settings: ScoreSettings) -> Self {
        ScoreStage {
            settings,
            classifier: Arc::new(Mutex::new(None)),
        }
    }
}

/// The shared classifier, loaded on first use (blocking: call from a blocking thread).
fn classifier(slot: &Mutex<Option<Arc<Classifier>>>, settings: &ScoreSettings) -> Result<Arc<Classifier>> {
    let mut slot = slot.lock().expect("classifier slot");
    if let Some(c) = slot.as_ref() {
        return Ok(c.clone());
    }
    let loaded = Classifier::load(&settings.manifest, &settings.options)
        .map_err(|e| Error::Config(format!("score.model = {}: {e}", settings.manifest.display())))?;
    debug!(model = %loaded.model_id(), library = %loaded.library().display(), "classifier loaded");
    let loaded = Arc::new(loaded);
    *slot = Some(loaded.clone());
    Ok(loaded)
}

impl Stage for ScoreStage {
    fn name(&self) -> &'static str {
        "score"
    }

    fn reads(&self) -> &'static [Upstream] {
        &[Upstream::Required("ingest")]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "scores",
            schema: schema::SCORES.clone(),
        }]
    }

    /// The model's identity (its files' hash, precision, overlap), not its path.
    fn settings(&self) -> Result<serde_json::Value> {
        Ok(serde_json::json!({ "model": self.settings.identity.get()? }))
    }
}

impl UnitStage for ScoreStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let settings = self.settings.clone();
        let slot = self.classifier.clone();
        futures::stream::once(async move {
            let wanted = [("ingest", "documents", schema::DOCUMENTS.clone())];
            let ctx = unit_session(&input, &wanted).await?;
            let batches = ctx.sql(SELECT_FOR_SCORING).await?.collect().await?;
            let schema = match batches.first() {
                Some(b) => b.schema(),
                None => Arc::new(schema::DOCUMENTS.project(&[0, 1])?),
            };
            let documents = arrow::compute::concat_batches(&schema, &batches)
                .map_err(|e| Error::Internal(format!("documents of the unit: {e}")))?;
            // Tokenizing and inference are CPU-bound: keep them off the async threads.
            let (scores, totals) = tokio::task::spawn_blocking(move || {
                let classifier = classifier(&slot, &settings)?;
                score_batch(&classifier, &documents, settings.window).map_err(Error::from)
            })
            .await
            .map_err(|e| Error::Internal(format!("score task: {e}")))??;
            debug!(
                documents = totals.documents,
                chunks = totals.chunks,
                tokens_per_second = (totals.model_tokens as f64 / totals.seconds.max(1e-9)) as u64,
                "scored"
            );
            let n = scores.num_rows() as u64;
            Ok::<_, Error>(futures::stream::iter([Ok(StageBatch {
                tables: vec![("scores", scores)],
                counts: UnitCounts {
                    rows_in: n,
                    rows_out: n,
                    ..Default::default()
                },
            })]))
        })
        .try_flatten()
        .boxed()
    }
}

// ---- `[score]`: the config section of this stage.

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

/// The score stage's settings; the model's identity is read from its files on first use.
#[derive(Debug, Clone)]
pub struct ScoreSettings {
    pub manifest: PathBuf,
    pub options: RunOptions,
    pub window: usize,
    /// [`safepipe_model::classifier::model_identity`]: changes when the model's files do.
    pub identity: Lazy<String>,
}

impl ScoreConfig {
    /// Checks the section and resolves its paths against the config's folder `dir`; the model's
    /// identity is read on first use. `shown` names the config file in errors.
    pub fn settings(self, dir: &Path, shown: &str) -> std::result::Result<ScoreSettings, String> {
        let s = self;
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
}
