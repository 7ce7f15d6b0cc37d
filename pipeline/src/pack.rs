//! The global **pack** stage: every unit's `tokens` -> mixture -> seeded shuffle -> packed
//! `shards` + `manifest.json`.
//!
//! It runs once all units of the plan have current `tokens` (with one rank: at the end of
//! `safepipe run`; with several: on rank 0 when it finds every unit done, or in a final
//! single-rank `safepipe run` after the array, which skips every committed unit).
//!
//! Memory stays flat in the corpus size. Four streaming passes over the `tokens` files:
//! 1. `kind, n_tokens`: tokens per mixture source and a histogram of selection hashes;
//! 2. (only for fractional passes) the documents of the one histogram bucket holding each
//!    source's cutoff, to make the selection exact to one document;
//! 3. `kind, input_ids`: every selected copy goes to one of B spill files on local disk, by its
//!    seeded shuffle key (bucket = key's position in B equal ranges);
//! 4. bucket by bucket: sort by key, pack into rows of `seq_len + 1`, write shard files.
//!
//! Buckets are key ranges, so the output is the documents in key order whatever B is, whatever
//! the number of ranks that made the units and the order they are read in.
//!
//! Commit: shards are written under names holding the fingerprint, then `pack/manifest.json`
//! (one atomic write) names them; it is the stage's completion record. Shards of an older
//! manifest are deleted only after the new one is in place.

use crate::config::{Config, PackConfig};
use crate::error::{Error, Result};
use crate::records::{CompletionRecord, OutputFile, delete_if_exists};
use crate::runner::{Reporter, StageSummary};
use crate::stages::{CODE_VERSION, hash};
use crate::storage::{Location, Stores};
use crate::writer::TableWriter;
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{SchemaRef, UInt32Type};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use safepipe_model::TextTokenizer;
use safepipe_operators::UnitCounts;
use safepipe_operators::pack::{
    CutoffFinder, MixSource, PURPOSE_SELECT, PURPOSE_SHUFFLE, Packer, doc_hash, plan_mixture,
};
use safepipe_operators::parquet_io::ObjectReader;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

pub const MANIFEST: &str = "pack/manifest.json";

/// `manifest.json`: what the shards hold and how they were made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub fingerprint: String,
    pub settings_fingerprint: String,
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
    pub shards: Vec<OutputFile>,
    pub units: usize,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
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

/// Reads the committed manifest, if any.
pub async fn load_manifest(run_dir: &Location) -> Result<Option<Manifest>> {
    match run_dir.child(MANIFEST).read().await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Internal(format!("{MANIFEST} is not a valid manifest: {e}"))),
    }
}

/// The settings that change the shards (spill location and bucket size do not).
fn settings(pack: &PackConfig) -> serde_json::Value {
    serde_json::json!({
        "seq_len": pack.seq_len, "seed": pack.seed, "shard_sequences": pack.shard_sequences,
        "total_tokens": pack.total_tokens,
        "mix": pack.mix.iter().map(|m| serde_json::json!([m.name, m.kinds, m.weight, m.epochs, m.max_epochs])).collect::<Vec<_>>(),
    })
}

/// (settings fingerprint, stage fingerprint) given the tokenize stage's fingerprint.
pub fn fingerprint(pack: &PackConfig, tokenize_fingerprint: &str) -> (String, String) {
    let settings = hash(&settings(pack));
    let stage = hash(&serde_json::json!([
        "pack",
        CODE_VERSION,
        settings,
        tokenize_fingerprint
    ]));
    (settings, stage)
}

/// Everything the pack stage needs from the run.
pub struct PackInput<'a> {
    pub config: &'a Config,
    pub stores: Arc<Stores>,
    pub run_dir: Location,
    /// Current `tokens` completion records of every unit of the plan.
    pub tokens: Vec<CompletionRecord>,
    pub tokenize_fingerprint: String,
    pub forced: bool,
    pub reporter: Arc<dyn Reporter>,
}

/// Runs the stage unless the committed manifest is current. Returns its summary.
pub async fn run(input: PackInput<'_>) -> Result<StageSummary> {
    let pack = input.config.pack.as_ref().expect("pack configured");
    let tokenize = input.config.tokenize.as_ref().expect("pack needs tokenize");
    let (settings_fp, fp) = fingerprint(pack, &input.tokenize_fingerprint);
    let previous = load_manifest(&input.run_dir).await?;
    let mut summary = StageSummary {
        stage: "pack".into(),
        ..Default::default()
    };
    let reason = match &previous {
        _ if input.forced => "forced",
        None => "new",
        Some(m) if m.fingerprint == fp => {
            summary.skipped = 1;
            input.reporter.stage_started("pack", 0, 1);
            input.reporter.stage_finished(&summary);
            return Ok(summary);
        }
        Some(m) if m.settings_fingerprint != settings_fp => "settings changed",
        Some(_) => "upstream changed",
    };
    input.reporter.stage_started("pack", 1, 0);
    info!(
        stage = "pack",
        why = reason,
        units = input.tokens.len(),
        "stage planned"
    );
    let clock = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let mut tokens = input.tokens.clone();
    tokens.sort_by_key(|r| r.unit);
    let files: Vec<(u32, String)> = tokens
        .iter()
        .filter_map(|r| r.outputs.get("tokens").map(|f| (r.unit, f.file.clone())))
        .collect();
    let job = PackJob {
        pack,
        tokenizer: &tokenize.tokenizer,
        stores: input.stores.clone(),
        run_dir: input.run_dir.clone(),
        fingerprint: fp.clone(),
        files,
    };
    let mut manifest = job.execute().await?;
    manifest.fingerprint = fp;
    manifest.settings_fingerprint = settings_fp;
    manifest.tokenizer.path = tokenize.path.clone();
    manifest.units = tokens.len();
    manifest.started_at = started_at;
    manifest.finished_at = chrono::Utc::now().to_rfc3339();
    manifest.seconds = clock.elapsed().as_secs_f64();
    let bytes = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    input.run_dir.child(MANIFEST).write(bytes).await?;
    if let Some(previous) = previous {
        for old in previous.shards {
            if !manifest.shards.iter().any(|s| s.file == old.file) {
                delete_if_exists(&input.stores.resolve(&old.file)?).await?;
            }
        }
    }
    let mut counts = UnitCounts {
        rows_in: manifest.documents_in,
        rows_out: manifest.documents_packed,
        ..Default::default()
    };
    counts.drop("not_selected", manifest.documents_not_selected);
    counts.drop("not_in_mixture", manifest.documents_not_in_mixture);
    counts.check().map_err(|e| Error::Internal(format!("pack: {e}")))?;
    info!(
        sequences = manifest.sequences,
        tokens = manifest.tokens,
        tail_tokens_dropped = manifest.tail_tokens_dropped,
        shards = manifest.shards.len(),
        seconds = manifest.seconds,
        "packed"
    );
    summary.done.insert(reason.to_string(), 1);
    summary.counts = counts;
    summary.seconds = manifest.seconds;
    input.reporter.unit_finished("pack", &summary.counts);
    input.reporter.stage_finished(&summary);
    Ok(summary)
}

struct PackJob<'a> {
    pack: &'a PackConfig,
    tokenizer: &'a TextTokenizer,
    stores: Arc<Stores>,
    run_dir: Location,
    fingerprint: String,
    /// (unit id, tokens file) in unit order.
    files: Vec<(u32, String)>,
}

/// Per-source state while planning.
struct SourceState {
    spec: MixSource,
    documents: u64,
    tokens: u64,
    finder: CutoffFinder,
    whole_epochs: u32,
    /// Tokens the fractional pass must select (0 = no fractional pass).
    target: u64,
    /// Selection cutoff of the fractional pass (0 = none).
    cutoff: u64,
    selected_tokens: u64,
}

/// One selected document copy in a spill file.
struct SpillEntry {
    key: u64,
    unit: u32,
    row: u32,
    epoch: u32,
    source: u16,
    start: usize,
    len: usize,
}

const SPILL_HEADER: usize = 8 + 4 + 4 + 4 + 2 + 4;
/// Packed sequences handed to the shard writer at a time (bounded memory whatever the shard size).
const FLUSH_SEQUENCES: usize = 512;
/// More buckets than this would mean too many open files: buckets grow instead.
const MAX_BUCKETS: u64 = 512;

impl PackJob<'_> {
    async fn execute(&self) -> Result<Manifest> {
        let clock = Instant::now();
        // Pass 1: token totals per kind, then the mixture.
        let mut by_kind: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        self.scan(&["kind", "n_tokens"], |_, _, batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let n = batch.column(1).as_primitive::<UInt32Type>();
            for i in 0..batch.num_rows() {
                let entry = by_kind.entry(kinds.value(i).to_string()).or_default();
                entry.0 += 1;
                entry.1 += u64::from(n.value(i));
            }
        })
        .await?;
        let mut sources = self.sources(&by_kind)?;
        let kind_source: HashMap<String, u16> = sources
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.spec.kinds.iter().map(move |k| (k.clone(), i as u16)))
            .collect();
        for (kind, (docs, _)) in &by_kind {
            if !kind_source.contains_key(kind) {
                warn!(kind = %kind, documents = docs, "tokens of this kind are in no pack.mix source: not packed");
            }
        }
        let specs: Vec<MixSource> = sources.iter().map(|s| s.spec.clone()).collect();
        let available: Vec<u64> = sources.iter().map(|s| s.tokens).collect();
        let epochs = plan_mixture(&specs, &available, self.pack.total_tokens)
            .map_err(|e| Error::Config(format!("pack: {e}")))?;
        let mut fractional = false;
        for (s, &e) in sources.iter_mut().zip(&epochs) {
            s.whole_epochs = e.floor() as u32;
            let rest = e - e.floor();
            let target = (rest * s.tokens as f64).round() as u64;
            s.finder = CutoffFinder::new(target);
            s.target = target;
            if target > 0 {
                fractional = true;
            }
        }

        info!(
            stage = "pack",
            seconds = format!("{:.1}", clock.elapsed().as_secs_f64()),
            epochs = ?epochs,
            "pass 1 of 4 done: token totals and the mixture"
        );
        // Passes 1b and 2: the exact selection cutoff of each fractional pass.
        if fractional {
            self.scan_selection(&kind_source, |s, h, n| sources[s].finder.histogram(h, n))
                .await?;
            let mut boundary = false;
            for s in sources.iter_mut() {
                boundary |= s.finder.boundary().is_some();
            }
            if boundary {
                self.scan_selection(&kind_source, |s, h, n| sources[s].finder.candidate(h, n))
                    .await?;
            }
        }
        for s in sources.iter_mut() {
            let finder = std::mem::replace(&mut s.finder, CutoffFinder::new(0));
            s.cutoff = if s.target == 0 { 0 } else { finder.cutoff() };
        }
        let planned: u64 = sources
            .iter()
            .zip(&epochs)
            .map(|(s, e)| (s.tokens as f64 * e) as u64)
            .sum();

        info!(
            stage = "pack",
            seconds = format!("{:.1}", clock.elapsed().as_secs_f64()),
            "pass 2 of 4 done: selection cutoffs"
        );
        // Pass 3: scatter the selected copies into key-range buckets on local disk.
        let buckets = (planned * 4 / self.pack.bucket_bytes + 1).min(MAX_BUCKETS);
        let spill = SpillDir::create(self.pack.spill_dir.as_deref())?;
        let mut writers = (0..buckets)
            .map(|b| spill.writer(b))
            .collect::<Result<Vec<BufWriter<std::fs::File>>>>()?;
        let (mut documents_in, mut packed_docs, mut not_selected, mut not_in_mixture) = (0u64, 0u64, 0u64, 0u64);
        let seed = self.pack.seed;
        let mut io_error: Option<std::io::Error> = None;
        self.scan(&["kind", "input_ids"], |unit, first_row, batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let ids = batch.column(1).as_list::<i32>();
            for i in 0..batch.num_rows() {
                documents_in += 1;
                let Some(&s) = kind_source.get(kinds.value(i)) else {
                    not_in_mixture += 1;
                    continue;
                };
                let source = &mut sources[usize::from(s)];
                let row = first_row + i as u32;
                let selected = source.cutoff > 0 && {
                    let h = doc_hash(seed, PURPOSE_SELECT, unit, row, 0);
                    h < source.cutoff || source.cutoff == u64::MAX
                };
                let copies = source.whole_epochs + u32::from(selected);
                if copies == 0 {
                    not_selected += 1;
                    continue;
                }
                packed_docs += 1;
                let doc = ids.value(i);
                let doc = doc.as_primitive::<UInt32Type>().values();
                source.selected_tokens += u64::from(copies) * doc.len() as u64;
                for epoch in 0..copies {
                    let key = doc_hash(seed, PURPOSE_SHUFFLE, unit, row, epoch);
                    let bucket = ((u128::from(key) * u128::from(buckets)) >> 64) as usize;
                    if let Err(e) = write_entry(&mut writers[bucket], key, unit, row, epoch, s, doc) {
                        io_error.get_or_insert(e);
                    }
                }
            }
        })
        .await?;
        for mut w in writers.drain(..) {
            if let Err(e) = w.flush() {
                io_error.get_or_insert(e);
            }
        }
        if let Some(e) = io_error {
            return Err(Error::Internal(format!(
                "pack: writing spill files in {}: {e}",
                spill.path.display()
            )));
        }

        info!(
            stage = "pack",
            seconds = format!("{:.1}", clock.elapsed().as_secs_f64()),
            buckets,
            spill = %spill.path.display(),
            "pass 3 of 4 done: selected documents spilled"
        );
        // Pass 4: bucket by bucket in key order, pack and write shards.
        let names: Vec<String> = sources.iter().map(|s| s.spec.name.clone()).collect();
        let mut packer = Packer::new(self.pack.seq_len, self.tokenizer.vocab_size(), names);
        let mut sink = ShardSink::new(self, packer.schema());
        let mut doc = Vec::new();
        for b in 0..buckets {
            let bytes = spill.read(b)?;
            let mut entries = parse_entries(&bytes)?;
            entries.sort_unstable_by_key(|e| (e.key, e.unit, e.row, e.epoch));
            for e in &entries {
                doc.clear();
                doc.extend(
                    bytes[e.start..e.start + 4 * e.len]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
                );
                packer.push(e.source, &doc);
                if packer.pending() >= FLUSH_SEQUENCES
                    && let Some(batch) = packer.take_batch()?
                {
                    sink.write(batch).await?;
                }
            }
        }
        if let Some(batch) = packer.take_batch()? {
            sink.write(batch).await?;
        }
        let tail = packer.finish();
        let (shards, sequences) = sink.finish().await?;
        drop(spill);

        let row_len = self.pack.seq_len as u64 + 1;
        let selected: u64 = sources.iter().map(|s| s.selected_tokens).sum();
        if selected != sequences * row_len + tail {
            return Err(Error::Internal(format!(
                "pack: token accounting broken: selected {selected} != {sequences} sequences x {row_len} + tail {tail}"
            )));
        }
        let weight_sum: f64 = sources.iter().filter_map(|s| s.spec.weight).sum();
        let reports = sources
            .iter()
            .zip(&epochs)
            .map(|(s, &e)| SourceReport {
                name: s.spec.name.clone(),
                kinds: s.spec.kinds.clone(),
                documents: s.documents,
                available_tokens: s.tokens,
                requested_fraction: s.spec.weight.map(|w| w / weight_sum),
                epochs: e,
                selected_tokens: s.selected_tokens,
                achieved_fraction: if selected == 0 {
                    0.0
                } else {
                    s.selected_tokens as f64 / selected as f64
                },
            })
            .collect();
        Ok(Manifest {
            fingerprint: String::new(),
            settings_fingerprint: String::new(),
            tokenizer: TokenizerInfo {
                path: String::new(),
                sha256: self.tokenizer.hash().to_string(),
                vocab_size: self.tokenizer.vocab_size(),
                eos_id: self.tokenizer.eos_id(),
                tag_id: self.tokenizer.tag_id(),
            },
            seq_len: self.pack.seq_len,
            id_type: if self.tokenizer.vocab_size() > 65536 {
                "uint32"
            } else {
                "uint16"
            }
            .into(),
            sequences,
            tokens: sequences * row_len,
            tail_tokens_dropped: tail,
            documents_in,
            documents_packed: packed_docs,
            documents_not_selected: not_selected,
            documents_not_in_mixture: not_in_mixture,
            sources: reports,
            shards,
            units: 0,
            started_at: String::new(),
            finished_at: String::new(),
            seconds: 0.0,
        })
    }

    /// The mixture sources: the config's, or one per kind present (each taken once).
    fn sources(&self, by_kind: &BTreeMap<String, (u64, u64)>) -> Result<Vec<SourceState>> {
        let specs: Vec<MixSource> = if self.pack.mix.is_empty() {
            by_kind
                .keys()
                .map(|k| MixSource {
                    name: k.clone(),
                    kinds: vec![k.clone()],
                    weight: None,
                    epochs: None,
                    max_epochs: 1.0,
                })
                .collect()
        } else {
            self.pack
                .mix
                .iter()
                .map(|m| MixSource {
                    name: m.name.clone(),
                    kinds: if m.kinds.is_empty() {
                        vec![m.name.clone()]
                    } else {
                        m.kinds.clone()
                    },
                    weight: m.weight,
                    epochs: m.epochs,
                    max_epochs: m.max_epochs,
                })
                .collect()
        };
        let mut seen: HashMap<&str, &str> = HashMap::new();
        for s in &specs {
            for k in &s.kinds {
                if let Some(other) = seen.insert(k, &s.name) {
                    return Err(Error::Config(format!(
                        "pack.mix: kind {k:?} is in both {other:?} and {:?}; a kind belongs to one source",
                        s.name
                    )));
                }
            }
        }
        Ok(specs
            .into_iter()
            .map(|spec| {
                let (documents, tokens) = spec
                    .kinds
                    .iter()
                    .filter_map(|k| by_kind.get(k))
                    .fold((0, 0), |(d, t), (d2, t2)| (d + d2, t + t2));
                if documents == 0 {
                    warn!(source = %spec.name, kinds = ?spec.kinds, "pack.mix source has no documents");
                }
                SourceState {
                    spec,
                    documents,
                    tokens,
                    finder: CutoffFinder::new(0),
                    whole_epochs: 0,
                    target: 0,
                    cutoff: 0,
                    selected_tokens: 0,
                }
            })
            .collect())
    }

    /// Streams every document of a mixture source as `f(source, selection hash, tokens)`.
    async fn scan_selection(
        &self,
        kind_source: &HashMap<String, u16>,
        mut f: impl FnMut(usize, u64, u64),
    ) -> Result<()> {
        let seed = self.pack.seed;
        self.scan(&["kind", "n_tokens"], |unit, first_row, batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let n = batch.column(1).as_primitive::<UInt32Type>();
            for i in 0..batch.num_rows() {
                if let Some(&s) = kind_source.get(kinds.value(i)) {
                    let h = doc_hash(seed, PURPOSE_SELECT, unit, first_row + i as u32, 0);
                    f(usize::from(s), h, u64::from(n.value(i)));
                }
            }
        })
        .await
    }

    /// Streams `columns` of every unit's tokens file in unit order; `f(unit, first_row, batch)`.
    async fn scan(&self, columns: &[&str], mut f: impl FnMut(u32, u32, &RecordBatch)) -> Result<()> {
        for (unit, file) in &self.files {
            let builder = open_parquet(&self.stores.resolve(file)?).await?;
            let roots: Vec<usize> = columns
                .iter()
                .map(|c| {
                    builder
                        .schema()
                        .index_of(c)
                        .map_err(|_| Error::Internal(format!("{file} has no column {c}")))
                })
                .collect::<Result<_>>()?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let mut stream = builder.with_projection(mask).with_batch_size(4096).build()?;
            let mut row = 0u32;
            while let Some(batch) = stream.try_next().await? {
                f(*unit, row, &batch);
                row += batch.num_rows() as u32;
            }
        }
        Ok(())
    }
}

fn write_entry(
    w: &mut impl Write,
    key: u64,
    unit: u32,
    row: u32,
    epoch: u32,
    source: u16,
    ids: &[u32],
) -> std::io::Result<()> {
    w.write_all(&key.to_le_bytes())?;
    w.write_all(&unit.to_le_bytes())?;
    w.write_all(&row.to_le_bytes())?;
    w.write_all(&epoch.to_le_bytes())?;
    w.write_all(&source.to_le_bytes())?;
    w.write_all(&(ids.len() as u32).to_le_bytes())?;
    for id in ids {
        w.write_all(&id.to_le_bytes())?;
    }
    Ok(())
}

fn parse_entries(bytes: &[u8]) -> Result<Vec<SpillEntry>> {
    let mut out = Vec::new();
    let mut at = 0;
    let field = |at: usize, n: usize| &bytes[at..at + n];
    while at < bytes.len() {
        if at + SPILL_HEADER > bytes.len() {
            return Err(Error::Internal("pack: a spill file ends inside an entry".into()));
        }
        let u32_at = |p: usize| u32::from_le_bytes(field(p, 4).try_into().expect("4 bytes"));
        let key = u64::from_le_bytes(field(at, 8).try_into().expect("8 bytes"));
        let (unit, row, epoch) = (u32_at(at + 8), u32_at(at + 12), u32_at(at + 16));
        let source = u16::from_le_bytes(field(at + 20, 2).try_into().expect("2 bytes"));
        let len = u32_at(at + 22) as usize;
        let start = at + SPILL_HEADER;
        if start + 4 * len > bytes.len() {
            return Err(Error::Internal("pack: a spill file ends inside a document".into()));
        }
        out.push(SpillEntry {
            key,
            unit,
            row,
            epoch,
            source,
            start,
            len,
        });
        at = start + 4 * len;
    }
    Ok(out)
}

/// The shuffle's spill files: a fresh directory, removed when dropped.
struct SpillDir {
    path: PathBuf,
}

impl SpillDir {
    fn create(parent: Option<&str>) -> Result<SpillDir> {
        let parent = parent.map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let path = parent.join(format!(
            "safepipe-pack-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
        ));
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::Config(format!("pack.spill_dir: cannot create {}: {e}", path.display())))?;
        Ok(SpillDir { path })
    }

    fn file(&self, bucket: u64) -> PathBuf {
        self.path.join(format!("bucket-{bucket:05}.bin"))
    }

    fn writer(&self, bucket: u64) -> Result<BufWriter<std::fs::File>> {
        let file = std::fs::File::create(self.file(bucket)).map_err(|e| {
            Error::Internal(format!(
                "pack: cannot create a spill file in {}: {e}",
                self.path.display()
            ))
        })?;
        Ok(BufWriter::with_capacity(256 << 10, file))
    }

    fn read(&self, bucket: u64) -> Result<Vec<u8>> {
        let path = self.file(bucket);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::Internal(format!("pack: cannot read {}: {e}", path.display())))?;
        // Free disk as we go: the bucket is in memory now.
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes packed sequences into shard files of exactly `shard_sequences` rows (the last may
/// hold fewer).
struct ShardSink {
    run_dir: Location,
    fingerprint: String,
    schema: SchemaRef,
    per_shard: usize,
    current: Option<(TableWriter, usize)>,
    shards: Vec<OutputFile>,
    sequences: u64,
}

impl ShardSink {
    fn new(job: &PackJob<'_>, schema: SchemaRef) -> Self {
        ShardSink {
            run_dir: job.run_dir.clone(),
            fingerprint: job.fingerprint.clone(),
            schema,
            per_shard: job.pack.shard_sequences,
            current: None,
            shards: Vec::new(),
            sequences: 0,
        }
    }

    async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let mut start = 0;
        while start < batch.num_rows() {
            if self.current.is_none() {
                let name = format!(
                    "pack/shards/shard-{:06}-{}.parquet",
                    self.shards.len(),
                    self.fingerprint
                );
                self.current = Some((TableWriter::new(self.run_dir.child(&name), self.schema.clone()), 0));
            }
            let (writer, rows) = self.current.as_mut().expect("set above");
            let n = (self.per_shard - *rows).min(batch.num_rows() - start);
            writer.write(&batch.slice(start, n)).await?;
            *rows += n;
            start += n;
            self.sequences += n as u64;
            if *rows == self.per_shard {
                self.commit_current().await?;
            }
        }
        Ok(())
    }

    async fn commit_current(&mut self) -> Result<()> {
        if let Some((writer, _)) = self.current.take()
            && let Some(file) = writer.commit().await?
        {
            self.shards.push(file);
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<(Vec<OutputFile>, u64)> {
        self.commit_current().await?;
        Ok((self.shards, self.sequences))
    }
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
