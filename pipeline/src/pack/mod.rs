//! The global **pack** stage: every unit's `tokens` -> mixture -> seeded shuffle -> packed
//! `shards` + `manifest.json`.
//!
//! ```text
//! mod.rs    the stage: its record (manifest), freshness (PackView), parts and their assembly
//! stage.rs  its config section `[pack]` and its declaration in the stage graph (PackStage)
//! job.rs    the passes over the tokens for one share of the shards
//! spill.rs  spill files of the shuffle, the shard writer
//! ```
//!
//! It runs once all units of the plan have current `tokens`. With W ranks each packs its part:
//! the shards whose first token falls in its share of the shuffle's key-range buckets
//! ([`job`]), byte-identical to what one process writes. Every rank works this out on its own
//! from the same token totals, so the parts need no messages between ranks: a rank that finds
//! units still being tokenized leaves pack to a later run (run the ranks again after the array,
//! or `safepipe run` once with one rank).
//!
//! Commit: each part's shards are written in the attempt's folder, published under names
//! holding the fingerprint and attempt, and listed by a part record (`pack/_parts/`); the rank
//! that finds every part committed writes `pack/manifest.json` (one atomic write), the stage's
//! completion record. Shards of an older manifest are deleted only after the new one is in place.

mod job;
mod spill;
mod stage;

use job::PackJob;
pub use job::Part;
pub use stage::{MixSourceConfig, PackConfig, PackStage};

use crate::config::Config;
use crate::engine::freshness::{self, Case, Verdict};
use crate::engine::leases::{self, Acquired};
use crate::engine::plan::Plan;
use crate::engine::records::{self, Committed, OutputFile, RECORD_VERSION, Stamp};
use crate::engine::run_dir::{RunDir, StageFiles, attempt_id};
use crate::engine::runner::{Env, StageSummary};
use crate::engine::storage::Location;
use crate::error::{Error, Result};
use crate::stages::{Fingerprint, StageGraph};
use object_store::ObjectStoreExt;
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use safepipe_operators::UnitCounts;
use safepipe_operators::parquet_io::ObjectReader;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

pub use crate::engine::run_dir::MANIFEST;
/// The pack stage's name in records, leases, `--force` and `status`.
pub const STAGE: &str = "pack";
/// What a part record says of its part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartInfo {
    pub rank: u32,
    pub world: u32,
    /// Its first shard in the global order (its shards follow without gaps).
    pub first_shard: u64,
    /// `pack.bucket_bytes` when it was packed: the shares depend on the bucket count.
    pub bucket_bytes: u64,
}

/// Records of the parts of a multi-rank pack, until the manifest supersedes them.
pub const PARTS_DIR: &str = "pack/_parts";

/// `manifest.json`: what the shards hold and how they were made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default)]
    pub version: u32,
    /// Fingerprint, settings fingerprint, and the digest of every unit's `tokens` record read.
    #[serde(flatten)]
    pub stamp: Stamp,
    /// The attempt that wrote the shards (part of their names).
    #[serde(default)]
    pub attempt: String,
    pub tokenizer: TokenizerInfo,
    pub seq_len: usize,
    /// `uint16` or `uint32`: the element type of `shards.input_ids`.
    pub id_type: String,
    pub sequences: u64,
    /// `sequences * (seq_len + 1)`: equals `SELECT sum(cardinality(input_ids)) FROM shards`.
    pub tokens: u64,
    /// Tokens of the last, incomplete sequence: not written (tail policy: drop).
    pub tail_tokens_dropped: u64,
    /// Documents of `tokens` read, and where they went.
    pub documents_in: u64,
    pub documents_packed: u64,
    /// In a mixture source but not selected (downsampling).
    pub documents_not_selected: u64,
    /// Of a kind no mixture source takes.
    pub documents_not_in_mixture: u64,
    pub sources: Vec<SourceReport>,
    /// Shard files, relative to the run directory.
    pub shards: Vec<OutputFile>,
    pub units: usize,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
    /// In a part record: which part of a multi-rank pack (its `shards` are that part's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<PartInfo>,
}

impl Manifest {
    /// The stage's counts: documents in = packed + not selected + not in the mixture.
    pub fn counts(&self) -> UnitCounts {
        let mut counts = UnitCounts {
            rows_in: self.documents_in,
            rows_out: self.documents_packed,
            ..Default::default()
        };
        counts.drop("not_selected", self.documents_not_selected);
        counts.drop("not_in_mixture", self.documents_not_in_mixture);
        counts
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenizerInfo {
    pub path: String,
    /// SHA-256 of the tokenizer.json (`safepipe tokenizer export` writes the same bytes).
    pub sha256: String,
    pub vocab_size: usize,
    pub eos_id: u32,
    pub tag_id: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceReport {
    pub name: String,
    pub kinds: Vec<String>,
    pub documents: u64,
    pub available_tokens: u64,
    /// Weight mode: the requested share of packed tokens.
    pub requested_fraction: Option<f64>,
    /// Passes planned over the source (fractional: the last pass is a seeded subset).
    pub epochs: f64,
    /// Tokens of the copies selected (counting repeats), before packing.
    pub selected_tokens: u64,
    pub achieved_fraction: f64,
}

/// The committed manifest of a run directory, as far as it can be trusted.
#[derive(Debug)]
pub enum ManifestState {
    Missing,
    /// Valid, and every shard it names is present.
    Committed(Box<Manifest>),
    /// Present but unusable (corrupt, an older layout, a shard missing): the reason.
    Damaged(String),
}

impl ManifestState {
    pub fn manifest(&self) -> Option<&Manifest> {
        match self {
            ManifestState::Committed(m) => Some(m),
            _ => None,
        }
    }
}

/// Reads the committed manifest and checks that its shards exist (one listing).
pub async fn load_manifest(run_dir: &RunDir) -> Result<ManifestState> {
    let Some(bytes) = run_dir.manifest().read().await? else {
        return Ok(ManifestState::Missing);
    };
    let manifest: Manifest = match serde_json::from_slice(&bytes) {
        Ok(m) => m,
        Err(e) => {
            return Ok(ManifestState::Damaged(format!(
                "{MANIFEST} is not a valid manifest: {e}"
            )));
        }
    };
    if manifest.version != RECORD_VERSION {
        return Ok(ManifestState::Damaged(format!(
            "{MANIFEST} has layout version {} (this safepipe writes {RECORD_VERSION})",
            manifest.version
        )));
    }
    let present: std::collections::HashSet<String> = run_dir
        .list("pack/shards")
        .await?
        .into_iter()
        .filter_map(|m| run_dir.relative(&run_dir.root().with_path(m.location)))
        .collect();
    if let Some(missing) = manifest.shards.iter().find(|s| !present.contains(&s.file)) {
        return Ok(ManifestState::Damaged(format!(
            "the shard {} that {MANIFEST} names is missing",
            missing.file
        )));
    }
    Ok(ManifestState::Committed(Box::new(manifest)))
}

/// The committed manifest, or a clear error for commands that read the shards.
pub async fn require_manifest(run_dir: &RunDir, hint: &str) -> Result<Manifest> {
    match load_manifest(run_dir).await? {
        ManifestState::Committed(m) => Ok(*m),
        ManifestState::Missing => Err(Error::Config(format!(
            "no packed shards in {}: {hint}",
            run_dir.display()
        ))),
        ManifestState::Damaged(why) => Err(Error::Execution(format!(
            "the shards in {} cannot be used: {why}; `safepipe run` repacks them",
            run_dir.display()
        ))),
    }
}

/// The pack stage as the freshness rule sees it.
pub struct PackView {
    pub fingerprint: Fingerprint,
    /// Units of the plan whose `tokens` are not current (pack waits for them).
    pub missing: usize,
    /// The current `tokens` records of every unit, in unit order (when none is missing).
    pub tokens: Vec<Committed>,
    /// The digest of every unit's `tokens` record (`None` while units are missing): any
    /// upstream redo changes it.
    upstream: Option<BTreeMap<String, String>>,
    pub manifest: ManifestState,
}

impl PackView {
    /// `tokens_current`: the tokenize stage's current records (all units of the plan).
    async fn new(
        run_dir: &RunDir,
        plan: &Plan,
        fingerprint: &Fingerprint,
        tokens_current: &HashMap<u32, Committed>,
    ) -> Result<PackView> {
        let mut tokens: Vec<Committed> = plan
            .units
            .iter()
            .filter_map(|u| tokens_current.get(&u.id).cloned())
            .collect();
        tokens.sort_by_key(|c| c.record.unit);
        let missing = plan.units.len() - tokens.len();
        let upstream = (missing == 0).then(|| {
            let lines: String = tokens
                .iter()
                .map(|c| format!("{} {}\n", c.record.unit, c.digest))
                .collect();
            BTreeMap::from([("tokenize".to_string(), records::digest(lines.as_bytes()))])
        });
        Ok(PackView {
            fingerprint: fingerprint.clone(),
            missing,
            tokens,
            upstream,
            manifest: load_manifest(run_dir).await?,
        })
    }

    /// The view of the graph's pack stage, from the survey of its upstream `tokenize`.
    pub async fn of_graph(
        run_dir: &RunDir,
        plan: &Plan,
        graph: &StageGraph,
        fingerprints: &[Fingerprint],
        survey: &[Option<(StageFiles, freshness::Judged)>],
    ) -> Result<PackView> {
        let i = graph.position(STAGE).expect("pack is in the graph");
        let up = graph
            .position(graph.nodes[i].upstream[0])
            .expect("resolved when the graph was built");
        let (_, tokens) = survey[up].as_ref().expect("tokenize is a per-unit stage");
        PackView::new(run_dir, plan, &fingerprints[i], &tokens.current).await
    }

    /// The stamp a manifest (or part) made now carries; `None` while units are missing.
    fn stamp(&self) -> Option<Stamp> {
        Some(Stamp::new(&self.fingerprint, self.upstream.clone()?))
    }

    pub fn verdict(&self, forced: bool) -> Verdict {
        let case = Case {
            stamp: self.manifest.manifest().map(|m| &m.stamp),
            damaged: matches!(self.manifest, ManifestState::Damaged(_)),
            forced,
            incomplete: false,
        };
        freshness::judge(&case, &self.fingerprint, self.upstream.as_ref())
    }
}

/// Runs this rank's part of the global pack stage when every unit of the plan has current
/// tokens, and writes the manifest when all parts are there. `None`: nothing for this rank yet
/// (other ranks are still tokenizing).
pub(crate) async fn run_global(
    config: &Config,
    plan: &Plan,
    graph: &StageGraph,
    fingerprints: &[Fingerprint],
    env: &Arc<Env>,
    forced: bool,
) -> Result<Option<StageSummary>> {
    let units: Vec<u32> = plan.units.iter().map(|u| u.id).collect();
    // Units with failed LLM requests to retry still count with what they committed: a request
    // that keeps failing must not hold the shards back.
    let survey = freshness::survey(&env.run_dir, graph, fingerprints, &units, &[], true).await?;
    let view = PackView::of_graph(&env.run_dir, plan, graph, fingerprints, &survey).await?;
    let mut summary = StageSummary {
        stage: STAGE.into(),
        ..Default::default()
    };
    if view.missing > 0 {
        if env.world_size > 1 {
            info!(
                missing = view.missing,
                "pack: waiting for other ranks to tokenize; when they are done, run the ranks again (each packs its part) or `safepipe run {}` once",
                config.path.display()
            );
            return Ok(None);
        }
        warn!(
            missing = view.missing,
            "pack: blocked, some units are not tokenized (see the failures above)"
        );
        summary.blocked = 1;
        env.reporter.stage_started(STAGE, 0, 0);
        env.reporter.stage_finished(&summary);
        return Ok(Some(summary));
    }
    let why = match view.verdict(forced) {
        Verdict::Current => {
            summary.skipped = 1;
            env.reporter.stage_started(STAGE, 0, 1);
            env.reporter.stage_finished(&summary);
            return Ok(Some(summary));
        }
        Verdict::Redo(why) => why,
    };
    if let ManifestState::Damaged(problem) = &view.manifest {
        warn!(stage = STAGE, %problem, "damaged manifest: repacking");
    }
    let world = env.world_size;
    info!(stage = STAGE, why = %why, units = view.tokens.len(), parts = world, "stage planned");
    env.reporter.stage_started(STAGE, 1, 0);
    // This rank's own part first, then any part no other process holds or has committed (a
    // rank that finishes tokenizing last packs what earlier ranks could not).
    let mut packed = 0;
    let mut outcome: Result<()> = Ok(());
    for k in 0..world {
        let part = Part {
            rank: (env.rank + k) % world,
            world,
        };
        match pack_if_needed(config, env, &view, part, forced).await {
            Ok(true) => packed += 1,
            Ok(false) => {}
            Err(e) => {
                outcome = Err(e);
                break;
            }
        }
    }
    let outcome = match outcome {
        Ok(()) => assemble(config, &env.run_dir, &view, world).await,
        Err(e) => Err(e),
    };
    match outcome {
        Ok(assembled) => {
            if let Some(manifest) = &assembled {
                summary.counts = manifest.counts();
                summary.seconds = manifest.seconds;
            }
            if packed > 0 || assembled.is_some() {
                summary.done.insert(why.to_string(), 1);
                env.reporter.unit_finished(STAGE, &summary.counts);
            } else {
                summary.busy = 1;
            }
            if assembled.is_none() {
                info!(
                    packed,
                    of = world,
                    "pack: parts are still being packed elsewhere; the last to finish writes the manifest"
                );
            }
        }
        Err(e @ Error::Config(_)) => return Err(e),
        Err(e) => {
            warn!(stage = STAGE, error = %e, "pack failed");
            env.reporter.unit_failed(STAGE, env.rank, &e.to_string());
            summary.failed = 1;
        }
    }
    env.reporter.stage_finished(&summary);
    Ok(Some(summary))
}

/// Packs `part` unless another process holds it or it is committed and current (unless
/// `forced`). Returns whether it packed.
async fn pack_if_needed(config: &Config, env: &Env, view: &PackView, part: Part, forced: bool) -> Result<bool> {
    let attempt = attempt_id();
    let lease = match leases::acquire(&env.run_dir, STAGE, part.rank, env.rank, &attempt, env.lease_time).await? {
        Acquired::Owned(lease) => lease,
        Acquired::Busy(holder) => {
            info!(part = part.rank, holder = %holder.describe(), "pack: another process is packing this part: left to it");
            return Ok(false);
        }
    };
    if let Some(old) = &lease.took_over {
        env.run_dir.delete_attempt(STAGE, &old.attempt).await;
    }
    // Forced: only this rank's own part is redone; the others count if current.
    let redo = forced && part.rank == env.rank;
    let bucket_bytes = config.pack.as_ref().expect("pack configured").bucket_bytes;
    let outcome = match current_part(&env.run_dir, part, view, bucket_bytes).await {
        Ok(Some(_)) if !redo => Ok(false),
        Ok(_) => pack_part(config, env, view, part, &attempt, &lease).await.map(|_| true),
        Err(e) => Err(e),
    };
    env.run_dir.delete_attempt(STAGE, &attempt).await;
    lease.release().await;
    outcome
}

/// The shards named by the part records present (a multi-rank pack not assembled yet).
pub async fn part_shards(run_dir: &RunDir) -> Result<Vec<String>> {
    let mut shards = Vec::new();
    for meta in run_dir.list(PARTS_DIR).await? {
        let at = run_dir.root().with_path(meta.location);
        if let Some(part) = at
            .read()
            .await?
            .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
        {
            shards.extend(part.shards.into_iter().map(|s| s.file));
        }
    }
    Ok(shards)
}

/// Where the record of one part of a multi-rank pack lives.
fn part_location(run_dir: &RunDir, part: Part) -> Location {
    run_dir
        .root()
        .child(&format!("{PARTS_DIR}/part-{:05}-of-{:05}.json", part.rank, part.world))
}

/// The committed record of `part`, if it is current for `view` and its shards are present.
async fn current_part(run_dir: &RunDir, part: Part, view: &PackView, bucket_bytes: u64) -> Result<Option<Manifest>> {
    let Some(bytes) = part_location(run_dir, part).read().await? else {
        return Ok(None);
    };
    let Ok(record) = serde_json::from_slice::<Manifest>(&bytes) else {
        return Ok(None);
    };
    let same_share = record
        .part
        .is_some_and(|p| p.rank == part.rank && p.world == part.world && p.bucket_bytes == bucket_bytes);
    if record.version != RECORD_VERSION || Some(&record.stamp) != view.stamp().as_ref() || !same_share {
        return Ok(None);
    }
    let shards: Vec<&str> = record.shards.iter().map(|s| s.file.as_str()).collect();
    let present = run_dir.all_present(&shards).await?;
    Ok(present.then_some(record))
}

/// Packs this rank's share under the lease, publishes its shards and writes the part record.
async fn pack_part(
    config: &Config,
    env: &Env,
    view: &PackView,
    part: Part,
    attempt: &str,
    lease: &leases::Lease,
) -> Result<Manifest> {
    let pack = config.pack.as_ref().expect("pack configured");
    let tokenize = config.tokenize.as_ref().expect("pack needs tokenize");
    let clock = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let files: Vec<(u32, String)> = view
        .tokens
        .iter()
        .filter_map(|c| c.record.outputs.get("tokens").map(|f| (c.record.unit, f.file.clone())))
        .collect();
    let job = PackJob {
        pack,
        tokenizer: tokenize.tokenizer.get()?,
        run_dir: env.run_dir.clone(),
        attempt: attempt.to_string(),
        files,
        part,
    };
    let mut record = job.execute().await?;
    record
        .counts()
        .check()
        .map_err(|e| Error::Internal(format!("pack: {e}")))?;
    if !lease.still_held().await? {
        return Err(Error::Execution(
            "pack: another process took this part over (this one stalled past runner.lease_seconds)".into(),
        ));
    }
    let first = record.part.map_or(0, |p| p.first_shard);
    let mut shards = Vec::new();
    for (i, staged) in record.shards.iter().enumerate() {
        let name = spill::shard_file(first + i as u64, &view.fingerprint.stage, attempt);
        env.run_dir
            .publish(&env.run_dir.file(&staged.file)?, &env.run_dir.file(&name)?)
            .await?;
        shards.push(OutputFile {
            file: name,
            ..staged.clone()
        });
    }
    record.shards = shards;
    record.version = RECORD_VERSION;
    record.stamp = view.stamp().unwrap_or_default();
    record.attempt = attempt.to_string();
    record.tokenizer.path = tokenize.path.clone();
    record.units = view.tokens.len();
    record.started_at = started_at;
    record.finished_at = chrono::Utc::now().to_rfc3339();
    record.seconds = clock.elapsed().as_secs_f64();
    env.run_dir
        .put(&part_location(&env.run_dir, part), records::to_json(&record)?)
        .await?;
    Ok(record)
}

/// Writes the manifest when every part of a `world`-rank pack is committed and current: the
/// global figures (the same in every part) with all parts' shards in order. Then everything it
/// supersedes goes: shards no manifest names, and the part records. `None`: parts are missing.
async fn assemble(config: &Config, run_dir: &RunDir, view: &PackView, world: u32) -> Result<Option<Manifest>> {
    let bucket_bytes = config.pack.as_ref().expect("pack configured").bucket_bytes;
    let mut parts = Vec::new();
    for rank in 0..world {
        match current_part(run_dir, Part { rank, world }, view, bucket_bytes).await? {
            Some(p) => parts.push(p),
            None => return Ok(None),
        }
    }
    // The parts must tile the shards: each starts where the one before ended.
    let mut next = 0;
    for p in &parts {
        let first = p.part.map_or(0, |i| i.first_shard);
        if !p.shards.is_empty() && first != next {
            return Err(Error::Internal(format!(
                "pack: part {} of {world} starts at shard {first}, expected {next}; delete {PARTS_DIR} and run again",
                p.part.map_or(0, |i| i.rank)
            )));
        }
        next += p.shards.len() as u64;
    }
    let mut manifest = parts[0].clone();
    manifest.shards = parts.iter().flat_map(|p| p.shards.iter().cloned()).collect();
    manifest.part = None;
    manifest.started_at = parts.iter().map(|p| p.started_at.clone()).min().unwrap_or_default();
    manifest.finished_at = chrono::Utc::now().to_rfc3339();
    manifest.seconds = parts.iter().map(|p| p.seconds).fold(0.0, f64::max);
    let written: u64 = manifest.shards.iter().map(|s| s.rows).sum();
    if written != manifest.sequences || parts.iter().any(|p| p.sequences != manifest.sequences) {
        return Err(Error::Internal(format!(
            "pack: the parts of {world} rank(s) hold {written} rows, the layout says {}",
            manifest.sequences
        )));
    }
    run_dir.put(&run_dir.manifest(), records::to_json(&manifest)?).await?;
    // Superseded now: other shard files (an older manifest's, killed attempts') and the parts.
    let live: std::collections::HashSet<&str> = manifest.shards.iter().map(|s| s.file.as_str()).collect();
    for prefix in ["pack/shards", PARTS_DIR] {
        for meta in run_dir.list(prefix).await? {
            let at = run_dir.root().with_path(meta.location);
            let named = run_dir.relative(&at).is_some_and(|r| live.contains(r.as_str()));
            if !named && let Err(e) = run_dir.delete(&at).await {
                warn!(file = %at.display(), error = %e, "could not delete a superseded file (gc will)");
            }
        }
    }
    info!(
        sequences = manifest.sequences,
        tokens = manifest.tokens,
        tail_tokens_dropped = manifest.tail_tokens_dropped,
        shards = manifest.shards.len(),
        parts = world,
        tokenizer = %config.tokenize.as_ref().map(|t| t.path.as_str()).unwrap_or_default(),
        "packed"
    );
    Ok(Some(manifest))
}

/// Opens a Parquet file of the run (its footer read, no data yet).
pub async fn open_parquet(location: &Location) -> Result<ParquetRecordBatchStreamBuilder<ObjectReader>> {
    let size = location.store.head(&location.path).await?.size;
    let reader = ObjectReader::new(location.store.clone(), location.path.clone(), size);
    Ok(ParquetRecordBatchStreamBuilder::new(reader).await?)
}

/// Opens one shard file as a stream of record batches.
pub async fn open_shard(
    location: &Location,
) -> Result<parquet::arrow::async_reader::ParquetRecordBatchStream<ObjectReader>> {
    Ok(open_parquet(location).await?.with_batch_size(1024).build()?)
}
