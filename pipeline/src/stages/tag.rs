//! Adapter of the tag operator: the unit's documents with `routes.also_tag` -> `tagged`.

use super::{OutputTable, Stage, StageBatch, UnitInput, UnitStage, Upstream, unit_session};
use crate::config::Config;
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::tag::SELECT_TAGGED;
use safepipe_operators::{UnitCounts, schema};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub struct TagStage {
    config: Arc<Config>,
}

impl TagStage {
    pub fn new(config: Arc<Config>) -> Self {
        TagStage { config }
    }
}

impl Stage for TagStage {
    fn name(&self) -> &'static str {
        "tag"
    }

    fn reads(&self) -> &'static [Upstream] {
        &[Upstream::Required("ingest"), Upstream::Required("route")]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "tagged",
            schema: schema::TAGGED.clone(),
        }]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        let t = &self.config.tagger;
        // `tag_offsets`: the table gained the offsets of the inserted tags (older results lack them).
        Ok(serde_json::json!({ "tag": t.tag, "probability": t.probability, "seed": t.seed, "tag_offsets": true }))
    }
}

impl UnitStage for TagStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let tagger = self.config.tagger.clone();
        futures::stream::once(async move {
            let wanted = [
                ("ingest", "documents", schema::DOCUMENTS.clone()),
                ("route", "routes", schema::ROUTES.clone()),
            ];
            let ctx = unit_session(&input, &wanted).await?;
            let rows = ctx.sql(SELECT_TAGGED).await?.execute_stream().await?;
            let batches = rows.map(move |batch| {
                let tagged = tagger.tag_batch(&batch?)?;
                let n = tagged.num_rows() as u64;
                let counts = UnitCounts {
                    rows_in: n,
                    rows_out: n,
                    ..Default::default()
                };
                Ok::<_, Error>(StageBatch {
                    tables: vec![("tagged", tagged)],
                    counts,
                })
            });
            Ok::<_, Error>(batches.boxed())
        })
        .try_flatten()
        .boxed()
    }
}

// ---- `[tag]`: the config section of this stage.

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
