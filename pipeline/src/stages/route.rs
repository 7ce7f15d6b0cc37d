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
        if self.config.route.with_scores {
            &["ingest", "score"]
        } else {
            &["ingest"]
        }
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "routes",
            schema: schema::ROUTES.clone(),
        }]
    }

    fn settings(&self) -> serde_json::Value {
        serde_json::to_value(&self.config.route).expect("serialisable")
    }

    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let rules = self.config.route.clone();
        futures::stream::once(async move {
            let mut wanted = vec![("ingest", "documents", schema::DOCUMENTS.clone())];
            if rules.with_scores {
                wanted.push(("score", "scores", schema::SCORES.clone()));
            }
            let ctx = unit_session(&input, &wanted).await?;
            if rules.with_scores {
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
                let (documents, scores) = (count("documents").await?, count("scores").await?);
                if documents != scores {
                    return Err(Error::Execution(format!(
                        "unit {}: {documents} documents but {scores} scores; rerun with --force score",
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
