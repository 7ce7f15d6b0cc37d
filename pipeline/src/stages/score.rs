//! Adapter of the score operator: the unit's `documents` -> `scores`.
//!
//! The classifier (ONNX session, tokenizer, head) is loaded once per process, when the first unit
//! runs, and shared by the units running at once; commands that never score never load it.

use super::{OutputTable, Stage, StageBatch, UnitInput, unit_session};
use crate::config::ScoreSettings;
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_model::classifier::Classifier;
use safepipe_operators::score::{SELECT_FOR_SCORING, score_batch};
use safepipe_operators::{UnitCounts, schema};
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

    fn upstream(&self) -> &'static [&'static str] {
        &["ingest"]
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
