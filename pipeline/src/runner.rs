//! The stage runner: for each stage in DAG order, decide which of this rank's units need work,
//! run them (a bounded number at once), and commit each one.
//!
//! Commit protocol per (stage, unit): stream the stage's batches into one Parquet file per output
//! table (each published atomically), check the accounting invariant, then write the completion
//! record (atomic). Only then are the outputs of the record it replaces deleted. A `kill -9` at
//! any instant leaves either the old record with its files or the new one with its files; the
//! rerun redoes exactly the units without a current record and writes the same rows, so output
//! is exactly-once even though work is at-least-once.

use crate::config::Config;
use crate::error::{Error, Result};
use crate::plan::{Plan, WorkUnit};
use crate::records::{self, CompletionRecord, FailureRecord};
use crate::stages::{self, Fingerprint, Stage, UnitInput};
use crate::storage::{Location, Stores};
use crate::writer::TableWriter;
use futures::StreamExt;
use safepipe_operators::UnitCounts;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// What this invocation of `safepipe run` does.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub rank: u32,
    pub world_size: u32,
    /// Stages to redo (with everything downstream), even if committed.
    pub force: Vec<String>,
    pub jobs: usize,
}

/// Receives progress events; the CLI turns them into progress bars. Never affects results.
pub trait Reporter: Send + Sync {
    fn stage_started(&self, _stage: &str, _todo: usize, _skipped: usize) {}
    fn unit_finished(&self, _stage: &str, _counts: &UnitCounts) {}
    fn unit_failed(&self, _stage: &str, _unit: u32, _error: &str) {}
    fn stage_finished(&self, _summary: &StageSummary) {}
}

/// What happened to one stage in this run, on this rank.
#[derive(Debug, Clone, Default)]
pub struct StageSummary {
    pub stage: String,
    /// Units already committed with the current fingerprint: no work.
    pub skipped: usize,
    /// Units done in this run, by the reason they needed work.
    pub done: BTreeMap<String, usize>,
    pub failed: usize,
    /// Units whose upstream unit is not committed (it failed): not attempted.
    pub blocked: usize,
    /// Counts of the units done in this run.
    pub counts: UnitCounts,
    pub seconds: f64,
}

impl StageSummary {
    pub fn done_total(&self) -> usize {
        self.done.values().sum()
    }
}

/// Everything a unit needs that is shared by the whole run.
struct Env {
    stores: Arc<Stores>,
    run_dir: Location,
    rank: u32,
    world_size: u32,
    reporter: Arc<dyn Reporter>,
}

/// Runs every stage for this rank's units, doing all the work it can: a failed unit is recorded
/// and skipped, and only its downstream units wait. Returns per-stage summaries (with failures
/// counted); errors are for what stops the whole run (config, an unreachable run directory).
pub async fn run(config: Arc<Config>, options: RunOptions, reporter: Arc<dyn Reporter>) -> Result<Vec<StageSummary>> {
    let stores = Arc::new(Stores::default());
    let run_dir = stores.resolve(&config.run_dir)?;
    let plan = if options.world_size > 1 {
        Plan::load(&config, &run_dir).await?.ok_or_else(|| {
            Error::Config(format!(
                "no work plan in {}; with several ranks run `safepipe plan {}` once before starting them",
                run_dir.display(),
                config.path.display()
            ))
        })?
    } else {
        let (plan, created) = Plan::load_or_create(&config, &stores, &run_dir).await?;
        if created {
            info!(units = plan.units.len(), "made the work plan");
        }
        plan
    };
    let stages = stages::pipeline(&config);
    let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
    for name in &options.force {
        let pack = name == "pack" && config.pack.is_some();
        if name != "all" && !pack && !names.contains(&name.as_str()) {
            return Err(Error::Config(format!(
                "--force {name}: no such stage; stages are {names:?} (or 'all')"
            )));
        }
    }
    let fingerprints = stages::fingerprints(&stages, &plan.fingerprint);
    let forced = stages::downstream_closure(&stages, &options.force);
    let units = plan.units_for_rank(options.rank, options.world_size);
    let env = Arc::new(Env {
        stores,
        run_dir,
        rank: options.rank,
        world_size: options.world_size,
        reporter,
    });
    info!(
        rank = options.rank,
        world_size = options.world_size,
        units = units.len(),
        "starting"
    );

    let mut committed: HashMap<&'static str, HashMap<u32, CompletionRecord>> = HashMap::new();
    let mut summaries = Vec::new();
    for (i, stage) in stages.iter().enumerate() {
        let fingerprint = &fingerprints[i];
        let upstream: Vec<(&'static str, &HashMap<u32, CompletionRecord>, &str)> = stage
            .upstream()
            .iter()
            .map(|name| {
                let j = names.iter().position(|n| n == name).expect("declared earlier");
                (*name, &committed[name], fingerprints[j].stage.as_str())
            })
            .collect();
        let existing = records::load_done(&env.run_dir, stage.name()).await?;
        let mut summary = StageSummary {
            stage: stage.name().to_string(),
            ..Default::default()
        };
        let mut todo = Vec::new();
        for unit in &units {
            let mut upstream_records = BTreeMap::new();
            for (name, records, fp) in &upstream {
                if let Some(r) = records.get(&unit.id).filter(|r| r.fingerprint == *fp) {
                    upstream_records.insert(*name, r.clone());
                }
            }
            if upstream_records.len() < upstream.len() {
                summary.blocked += 1;
                continue;
            }
            let previous = existing.get(&unit.id);
            let redone_above =
                |r: &CompletionRecord| upstream_records.values().any(|u| later(&u.finished_at, &r.started_at));
            let reason = match previous {
                _ if forced.contains(&stage.name()) => "forced",
                None => "new",
                Some(r) if r.fingerprint == fingerprint.stage && stage.incomplete(r) => "retry failed requests",
                Some(r) if r.fingerprint == fingerprint.stage && redone_above(r) => "upstream redone",
                Some(r) if r.fingerprint == fingerprint.stage => {
                    summary.skipped += 1;
                    continue;
                }
                Some(r) if r.settings_fingerprint != fingerprint.settings => "settings changed",
                Some(_) => "upstream changed",
            };
            todo.push((unit.clone(), upstream_records, previous.cloned(), reason));
        }
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, _, _, reason) in &todo {
            *reasons.entry(reason).or_default() += 1;
        }
        info!(
            stage = stage.name(),
            to_do = todo.len(),
            committed = summary.skipped,
            blocked = summary.blocked,
            why = ?reasons,
            "stage planned"
        );
        env.reporter.stage_started(stage.name(), todo.len(), summary.skipped);

        let clock = Instant::now();
        let mut records = existing;
        let tasks = todo.into_iter().map(|(unit, upstream, previous, reason)| {
            let stage = stage.clone();
            let env = env.clone();
            let fingerprint = fingerprint.clone();
            let unit_id = unit.id;
            let handle = tokio::spawn(run_unit(stage, unit, upstream, previous, fingerprint, env));
            async move { (unit_id, reason, handle.await) }
        });
        let mut results = futures::stream::iter(tasks).buffer_unordered(options.jobs.max(1));
        while let Some((unit, reason, joined)) = results.next().await {
            let outcome = joined.unwrap_or_else(|e| Err(Error::Internal(format!("unit task panicked: {e}"))));
            match outcome {
                Ok(record) => {
                    summary.counts.merge(&record.counts);
                    *summary.done.entry(reason.to_string()).or_default() += 1;
                    env.reporter.unit_finished(stage.name(), &record.counts);
                    records.insert(unit, record);
                }
                Err(e) => {
                    summary.failed += 1;
                    records.remove(&unit);
                    warn!(stage = stage.name(), unit, error = %e, "unit failed");
                    env.reporter.unit_failed(stage.name(), unit, &e.to_string());
                }
            }
        }
        summary.seconds = clock.elapsed().as_secs_f64();
        env.reporter.stage_finished(&summary);
        committed.insert(stage.name(), records);
        summaries.push(summary);
    }
    if config.pack.is_some() {
        let j = names
            .iter()
            .position(|n| *n == "tokenize")
            .expect("pack needs tokenize");
        let force_pack = options.force.iter().any(|f| f == "pack" || f == "all");
        if let Some(summary) = run_pack(&config, &plan, &env, &fingerprints[j].stage, force_pack).await? {
            summaries.push(summary);
        }
    }
    Ok(summaries)
}

/// Runs the global pack stage when every unit of the plan has current tokens (on rank 0 only
/// when several ranks share the plan). `None`: not this rank's job.
async fn run_pack(
    config: &Arc<Config>,
    plan: &Plan,
    env: &Arc<Env>,
    tokenize_fingerprint: &str,
    forced: bool,
) -> Result<Option<StageSummary>> {
    if env.rank != 0 {
        info!("pack: runs on rank 0 (or in a final single-rank `safepipe run`) once every unit is tokenized");
        return Ok(None);
    }
    let done = records::load_done(&env.run_dir, "tokenize").await?;
    let current: Vec<CompletionRecord> = plan
        .units
        .iter()
        .filter_map(|u| {
            done.get(&u.id)
                .filter(|r| r.fingerprint == tokenize_fingerprint)
                .cloned()
        })
        .collect();
    let missing = plan.units.len() - current.len();
    if missing > 0 {
        if env.world_size > 1 {
            info!(
                missing,
                "pack: waiting for other ranks; when they finish, run `safepipe run {}` once (one rank)",
                config.path.display()
            );
            return Ok(None);
        }
        warn!(
            missing,
            "pack: blocked, some units are not tokenized (see the failures above)"
        );
        let summary = StageSummary {
            stage: "pack".into(),
            blocked: 1,
            ..Default::default()
        };
        env.reporter.stage_started("pack", 0, 0);
        env.reporter.stage_finished(&summary);
        return Ok(Some(summary));
    }
    let summary = crate::pack::run(crate::pack::PackInput {
        config,
        stores: env.stores.clone(),
        run_dir: env.run_dir.clone(),
        tokens: current,
        tokenize_fingerprint: tokenize_fingerprint.to_string(),
        forced,
        reporter: env.reporter.clone(),
    })
    .await;
    match summary {
        Ok(summary) => Ok(Some(summary)),
        Err(e @ Error::Config(_)) => Err(e),
        Err(e) => {
            warn!(stage = "pack", error = %e, "pack failed");
            env.reporter.unit_failed("pack", 0, &e.to_string());
            Ok(Some(StageSummary {
                stage: "pack".into(),
                failed: 1,
                ..Default::default()
            }))
        }
    }
}

/// `a` is a later instant than `b` (both RFC 3339; unparseable counts as not later).
fn later(a: &str, b: &str) -> bool {
    match (
        chrono::DateTime::parse_from_rfc3339(a),
        chrono::DateTime::parse_from_rfc3339(b),
    ) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

fn output_location(env: &Env, stage: &str, table: &str, unit: u32, fingerprint: &str) -> Location {
    env.run_dir
        .child(&format!("{stage}/{table}/unit-{unit:06}-{fingerprint}.parquet"))
}

/// Runs and commits one unit of one stage; on failure leaves a failure record.
async fn run_unit(
    stage: Arc<dyn Stage>,
    unit: WorkUnit,
    upstream: BTreeMap<&'static str, CompletionRecord>,
    previous: Option<CompletionRecord>,
    fingerprint: Fingerprint,
    env: Arc<Env>,
) -> Result<CompletionRecord> {
    let id = unit.id;
    match produce(&stage, unit, upstream, previous, &fingerprint, &env).await {
        Ok(record) => Ok(record),
        Err(e) => {
            let failure = FailureRecord {
                stage: stage.name().to_string(),
                unit: id,
                fingerprint: fingerprint.stage.clone(),
                rank: env.rank,
                error: e.to_string(),
                at: chrono::Utc::now().to_rfc3339(),
            };
            if let Err(write_error) =
                records::write_json(&records::failed_location(&env.run_dir, stage.name(), id), &failure).await
            {
                warn!(unit = id, error = %write_error, "could not write the failure record");
            }
            Err(e)
        }
    }
}

async fn produce(
    stage: &Arc<dyn Stage>,
    unit: WorkUnit,
    upstream: BTreeMap<&'static str, CompletionRecord>,
    previous: Option<CompletionRecord>,
    fingerprint: &Fingerprint,
    env: &Env,
) -> Result<CompletionRecord> {
    let started_at = chrono::Utc::now().to_rfc3339();
    let clock = Instant::now();
    let id = unit.id;
    let name = stage.name();
    let mut writers: Vec<(&'static str, TableWriter)> = stage
        .outputs()
        .into_iter()
        .map(|t| {
            (
                t.name,
                TableWriter::new(output_location(env, name, t.name, id, &fingerprint.stage), t.schema),
            )
        })
        .collect();
    let mut counts = UnitCounts::default();
    let mut batches = stage.run(UnitInput {
        unit,
        stores: env.stores.clone(),
        upstream,
    });
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        for (table, rows) in &batch.tables {
            let (_, writer) = writers
                .iter_mut()
                .find(|(t, _)| t == table)
                .ok_or_else(|| Error::Internal(format!("stage {name} produced undeclared table {table}")))?;
            writer.write(rows).await?;
        }
        counts.merge(&batch.counts);
    }
    counts
        .check()
        .map_err(|e| Error::Internal(format!("stage {name}, unit {id}: {e}")))?;
    let mut outputs = BTreeMap::new();
    for (table, writer) in writers {
        if let Some(file) = writer.commit().await? {
            outputs.insert(table.to_string(), file);
        }
    }
    let record = CompletionRecord {
        stage: name.to_string(),
        unit: id,
        fingerprint: fingerprint.stage.clone(),
        settings_fingerprint: fingerprint.settings.clone(),
        rank: env.rank,
        world_size: env.world_size,
        counts,
        outputs,
        started_at,
        finished_at: chrono::Utc::now().to_rfc3339(),
        seconds: clock.elapsed().as_secs_f64(),
    };
    records::write_json(&records::done_location(&env.run_dir, name, id), &record).await?;
    records::delete_if_exists(&records::failed_location(&env.run_dir, name, id)).await?;
    if let Some(previous) = previous {
        for (table, old) in previous.outputs {
            if record.outputs.get(&table).map(|f| &f.file) != Some(&old.file) {
                records::delete_if_exists(&env.stores.resolve(&old.file)?).await?;
            }
        }
    }
    debug!(
        stage = name,
        unit = id,
        rows_in = record.counts.rows_in,
        seconds = record.seconds,
        "unit committed"
    );
    Ok(record)
}
