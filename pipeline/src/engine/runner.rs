//! The stage runner: for each stage in DAG order, judge which of this rank's units need work
//! ([`crate::engine::freshness`]), run them (a bounded number at once), and commit each one.
//!
//! Commit protocol per (stage, unit):
//! 1. take the unit's lease ([`crate::engine::leases`]); a unit another live process holds is
//!    left to it; re-read the record under the lease (another process may have just done it);
//! 2. stream the stage's batches into one Parquet file per output table under the attempt's own
//!    folder (`<stage>/_attempts/<attempt>/`), check the accounting invariant;
//! 3. check the lease is still ours, publish each file under a name unique to the attempt, write
//!    the completion record (atomic, synced), and only then delete the files of the record it
//!    replaced.
//!
//! A `kill -9` at any instant leaves either the old record with its files or the new one with
//! its files; a redo never writes over a file a reader may be using. Work is at-least-once,
//! output exactly-once. A unit that fails, or panics, gets a failure record with the message;
//! the other units go on and the run exits 3.

use crate::config::Config;
use crate::engine::freshness::{self, Why};
use crate::engine::leases::{self, Acquired, Lease};
use crate::engine::plan::{Plan, WorkUnit};
use crate::engine::records::{self, Committed, CompletionRecord, FailureRecord, OutputFile, RECORD_VERSION, Stamp};
use crate::engine::run_dir::{RunDir, attempt_id};
use crate::engine::writer::TableWriter;
use crate::error::{Error, Result};
use crate::stages::{Fingerprint, Scope, StageGraph, UnitInput, UnitStage};
use futures::StreamExt;
use safepipe_operators::UnitCounts;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
    /// Units already committed and current: no work.
    pub skipped: usize,
    /// Units done in this run, by the reason they needed work.
    pub done: BTreeMap<String, usize>,
    pub failed: usize,
    /// Units whose upstream unit is not current (it failed or is held elsewhere): not attempted.
    pub blocked: usize,
    /// Units another live process holds: left to it.
    pub busy: usize,
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
pub(crate) struct Env {
    pub run_dir: RunDir,
    pub rank: u32,
    pub world_size: u32,
    pub lease_time: Duration,
    pub reporter: Arc<dyn Reporter>,
}

/// Runs every stage for this rank's units, doing all the work it can: a failed unit is recorded
/// and skipped, and only its downstream units wait. Returns per-stage summaries (with failures
/// counted); errors are for what stops the whole run (config, an unreachable run directory).
pub async fn run(config: Arc<Config>, options: RunOptions, reporter: Arc<dyn Reporter>) -> Result<Vec<StageSummary>> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let (plan, created) = if options.world_size > 1 {
        let plan = Plan::load(&config, &run_dir).await?.ok_or_else(|| {
            Error::Config(format!(
                "no work plan in {}; with several ranks run `safepipe plan {}` once before starting them",
                run_dir.display(),
                config.path.display()
            ))
        })?;
        (plan, false)
    } else {
        Plan::load_or_create(&config, &run_dir).await?
    };
    if created {
        info!(units = plan.units.len(), "made the work plan");
    } else {
        // A plan made just now saw the inputs as they are; any other is checked against them.
        plan.check_inputs(&config, &run_dir).await?.refuse_changes(&config)?;
    }
    let graph = StageGraph::new(&config)?;
    graph.check_names(&options.force)?;
    let fingerprints = graph.fingerprints(&plan.fingerprint)?;
    let forced = graph.downstream_closure(&options.force);
    let units = plan.units_for_rank(options.rank, options.world_size);
    let unit_ids: Vec<u32> = units.iter().map(|u| u.id).collect();
    let by_id: HashMap<u32, &WorkUnit> = units.iter().map(|u| (u.id, u)).collect();
    let env = Arc::new(Env {
        run_dir,
        rank: options.rank,
        world_size: options.world_size,
        lease_time: Duration::from_secs(config.lease_seconds),
        reporter,
    });
    info!(
        rank = options.rank,
        world_size = options.world_size,
        units = units.len(),
        "starting"
    );

    // The results current now of each per-unit stage, in graph order (empty for the global one).
    let mut current: Vec<HashMap<u32, Committed>> = Vec::new();
    let mut summaries = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let stage = match &node.scope {
            Scope::Unit(stage) => stage,
            Scope::Global => {
                let forced = forced.contains(&node.name());
                if let Some(summary) =
                    crate::pack::run_global(&config, &plan, &graph, &fingerprints, &env, forced).await?
                {
                    summaries.push(summary);
                }
                current.push(HashMap::new());
                continue;
            }
        };
        let files = env.run_dir.stage(stage.name()).await?;
        for (unit, why) in files.damaged.iter().filter(|(u, _)| by_id.contains_key(u)) {
            warn!(stage = stage.name(), unit, problem = %why, "damaged record: the unit is redone");
        }
        let upstream: Vec<&HashMap<u32, Committed>> = node
            .upstream
            .iter()
            .map(|name| &current[graph.position(name).expect("resolved when the graph was built")])
            .collect();
        let judged = freshness::judge_stage(
            node,
            &fingerprints[i],
            &files,
            &unit_ids,
            forced.contains(&stage.name()),
            &upstream,
        );
        let mut summary = StageSummary {
            stage: stage.name().to_string(),
            skipped: judged.current.len(),
            ..Default::default()
        };
        let mut table_files = files_by_unit(stage.name(), &files);
        let mut todo = Vec::new();
        for (unit, why, digests) in judged.todo {
            let Some(digests) = digests else {
                summary.blocked += 1;
                continue;
            };
            let inputs: BTreeMap<&'static str, CompletionRecord> = node
                .upstream
                .iter()
                .zip(&upstream)
                .map(|(name, records)| (*name, records[&unit].record.clone()))
                .collect();
            // Files of this unit the listing found in the stage's tables: whatever the new
            // record does not name is a leftover to delete once it commits.
            let leftovers = table_files.remove(&unit).unwrap_or_default();
            let job = UnitJob {
                unit: by_id[&unit].clone(),
                why,
                fingerprint: fingerprints[i].clone(),
                upstream: digests,
                inputs,
                leftovers,
            };
            todo.push(job);
        }
        let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
        for job in &todo {
            *reasons.entry(job.why.as_str()).or_default() += 1;
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
        let mut now_current = judged.current;
        let tasks = todo.into_iter().map(|job| attempt(stage.clone(), job, env.clone()));
        let mut results = futures::stream::iter(tasks).buffer_unordered(options.jobs.max(1));
        while let Some((unit, why, outcome)) = results.next().await {
            match outcome {
                Outcome::Committed(committed) => {
                    summary.counts.merge(&committed.record.counts);
                    *summary.done.entry(why.to_string()).or_default() += 1;
                    env.reporter.unit_finished(stage.name(), &committed.record.counts);
                    now_current.insert(unit, committed);
                }
                Outcome::AlreadyDone(committed) => {
                    summary.skipped += 1;
                    now_current.insert(unit, committed);
                }
                Outcome::Busy(holder) => {
                    summary.busy += 1;
                    info!(stage = stage.name(), unit, holder = %holder, "held by another process: left to it");
                }
                Outcome::Failed(e) => {
                    summary.failed += 1;
                    warn!(stage = stage.name(), unit, error = %e, "unit failed");
                    env.reporter.unit_failed(stage.name(), unit, &e);
                }
            }
        }
        summary.seconds = clock.elapsed().as_secs_f64();
        env.reporter.stage_finished(&summary);
        let threshold = config.snapshot_records;
        save_snapshot(
            &env.run_dir,
            stage.name(),
            &files,
            &now_current,
            summary.done_total(),
            threshold,
        )
        .await;
        current.push(now_current);
        summaries.push(summary);
    }
    Ok(summaries)
}

/// Writes the stage's record snapshot when at least `threshold` of its records were not in the
/// old one (read one by one at the start, or committed by this rank since): the records listed
/// at the start, overlaid with those current now. Best effort: a failure is a warning (the
/// snapshot is a cache).
async fn save_snapshot(
    run_dir: &RunDir,
    stage: &str,
    listed: &crate::engine::run_dir::StageFiles,
    current: &HashMap<u32, Committed>,
    committed_now: usize,
    threshold: usize,
) {
    let unsnapshotted = listed.done.len() - listed.from_snapshot + committed_now;
    if threshold == 0 || unsnapshotted < threshold {
        return;
    }
    let mut records: HashMap<u32, &Committed> = listed.done.iter().map(|(u, c)| (*u, c)).collect();
    records.extend(current.iter().map(|(u, c)| (*u, c)));
    match run_dir.save_snapshot(stage, records.into_values()).await {
        Ok(held) => info!(stage, records = held, "wrote the stage's record snapshot"),
        Err(e) => {
            warn!(stage, error = %e, "could not write the stage's record snapshot (a cache: records are read one by one)")
        }
    }
}

/// The files of each unit in a stage's table folders (`<stage>/<table>/unit-NNNNNN-…`), from one
/// listing.
fn files_by_unit(stage: &str, files: &crate::engine::run_dir::StageFiles) -> HashMap<u32, Vec<String>> {
    let mut by_unit: HashMap<u32, Vec<String>> = HashMap::new();
    for name in files.files.keys() {
        if let Some(unit) = RunDir::output_unit(stage, name) {
            by_unit.entry(unit).or_default().push(name.clone());
        }
    }
    by_unit
}

/// One unit of one stage to (re)do.
struct UnitJob {
    unit: WorkUnit,
    why: Why,
    /// The stage's fingerprint and the digests of the upstream records it reads: what the new
    /// record is stamped with.
    fingerprint: Fingerprint,
    upstream: BTreeMap<String, String>,
    /// The current upstream records it reads.
    inputs: BTreeMap<&'static str, CompletionRecord>,
    /// Files of this unit in the stage's tables when the stage started.
    leftovers: Vec<String>,
}

/// How one unit attempt ended.
enum Outcome {
    Committed(Committed),
    /// Another process committed it while this one waited for the lease.
    AlreadyDone(Committed),
    /// Another live process holds its lease.
    Busy(String),
    Failed(String),
}

/// Takes the lease, runs the unit in its own task (so a panic is caught and becomes this unit's
/// failure: its record written, its lease released here).
async fn attempt(stage: Arc<dyn UnitStage>, job: UnitJob, env: Arc<Env>) -> (u32, Why, Outcome) {
    let (id, why) = (job.unit.id, job.why);
    let fingerprint = job.fingerprint.stage.clone();
    let name = stage.name();
    let attempt = attempt_id();
    let lease = match leases::acquire(&env.run_dir, name, id, env.rank, &attempt, env.lease_time).await {
        Ok(Acquired::Owned(lease)) => lease,
        Ok(Acquired::Busy(holder)) => return (id, why, Outcome::Busy(holder.describe())),
        Err(e) => return (id, why, Outcome::Failed(format!("taking the unit's lease: {e}"))),
    };
    if let Some(old) = &lease.took_over {
        env.run_dir.delete_attempt(name, &old.attempt).await;
    }
    let task = tokio::spawn(commit_unit(stage.clone(), job, attempt.clone(), env.clone(), *lease));
    let outcome = match task.await {
        Ok(Ok(outcome)) => outcome,
        // Recorded by the task, under the lease.
        Ok(Err(e)) => Outcome::Failed(e.to_string()),
        Err(e) => {
            let error = panic_message(e);
            record_failure(&env, name, id, &fingerprint, &error).await;
            env.run_dir.delete_attempt(name, &attempt).await;
            // The task died holding the lease.
            leases::abandon(&env.run_dir, name, id).await;
            Outcome::Failed(error)
        }
    };
    (id, why, outcome)
}

/// Writes the failure record of a unit (best effort: a warning if it cannot).
async fn record_failure(env: &Env, stage: &str, unit: u32, fingerprint: &str, error: &str) {
    let failure = FailureRecord {
        stage: stage.to_string(),
        unit,
        fingerprint: fingerprint.to_string(),
        rank: env.rank,
        error: error.to_string(),
        at: chrono::Utc::now().to_rfc3339(),
    };
    let written = match records::to_json(&failure) {
        Ok(bytes) => env.run_dir.put(&env.run_dir.failure(stage, unit), bytes).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        warn!(stage, unit, error = %e, "could not write the failure record");
    }
}

/// The message of a panicked unit task.
fn panic_message(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => {
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            format!("internal error: the unit panicked: {text} (please report this with the log)")
        }
        Err(e) => format!("internal error: the unit's task ended: {e}"),
    }
}

/// Under the lease: re-checks freshness, produces, publishes and commits one unit; the lease is
/// released whatever happens (except a panic: then [`attempt`] deletes it).
async fn commit_unit(
    stage: Arc<dyn UnitStage>,
    job: UnitJob,
    attempt: String,
    env: Arc<Env>,
    lease: Lease,
) -> Result<Outcome> {
    let (name, id, fingerprint) = (stage.name(), job.unit.id, job.fingerprint.stage.clone());
    let outcome = produce(stage, job, attempt.clone(), &env, &lease).await;
    if let Err(e) = &outcome {
        record_failure(&env, name, id, &fingerprint, &e.to_string()).await;
        env.run_dir.delete_attempt(name, &attempt).await;
    }
    lease.release().await;
    outcome
}

async fn produce(
    stage: Arc<dyn UnitStage>,
    job: UnitJob,
    attempt: String,
    env: &Env,
    lease: &Lease,
) -> Result<Outcome> {
    let (id, name) = (job.unit.id, stage.name());
    let record_at = env.run_dir.record(name, id);
    let previous = match record_at.read().await? {
        Some(bytes) => Committed::parse(&bytes).ok(),
        None => None,
    };
    // Another process may have committed the unit while we judged it: judge it again.
    if job.why != Why::Forced
        && let Some(p) = &previous
    {
        let case = freshness::Case {
            stamp: Some(&p.record.stamp),
            damaged: false,
            forced: false,
            incomplete: stage.incomplete(&p.record),
        };
        let files: Vec<&str> = p.record.outputs.values().map(|f| f.file.as_str()).collect();
        if env.run_dir.all_present(&files).await?
            && freshness::judge(&case, &job.fingerprint, Some(&job.upstream)) == freshness::Verdict::Current
        {
            return Ok(Outcome::AlreadyDone(p.clone()));
        }
    }
    let started_at = chrono::Utc::now().to_rfc3339();
    let clock = Instant::now();
    let mut writers: Vec<(&'static str, TableWriter)> = stage
        .outputs()
        .into_iter()
        .map(|t| {
            let staged = env
                .run_dir
                .attempt_file(name, &attempt, &format!("{}/unit-{id:06}.parquet", t.name));
            (t.name, TableWriter::new(staged, t.schema))
        })
        .collect();
    let streamed = async {
        let mut counts = UnitCounts::default();
        let mut batches = stage.run(UnitInput {
            unit: job.unit,
            run_dir: env.run_dir.clone(),
            upstream: job.inputs,
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
        Ok::<_, Error>(counts)
    }
    .await;
    let counts = match streamed {
        Ok(counts) => counts,
        Err(e) => {
            // A failed attempt leaves no multipart upload open on an object store.
            for (_, writer) in writers {
                writer.abort().await;
            }
            return Err(e);
        }
    };
    counts
        .check()
        .map_err(|e| Error::Internal(format!("stage {name}, unit {id}: {e}")))?;
    let mut finished = Vec::new();
    for (table, writer) in writers {
        if let Some(file) = writer.finish().await? {
            finished.push((table, file));
        }
    }
    if !lease.still_held().await? {
        return Err(Error::Execution(format!(
            "stage {name}, unit {id}: another process took the unit over (this one stalled past runner.lease_seconds); its result is kept, this one discarded"
        )));
    }
    let mut outputs = BTreeMap::new();
    for (table, file) in finished {
        let relative = RunDir::output_name(name, table, id, &job.fingerprint.stage, &attempt);
        env.run_dir
            .publish(&file.location, &env.run_dir.file(&relative)?)
            .await?;
        outputs.insert(
            table.to_string(),
            OutputFile {
                file: relative,
                rows: file.rows,
                bytes: file.bytes,
            },
        );
    }
    let record = CompletionRecord {
        version: RECORD_VERSION,
        stage: name.to_string(),
        unit: id,
        stamp: Stamp::new(&job.fingerprint, job.upstream),
        attempt: attempt.clone(),
        rank: env.rank,
        world_size: env.world_size,
        counts,
        outputs,
        started_at,
        finished_at: chrono::Utc::now().to_rfc3339(),
        seconds: clock.elapsed().as_secs_f64(),
    };
    let bytes = records::to_json(&record)?;
    if !lease.still_held().await? {
        return Err(Error::Execution(format!(
            "stage {name}, unit {id}: another process took the unit over while this one published; its result is kept"
        )));
    }
    let tag = env.run_dir.put(&record_at, bytes.clone()).await?;
    let committed = Committed {
        digest: records::digest(&bytes),
        record,
        tag,
    };
    // From here on the unit is committed: cleanup is best effort (leftovers are gc's).
    if let Err(e) = env.run_dir.delete(&env.run_dir.failure(name, id)).await {
        warn!(stage = name, unit = id, error = %e, "could not delete the old failure record");
    }
    // Superseded files: the replaced record's, and leftovers of killed attempts of this unit.
    let mut superseded: Vec<String> = job.leftovers;
    if let Some(p) = &previous {
        superseded.extend(p.record.outputs.values().map(|o| o.file.clone()));
    }
    superseded.retain(|f| !committed.record.outputs.values().any(|o| &o.file == f));
    superseded.sort();
    superseded.dedup();
    for file in superseded {
        let deleted = match env.run_dir.file(&file) {
            Ok(at) => env.run_dir.delete(&at).await,
            Err(e) => Err(e),
        };
        if let Err(e) = deleted {
            warn!(file, error = %e, "could not delete a superseded file (gc will)");
        }
    }
    env.run_dir.delete_attempt(name, &attempt).await;
    debug!(
        stage = name,
        unit = id,
        rows_in = committed.record.counts.rows_in,
        seconds = committed.record.seconds,
        "unit committed"
    );
    Ok(Outcome::Committed(committed))
}

#[cfg(test)]
mod tests;
