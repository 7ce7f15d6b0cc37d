//! Adapter of the ingest operator: unit -> `documents` + `quarantine`.

use super::{OutputTable, Stage, StageBatch, UnitInput};
use crate::config::Config;
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::ingest::{IngestInput, ingest};
use safepipe_operators::schema;
use std::sync::Arc;

pub struct IngestStage {
    config: Arc<Config>,
}

impl IngestStage {
    pub fn new(config: Arc<Config>) -> Self {
        IngestStage { config }
    }
}

impl Stage for IngestStage {
    fn name(&self) -> &'static str {
        "ingest"
    }

    fn upstream(&self) -> &'static [&'static str] {
        &[]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![
            OutputTable {
                name: "documents",
                schema: schema::DOCUMENTS.clone(),
            },
            OutputTable {
                name: "quarantine",
                schema: schema::QUARANTINE.clone(),
            },
        ]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        let per_input: Vec<_> = self
            .config
            .inputs
            .iter()
            .map(|i| self.config.ingest_options(i))
            .collect();
        Ok(serde_json::to_value(per_input).expect("serialisable"))
    }

    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let config = self.config.clone();
        futures::stream::once(async move {
            let unit = input.unit;
            let source = config.input(&unit.input).ok_or_else(|| {
                Error::Config(format!(
                    "the plan names input '{}', which the config no longer has",
                    unit.input
                ))
            })?;
            let options = Arc::new(config.ingest_options(source));
            let location = input.run_dir.stores().resolve(&unit.file)?;
            let slice = IngestInput {
                store: location.store,
                path: location.path,
                file: unit.file.clone(),
                size: unit.size,
                unit: unit.id,
                slice: unit.slice.clone(),
            };
            let batches = ingest(slice, options).map_ok(|b| StageBatch {
                tables: vec![("documents", b.documents), ("quarantine", b.quarantine)],
                counts: b.counts,
            });
            Ok::<_, Error>(batches.map_err(Error::from))
        })
        .try_flatten()
        .boxed()
    }
}
