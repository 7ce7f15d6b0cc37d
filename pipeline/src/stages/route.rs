//! Adapter of the route operator: the unit's committed `documents` (+ `scores` when the score
//! stage runs) -> `routes`.

use super::{OutputTable, Stage, StageBatch, UnitInput, unit_session};
use crate::config::Config;
use crate::error::{Error, Result};
use arrow::array::AsArray;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::route::account;
use safepipe_operators::{UnitCounts, schema};
use std::sync::Arc;

pub struct RouteStage {
    config: Arc<Config>,
}

impl RouteStage {
    pub fn new(config: Arc<Config>) -> Self {
        RouteStage { config }
    }
}

impl Stage for RouteStage {
    fn name(&self) -> &'static str {
        "route"
    }

    fn upstream(&self) -> &'static [&'static str] {
        match (self.config.route.with_scores, self.config.route.with_llm_scores) {
            (false, false) => &["ingest"],
            (true, false) => &["ingest", "score"],
            (false, true) => &["ingest", "annotate"],
            (true, true) => &["ingest", "score", "annotate"],
        }
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "routes",
            schema: schema::ROUTES.clone(),
        }]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        Ok(serde_json::to_value(&self.config.route).expect("serialisable"))
    }

    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let rules = self.config.route.clone();
        futures::stream::once(async move {
            let mut wanted = vec![("ingest", "documents", schema::DOCUMENTS.clone())];
            if rules.with_scores {
                wanted.push(("score", "scores", schema::SCORES.clone()));
            }
            if rules.with_llm_scores {
                wanted.push(("annotate", "llm_scores", schema::LLM_SCORES.clone()));
            }
            let ctx = unit_session(&input, &wanted).await?;
            let side_tables = [
                (rules.with_scores, "scores", "score"),
                (rules.with_llm_scores, "llm_scores", "annotate"),
            ];
            for (_, table, stage) in side_tables.iter().filter(|t| t.0) {
                // Every document must have its score: a missing one would fall to the default
                // route, i.e. be kept unjudged.
                let count = |table: &str| {
                    let ctx = ctx.clone();
                    let query = format!("SELECT count(*) FROM {table}");
                    async move {
                        let batches = ctx.sql(&query).await?.collect().await?;
                        Ok::<i64, Error>(
                            batches
                                .first()
                                .map(|b| b.column(0).as_primitive::<arrow::datatypes::Int64Type>().value(0))
                                .unwrap_or(0),
                        )
                    }
                };
                let (documents, scores) = (count("documents").await?, count(table).await?);
                if documents != scores {
                    return Err(Error::Execution(format!(
                        "unit {}: {documents} documents but {scores} rows in {table}; rerun with --force {stage}",
                        input.unit.id
                    )));
                }
            }
            let stream = rules.execute(&ctx).await?;
            let batches = stream.map(|batch| {
                let batch = batch?;
                let mut counts = UnitCounts::default();
                account(&batch, &mut counts)?;
                Ok::<_, Error>(StageBatch {
                    tables: vec![("routes", batch)],
                    counts,
                })
            });
            Ok::<_, Error>(batches.boxed())
        })
        .try_flatten()
        .boxed()
    }
}
