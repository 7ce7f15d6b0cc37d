//! Adapter of the tokenize operator: kept documents and tagged texts of a unit -> `tokens`.

use super::{OutputTable, Stage, StageBatch, UnitInput, unit_session};
use crate::config::TokenizeSettings;
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::tokenize::{select_for_training, tokenize_batch};
use safepipe_operators::{UnitCounts, schema};

pub struct TokenizeStage {
    settings: TokenizeSettings,
    /// The synthesize stage runs: its kept rows are tokenized too.
    with_synthetic: bool,
}

impl TokenizeStage {
    pub fn new(settings: TokenizeSettings, with_synthetic: bool) -> Self {
        TokenizeStage {
            settings,
            with_synthetic,
        }
    }
}

impl Stage for TokenizeStage {
    fn name(&self) -> &'static str {
        "tokenize"
    }

    fn upstream(&self) -> &'static [&'static str] {
        if self.with_synthetic {
            &["ingest", "route", "tag", "synthesize"]
        } else {
            &["ingest", "route", "tag"]
        }
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "tokens",
            schema: schema::TOKENS.clone(),
        }]
    }

    /// The tokenizer's identity is the hash of its full JSON (vocabulary, merges, the tag and
    /// the pre-tokenizer), not its path: moving the file reruns nothing, editing it reruns all.
    fn settings(&self) -> Result<serde_json::Value> {
        let t = self.settings.tokenizer.get()?;
        Ok(serde_json::json!({ "tokenizer": t.hash(), "eos_id": t.eos_id() }))
    }

    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let tokenizer = self.settings.tokenizer.clone();
        let with_synthetic = self.with_synthetic;
        futures::stream::once(async move {
            let tokenizer = tokenizer.get()?.clone();
            let mut wanted = vec![
                ("ingest", "documents", schema::DOCUMENTS.clone()),
                ("route", "routes", schema::ROUTES.clone()),
                ("tag", "tagged", schema::TAGGED.clone()),
            ];
            if with_synthetic {
                wanted.push(("synthesize", "synthetic", schema::SYNTHETIC.clone()));
            }
            let ctx = unit_session(&input, &wanted).await?;
            let rows = ctx
                .sql(&select_for_training(with_synthetic))
                .await?
                .execute_stream()
                .await?;
            let batches = rows.and_then(move |batch| {
                let tokenizer = tokenizer.clone();
                async move {
                    // Encoding is CPU-bound work on rayon's pool: keep it off the async threads.
                    let tokens = tokio::task::spawn_blocking(move || tokenize_batch(&tokenizer, &batch))
                        .await
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                    Ok(tokens)
                }
            });
            let batches = batches.map(|tokens| {
                let tokens = tokens?;
                let n = tokens.num_rows() as u64;
                Ok::<_, Error>(StageBatch {
                    tables: vec![("tokens", tokens)],
                    counts: UnitCounts {
                        rows_in: n,
                        rows_out: n,
                        ..Default::default()
                    },
                })
            });
            Ok::<_, Error>(batches.boxed())
        })
        .try_flatten()
        .boxed()
    }
}
