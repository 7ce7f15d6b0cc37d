//! The run's tables for SQL: every stage output table over exactly the files its completion
//! records name (never a half-written or orphaned file), plus `stats` (one row per committed
//! unit and stage, with its counts and timings) and `eval` (`safepipe eval`'s continuations). A committed file that is missing is an error
//! naming it, never a silently smaller table; an unreadable record is reported and left out.

use crate::config::Config;
use crate::engine::freshness;
use crate::engine::plan::Plan;
use crate::engine::records::{CompletionRecord, OutputFile};
use crate::engine::run_dir::{RunDir, StageFiles};
use crate::error::{Error, Result};
use crate::pack::ManifestState;
use crate::stages::{Scope, StageGraph};
use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::datasource::MemTable;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::{TableProvider, TableType};
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::{SessionConfig, SessionContext};
use std::sync::{Arc, LazyLock};
use tracing::warn;

/// `stats`: one row per committed (stage, unit).
pub static STATS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("stage", DataType::Utf8, false),
        Field::new("unit", DataType::UInt32, false),
        Field::new("rank", DataType::UInt32, false),
        Field::new("world_size", DataType::UInt32, false),
        Field::new("rows_in", DataType::UInt64, false),
        Field::new("rows_out", DataType::UInt64, false),
        Field::new("rows_dropped", DataType::UInt64, false),
        Field::new("rows_quarantined", DataType::UInt64, false),
        Field::new("dropped_by_rule", DataType::Utf8, false),
        // Other figures of the unit as a JSON object (synthesis: cache_hits, retries, generated_tokens).
        Field::new("figures", DataType::Utf8, false),
        Field::new("seconds", DataType::Float64, false),
        Field::new("started_at", DataType::Utf8, false),
        Field::new("finished_at", DataType::Utf8, false),
        Field::new("fingerprint", DataType::Utf8, false),
        // Whether the unit's result is current (false: a rerun will redo it; null: the model files
        // its stage's fingerprint holds are not here to judge).
        Field::new("current", DataType::Boolean, true),
    ]))
});

/// A read-only SQL session over the run directory of `config`, its operators held to
/// `[sql] memory_limit_mb` (spilling to `[sql] spill_dir`).
pub async fn session(config: &Config) -> Result<SessionContext> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let mut runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new();
    if config.sql.memory_limit_mb > 0 {
        let bytes = usize::try_from(config.sql.memory_limit_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        runtime = runtime.with_memory_limit(bytes, 1.0);
    }
    if let Some(dir) = &config.sql.spill_dir {
        runtime = runtime.with_temp_file_path(dir);
    }
    let ctx =
        SessionContext::new_with_config_rt(SessionConfig::new().with_information_schema(true), runtime.build_arc()?);
    if !run_dir.is_local() {
        ctx.register_object_store(&run_dir.root().base, run_dir.root().store.clone());
    }
    let graph = StageGraph::new(&Arc::new(config.clone()))?;
    // With a plan, the freshness survey (the rule `run` uses) says which results are current;
    // a stage whose model file is missing is judged with its last result's settings. Without a
    // plan, or a model and any result, `current` is null.
    let plan = Plan::load(config, &run_dir).await?;
    let fingerprints = match &plan {
        Some(plan) => match graph.fingerprints_or_recorded(&plan.fingerprint, &run_dir).await {
            Ok((f, notes)) => {
                for note in notes {
                    warn!("{note}");
                }
                Some(f)
            }
            Err(e) => {
                warn!(error = %e, "stats.current is null: the stages' fingerprints need the model files");
                None
            }
        },
        None => None,
    };
    let surveyed: Vec<Option<(StageFiles, Option<freshness::Judged>)>> = match (plan, fingerprints) {
        (Some(plan), Some(fingerprints)) => {
            let units: Vec<u32> = plan.units.iter().map(|u| u.id).collect();
            freshness::survey(&run_dir, &graph, &fingerprints, &units, &[], false)
                .await?
                .into_iter()
                .map(|s| s.map(|(files, judged)| (files, Some(judged))))
                .collect()
        }
        _ => {
            let mut out = Vec::new();
            for node in &graph.nodes {
                out.push(match node.scope {
                    Scope::Unit(_) => Some((run_dir.stage(node.name()).await?, None)),
                    Scope::Global => None,
                });
            }
            out
        }
    };
    let mut all: Vec<(CompletionRecord, Option<bool>)> = Vec::new();
    // Per-unit stages' tables from their records; the global stage's below, from its manifest.
    for (stage, surveyed) in graph.nodes.iter().zip(surveyed) {
        let Some((files, judged)) = surveyed else {
            continue;
        };
        if let Some(missing) = files.missing.first() {
            return Err(Error::Execution(format!(
                "{} committed file(s) of stage {} are missing, e.g. {missing} in {}; \
                 `safepipe status` lists the damaged units and `safepipe run` redoes them",
                files.missing.len(),
                stage.name(),
                run_dir.display()
            )));
        }
        for (unit, problem) in &files.damaged {
            warn!(stage = stage.name(), unit, %problem, "left out of the tables: damaged record");
        }
        let mut done: Vec<_> = files.done.into_values().collect();
        done.sort_by_key(|c| c.record.unit);
        for table in stage.stage.outputs() {
            let files: Vec<(crate::engine::storage::Location, &OutputFile)> = done
                .iter()
                .filter_map(|c| c.record.outputs.get(table.name))
                .map(|f| run_dir.file(&f.file).map(|l| (l, f)))
                .collect::<Result<_>>()?;
            register_committed(&ctx, table.name, table.schema, files)?;
        }
        all.extend(done.into_iter().map(|c| {
            let current = judged
                .as_ref()
                .map(|j| j.current.get(&c.record.unit).is_some_and(|now| now.digest == c.digest));
            (c.record, current)
        }));
    }
    // `shards`: the files the committed pack manifest names.
    let manifest = crate::pack::load_manifest(&run_dir).await?;
    if let ManifestState::Damaged(problem) = &manifest {
        return Err(Error::Execution(format!(
            "the shards of {} cannot be read: {problem}; `safepipe run` repacks them",
            run_dir.display()
        )));
    }
    if config.pack.is_some() || manifest.manifest().is_some() {
        let (files, wide) = match manifest.manifest() {
            Some(m) => (
                m.shards
                    .iter()
                    .map(|f| run_dir.file(&f.file).map(|l| (l, f)))
                    .collect::<Result<Vec<_>>>()?,
                m.id_type == "uint32",
            ),
            None => (Vec::new(), false),
        };
        let id_type = if wide { DataType::UInt32 } else { DataType::UInt16 };
        register_committed(
            &ctx,
            "shards",
            safepipe_operators::schema::shards_schema(id_type),
            files,
        )?;
    }
    ctx.register_table(
        "stats",
        Arc::new(MemTable::try_new(STATS.clone(), vec![vec![stats_batch(&all)?]])?),
    )?;
    crate::eval::output::register(&ctx, &run_dir).await?;
    Ok(ctx)
}
/// Registers a table over exactly the committed files, whose sizes and row counts the records
/// hold: no listing and no per-file request at planning, so 100,000 files cost what their
/// reading costs (a listing table of one path per file lists and opens them all at once), and
/// an unfiltered `count(*)` is answered from the recorded row counts without opening a file.
fn register_committed(
    ctx: &SessionContext,
    name: &str,
    schema: SchemaRef,
    files: Vec<(crate::engine::storage::Location, &OutputFile)>,
) -> Result<()> {
    let Some((first, _)) = files.first() else {
        ctx.register_table(name, Arc::new(MemTable::try_new(schema, vec![vec![]])?))?;
        return Ok(());
    };
    let store = ObjectStoreUrl::parse(first.base.as_str())?;
    let files = files
        .into_iter()
        .map(|(location, f)| (PartitionedFile::new(location.path.to_string(), f.bytes), f.rows))
        .collect();
    ctx.register_table(name, Arc::new(CommittedFiles { schema, store, files }))?;
    Ok(())
}

/// A table over a known list of Parquet files in one store, with each file's row count.
#[derive(Debug)]
struct CommittedFiles {
    schema: SchemaRef,
    store: ObjectStoreUrl,
    files: Vec<(PartitionedFile, u64)>,
}

#[async_trait::async_trait]
impl TableProvider for CommittedFiles {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        // Contiguous groups, one per partition: unit order is kept within each.
        let partitions = state.config().target_partitions().max(1);
        let per_group = self.files.len().div_ceil(partitions).max(1);
        let rows = |files: &[(PartitionedFile, u64)]| {
            let mut stats = Statistics::new_unknown(&self.schema);
            stats.num_rows = Precision::Exact(files.iter().map(|(_, rows)| *rows as usize).sum());
            stats
        };
        let groups = self
            .files
            .chunks(per_group)
            .map(|c| FileGroup::new(c.iter().map(|(f, _)| f.clone()).collect()).with_statistics(Arc::new(rows(c))))
            .collect();
        let source = Arc::new(ParquetSource::new(self.schema.clone()));
        let config = FileScanConfigBuilder::new(self.store.clone(), source)
            .with_statistics(rows(&self.files))
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

fn stats_batch(records: &[(CompletionRecord, Option<bool>)]) -> Result<RecordBatch> {
    let s = |f: &dyn Fn(&CompletionRecord) -> String| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(records.iter().map(|(r, _)| f(r))))
    };
    let u64s = |f: &dyn Fn(&CompletionRecord) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(records.iter().map(|(r, _)| f(r))))
    };
    let u32s = |f: &dyn Fn(&CompletionRecord) -> u32| -> ArrayRef {
        Arc::new(UInt32Array::from_iter_values(records.iter().map(|(r, _)| f(r))))
    };
    let columns: Vec<ArrayRef> = vec![
        s(&|r| r.stage.clone()),
        u32s(&|r| r.unit),
        u32s(&|r| r.rank),
        u32s(&|r| r.world_size),
        u64s(&|r| r.counts.rows_in),
        u64s(&|r| r.counts.rows_out),
        u64s(&|r| r.counts.dropped_total()),
        u64s(&|r| r.counts.quarantined),
        s(&|r| serde_json::to_string(&r.counts.dropped).expect("serialisable")),
        s(&|r| serde_json::to_string(&r.counts.figures).expect("serialisable")),
        Arc::new(Float64Array::from_iter_values(records.iter().map(|(r, _)| r.seconds))),
        s(&|r| r.started_at.clone()),
        s(&|r| r.finished_at.clone()),
        s(&|r| r.stamp.fingerprint.clone()),
        Arc::new(BooleanArray::from(records.iter().map(|(_, c)| *c).collect::<Vec<_>>())),
    ];
    Ok(RecordBatch::try_new(STATS.clone(), columns)?)
}
