//! The stage DAG, declared in code, and the contract every stage keeps.
//!
//! A stage runs per work unit: given the unit (and the committed outputs of its upstream stages
//! for the same unit) it returns a lazy stream of [`StageBatch`]es. The runner writes them,
//! checks the counts and commits. Every stage must:
//! - do no work before its stream is first polled, and free everything when it is dropped;
//! - be a pure function of (unit, upstream outputs, its settings): reruns give the same rows;
//! - keep the accounting invariant: `rows_in = rows_out + dropped + quarantined` per unit;
//! - put every setting that changes its output into [`Stage::settings`], so a change reruns it
//!   (and, through the fingerprint chain, everything downstream) and nothing else.
//!
//! Adding a stage: a module here (the adapter) over a module in `operators/` (the transform),
//! one entry in [`pipeline`], its tables in `operators::schema` and docs/schema.md, and an
//! end-to-end test (CONTRIBUTING.md has the checklist).

mod ingest;
mod route;
mod score;
mod synthesize;
mod tag;
mod tokenize;

use crate::config::Config;
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
    /// The completion record of each upstream stage for this unit (empty for source stages).
    pub upstream: BTreeMap<&'static str, CompletionRecord>,
}

pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;
    /// The stages whose outputs for the same unit this stage reads; empty for a source.
    fn upstream(&self) -> &'static [&'static str];
    fn outputs(&self) -> Vec<OutputTable>;
    /// Everything in the config that changes this stage's output, as JSON. Model identities
    /// are read here (the first call loads them: a missing model file is an error).
    fn settings(&self) -> Result<serde_json::Value>;
    /// Runs one unit. Lazy: nothing happens before the first poll.
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>>;
    /// A committed unit that the next run should redo although its fingerprint is current
    /// (the synthesis stages: units with failed requests, retried at the cost of those alone
    /// thanks to the request cache). Stages downstream of a redone unit rerun it too.
    fn incomplete(&self, _record: &CompletionRecord) -> bool {
        false
    }
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

/// The pipeline's per-unit stages in dependency order (`score`, `annotate`, `synthesize` and
/// `tokenize` when the config has their sections). The global `pack` stage runs after them (see `crate::pack`).
pub fn pipeline(config: &Arc<Config>) -> Vec<Arc<dyn Stage>> {
    let mut stages: Vec<Arc<dyn Stage>> = vec![Arc::new(IngestStage::new(config.clone()))];
    if let Some(settings) = &config.score {
        stages.push(Arc::new(ScoreStage::new(settings.clone())));
    }
    if let (Some(llm), Some(settings)) = (&config.llm, &config.annotate) {
        stages.push(Arc::new(AnnotateStage::new(
            llm.clone(),
            settings.clone(),
            config.score.is_some(),
        )));
    }
    stages.push(Arc::new(RouteStage::new(config.clone())));
    if let (Some(llm), Some(settings)) = (&config.llm, &config.synthesize) {
        stages.push(Arc::new(SynthesizeStage::new(llm.clone(), settings.clone())));
    }
    stages.push(Arc::new(TagStage::new(config.clone())));
    if let Some(settings) = &config.tokenize {
        stages.push(Arc::new(TokenizeStage::new(
            settings.clone(),
            config.synthesize.is_some(),
        )));
    }
    stages
}

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

/// Computes every stage's fingerprint in order; `plan` is the work plan's fingerprint. Loads the
/// model identities the settings hold.
pub fn fingerprints(stages: &[Arc<dyn Stage>], plan: &str) -> Result<Vec<Fingerprint>> {
    let mut out: Vec<Fingerprint> = Vec::new();
    for stage in stages {
        let upstream: Vec<String> = stage
            .upstream()
            .iter()
            .map(|name| {
                let i = stages
                    .iter()
                    .position(|s| s.name() == *name)
                    .expect("upstream declared before");
                out[i].stage.clone()
            })
            .collect();
        let settings = hash(&stage.settings()?);
        let chained = serde_json::json!([stage.name(), CODE_VERSION, settings, plan, upstream]);
        out.push(Fingerprint {
            settings,
            stage: hash(&chained),
        });
    }
    Ok(out)
}

/// `names` plus every stage downstream of them (for `--force`).
pub fn downstream_closure(stages: &[Arc<dyn Stage>], names: &[String]) -> Vec<&'static str> {
    let mut chosen: Vec<&'static str> = Vec::new();
    for stage in stages {
        let forced = names.iter().any(|n| n == stage.name() || n == "all");
        let below = stage.upstream().iter().any(|up| chosen.contains(up));
        if forced || below {
            chosen.push(stage.name());
        }
    }
    chosen
}
