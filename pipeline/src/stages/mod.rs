//! The stage DAG, declared in code, and the contract every stage keeps.
//!
//! Every stage declares itself through [`Stage`] (name, upstream, outputs, settings) and has a
//! scope ([`Scope`]): a per-unit stage ([`UnitStage`]) is given the unit (and the committed
//! outputs of its upstream stages for the same unit) and returns a lazy stream of
//! [`StageBatch`]es, which the runner writes, checks and commits; the global `pack` stage reads
//! every unit's `tokens` once they are all current ([`crate::pack`]). [`StageGraph`] builds the
//! graph from the configured stages. Every stage must:
//! - do no work before its stream is first polled, and free everything when it is dropped;
//! - be a pure function of (unit, upstream outputs, its settings): reruns give the same rows;
//! - keep the accounting invariant: `rows_in = rows_out + dropped + quarantined` per unit;
//! - put every setting that changes its output into [`Stage::settings`], so a change reruns it
//!   (and, through the fingerprint chain, everything downstream) and nothing else.
//!
//! Adding a stage: a module here (the adapter) over a module in `operators/` (the transform),
//! its config section beside it, one entry in [`StageGraph::new`], its tables in `operators::schema` and docs/schema.md, and an
//! end-to-end test (CONTRIBUTING.md has the checklist).

mod graph;
pub mod ingest;
pub mod route;
pub mod score;
pub mod synthesize;
pub mod tag;
pub mod tokenize;

use crate::engine::plan::WorkUnit;
use crate::engine::records::CompletionRecord;
use crate::engine::run_dir::RunDir;
use crate::error::Result;
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::stream::BoxStream;
use safepipe_operators::UnitCounts;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;

pub use graph::{Node, Scope, StageGraph};
pub use ingest::IngestStage;
pub use route::RouteStage;
pub use score::ScoreStage;
pub use synthesize::{AnnotateStage, SynthesizeStage};
pub use tag::TagStage;
pub use tokenize::TokenizeStage;

/// One output table of a stage.
pub struct OutputTable {
    pub name: &'static str,
    pub schema: SchemaRef,
}

/// Rows for some of a stage's output tables, and the counts they stand for.
pub struct StageBatch {
    pub tables: Vec<(&'static str, RecordBatch)>,
    pub counts: UnitCounts,
}

/// What a stage gets to run one unit.
pub struct UnitInput {
    pub unit: WorkUnit,
    /// The run directory (upstream files are named relative to it) and its stores.
    pub run_dir: RunDir,
    /// The completion record of each upstream stage for this unit (empty for source stages):
    /// the required ones, and the optional ones the config has.
    pub upstream: BTreeMap<&'static str, CompletionRecord>,
}

impl UnitInput {
    /// Whether the upstream `stage` is in this run's graph (an optional upstream may not be).
    pub fn has(&self, stage: &str) -> bool {
        self.upstream.contains_key(stage)
    }
}

/// An upstream stage a stage reads, for the same unit (or, for a global stage, for every unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upstream {
    /// Always read: a config without that stage is refused at load, naming the section to add.
    Required(&'static str),
    /// Read when the config has that stage (e.g. `route` reads `scores` when `[score]` is there);
    /// the adapter asks [`UnitInput::has`].
    Optional(&'static str),
}

impl Upstream {
    pub fn stage(&self) -> &'static str {
        match self {
            Upstream::Required(s) | Upstream::Optional(s) => s,
        }
    }
}

/// What every stage declares, whatever its scope: the graph ([`StageGraph`]) resolves its
/// upstream, chains its fingerprint, judges its results ([`crate::engine::freshness`]) and shows
/// it in `status`, `sql` and `gc` from this alone.
pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;
    /// The stages whose committed outputs this stage reads; empty for a source.
    fn reads(&self) -> &'static [Upstream];
    fn outputs(&self) -> Vec<OutputTable>;
    /// Everything in the config that changes this stage's output, as JSON. Model identities
    /// are read here (the first call loads them: a missing model file is an error).
    fn settings(&self) -> Result<serde_json::Value>;
    /// A committed result that the next run should redo although its fingerprint is current
    /// (the synthesis stages: units with failed requests, retried at the cost of those alone
    /// thanks to the request cache). Stages downstream of a redone unit rerun it too.
    fn incomplete(&self, _record: &CompletionRecord) -> bool {
        false
    }
}

/// A stage of [`Scope::Unit`]: runs one work unit at a time.
pub trait UnitStage: Stage {
    /// Runs one unit. Lazy: nothing happens before the first poll.
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>>;
}

/// A DataFusion session holding, for this unit, the committed upstream tables `wanted` as
/// `(stage, table, schema)`, each registered under the table's name (empty when the upstream
/// unit wrote no rows to it).
pub async fn unit_session(
    input: &UnitInput,
    wanted: &[(&str, &str, SchemaRef)],
) -> Result<datafusion::prelude::SessionContext> {
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{ParquetReadOptions, SessionConfig, SessionContext};
    // One partition keeps every scan in file order, so outputs are byte-for-byte repeatable and
    // tables of the same unit line up row by row.
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(1));
    for (url, store) in input.run_dir.stores().registered() {
        ctx.register_object_store(&url, store);
    }
    for (stage, table, schema) in wanted {
        let file = input.upstream.get(stage).and_then(|r| r.outputs.get(*table));
        match file {
            Some(file) => {
                let location = input.run_dir.file(&file.file)?;
                let options = ParquetReadOptions::default().schema(schema);
                ctx.register_parquet(*table, location.url(), options).await?;
            }
            None => {
                ctx.register_table(*table, Arc::new(MemTable::try_new(schema.clone(), vec![vec![]])?))?;
            }
        }
    }
    Ok(ctx)
}

/// Bump when a stage's code changes its output for the same settings.
pub const CODE_VERSION: &str = "1";

pub fn hash(value: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(value.to_string()))[..16].to_string()
}

/// Fingerprints of one stage: its settings alone, and the chained stage fingerprint
/// (settings + plan + upstream fingerprint + code version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub settings: String,
    pub stage: String,
}
