//! Adapter of the tag operator: the unit's documents with `routes.also_tag` -> `tagged`.

use super::{OutputTable, Stage, StageBatch, UnitInput, unit_session};
use crate::config::Config;
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::tag::SELECT_TAGGED;
use safepipe_operators::{UnitCounts, schema};
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

    fn upstream(&self) -> &'static [&'static str] {
        &["ingest", "route"]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "tagged",
            schema: schema::TAGGED.clone(),
        }]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        let t = &self.config.tagger;
        Ok(serde_json::json!({ "tag": t.tag, "probability": t.probability, "seed": t.seed }))
    }

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
