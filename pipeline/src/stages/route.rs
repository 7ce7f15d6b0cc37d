//! Adapter of the route operator: the unit's committed `documents` -> `routes`.

use super::{OutputTable, Stage, StageBatch, UnitInput};
use crate::config::Config;
use crate::error::{Error, Result};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
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

    fn upstream(&self) -> Option<&'static str> {
        Some("ingest")
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
            let documents = input
                .upstream
                .as_ref()
                .and_then(|r| r.outputs.get("documents"))
                .cloned();
            let Some(documents) = documents else {
                // The unit has no documents (all quarantined, or an empty slice).
                return Ok(futures::stream::empty().boxed());
            };
            let ctx = SessionContext::new();
            let location = input.stores.resolve(&documents.file)?;
            for (url, store) in input.stores.registered() {
                ctx.register_object_store(&url, store);
            }
            ctx.register_parquet("documents", location.url(), ParquetReadOptions::default())
                .await?;
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
