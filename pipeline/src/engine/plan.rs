//! The work plan: every input file split into work units below file level, made once per run
//! directory and never re-split.
//!
//! - Parquet: one unit per row group (row counts from the footer).
//! - Uncompressed JSON Lines: byte ranges of about `plan.jsonl_unit_bytes`, each moved forward to
//!   the next line start, so every line belongs to exactly one unit.
//! - gzip / zstd JSON Lines: one unit per file (compressed streams cannot be entered mid-way).
//! - A file whose format cannot be opened (e.g. a truncated Parquet footer) becomes one
//!   `unreadable` unit that ingest quarantines, so it is visible and accounted for.
//!
//! The plan is stored as `plan.json` in the run directory with a fingerprint of the inputs; a
//! later run with different inputs is refused instead of silently re-splitting.
//!
//! Inputs over time: the plan records what it saw of each file (size, and the ETag on object
//! stores or the modification time on local disk). [`Plan::check_inputs`] lists the inputs
//! again: a planned file that changed or vanished is an error for `run` (its units' results
//! would no longer match it), a new file is reported, and `safepipe plan --extend` appends units
//! for new files, leaving every existing unit, fingerprint and result as it was.

use crate::config::Config;
use crate::engine::run_dir::RunDir;
use crate::engine::storage::{Location, Stores};
use crate::error::{Error, Result};
use crate::stages::ingest::{InputConfig, InputFormat};
use futures::TryStreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::async_reader::AsyncFileReader;
use safepipe_operators::ingest::{Codec, Slice};
use safepipe_operators::parquet_io::{ObjectReader, storage_failure};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::ops::Range;

/// Version 2 added `files` (what planning saw of each input file). The version is not part of
/// the plan's fingerprint: a version 1 plan loads, without drift checks.
const PLAN_VERSION: u32 = 2;
/// Version of the way inputs are split into units (part of the plan's fingerprint).
const SPLIT_VERSION: u32 = 1;
/// How far past a tentative JSONL boundary we look for a newline in one request.
const BOUNDARY_WINDOW: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkUnit {
    pub id: u32,
    /// The input's name in the config.
    pub input: String,
    /// The file, as a local path or URL.
    pub file: String,
    pub size: u64,
    pub slice: Slice,
}

impl WorkUnit {
    /// Which rank of `world` processes this unit: units are dealt round-robin by id.
    pub fn rank(&self, world: u32) -> u32 {
        self.id % world
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub version: u32,
    /// Hash of the inputs and `[plan]` settings the plan was made from.
    pub fingerprint: String,
    pub created_at: String,
    pub units: Vec<WorkUnit>,
    /// Every planned input file as planning saw it (empty in plans of version 1).
    #[serde(default)]
    pub files: Vec<PlannedFile>,
    /// When `plan --extend` last added files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extended_at: Option<String>,
}

/// One planned input file and what planning saw of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFile {
    pub input: String,
    /// Local path or URL.
    pub file: String,
    pub size: u64,
    /// The ETag on object stores, the modification time on local disk.
    pub version: String,
}

/// How the inputs differ from what the plan saw.
#[derive(Debug, Default)]
pub struct InputDrift {
    /// Planned files that grew, shrank or changed, with what changed.
    pub changed: Vec<String>,
    /// Planned files that cannot be found now: their units fail (a storage error, retried by the
    /// next run) rather than stopping the run, since a mount or a bucket may come back.
    pub gone: Vec<String>,
    /// Files the inputs match now that the plan does not hold.
    pub new: Vec<String>,
}

impl InputDrift {
    /// Lines for `status` and logs.
    pub fn describe(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .changed
            .iter()
            .map(|c| format!("changed since planning: {c}"))
            .collect();
        lines.extend(self.gone.iter().map(|f| format!("missing since planning: {f}")));
        lines.extend(
            self.new
                .iter()
                .map(|f| format!("not in the plan (new since planning): {f}")),
        );
        lines
    }

    /// `run` refuses changed files and warns about new ones.
    pub fn refuse_changes(&self, config: &Config) -> Result<()> {
        if !self.changed.is_empty() {
            return Err(Error::Config(format!(
                "{} planned input file(s) changed since planning, so their units' results would no longer match them: {};                  restore the files, or plan a new run directory for the new data",
                self.changed.len(),
                self.changed.join("; ")
            )));
        }
        for file in &self.gone {
            tracing::warn!(file = %file, "a planned input file is missing: its units will fail until it is back");
        }
        if !self.new.is_empty() {
            tracing::warn!(
                files = self.new.len(),
                first = %self.new[0],
                "input files not in the plan are not processed; add them with `safepipe plan --extend {}`",
                config.path.display()
            );
        }
        Ok(())
    }
}

/// What the plan depends on: inputs (names, paths, formats) and the `[plan]` section.
pub fn fingerprint(config: &Config) -> String {
    let identity: Vec<_> = config.inputs.iter().map(|i| (&i.name, &i.paths, i.format)).collect();
    // The split's version, not the file layout's: plans of either layout keep their fingerprint.
    // cannot fail: strings, a unit enum and numbers always serialise.
    let json = serde_json::to_string(&(SPLIT_VERSION, identity, &config.plan)).expect("serialisable");
    hex::encode(Sha256::digest(json))[..16].to_string()
}

impl Plan {
    /// Loads the run directory's plan, checking it still matches the config.
    pub async fn load(config: &Config, run_dir: &RunDir) -> Result<Option<Plan>> {
        let location = run_dir.plan();
        let Some(bytes) = location.read().await? else {
            return Ok(None);
        };
        let plan: Plan = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Internal(format!("{} is not a valid plan: {e}", location.display())))?;
        let expected = fingerprint(config);
        if plan.fingerprint != expected {
            return Err(Error::Config(format!(
                "the inputs or [plan] settings changed since {} was planned (plan {}, config {expected}); \
                 a run directory's work plan is fixed for its life: point run_dir at a new directory, \
                 or delete this one to start over",
                run_dir.display(),
                plan.fingerprint
            )));
        }
        Ok(Some(plan))
    }

    /// Loads the plan, or makes and stores it. Making it is deterministic (sorted listings), so
    /// ranks racing to create it write identical bytes; the stored copy is what everyone uses.
    pub async fn load_or_create(config: &Config, run_dir: &RunDir) -> Result<(Plan, bool)> {
        if let Some(plan) = Plan::load(config, run_dir).await? {
            return Ok((plan, false));
        }
        let mut plan = Plan {
            version: PLAN_VERSION,
            fingerprint: fingerprint(config),
            created_at: chrono::Utc::now().to_rfc3339(),
            units: Vec::new(),
            files: Vec::new(),
            extended_at: None,
        };
        for input in &config.inputs {
            for file in list_input(run_dir.stores(), input).await? {
                plan.add_file(config, input, &file).await?;
            }
        }
        plan.store(config, run_dir).await.map(|p| (p, true))
    }

    /// Writes the plan and reads back the stored copy (what every rank uses).
    async fn store(&self, config: &Config, run_dir: &RunDir) -> Result<Plan> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Internal(e.to_string()))?;
        run_dir.put(&run_dir.plan(), json).await?;
        Plan::load(config, run_dir)
            .await?
            .ok_or_else(|| Error::Internal("plan vanished after writing".into()))
    }

    async fn add_file(&mut self, config: &Config, input: &InputConfig, file: &InputFile) -> Result<()> {
        plan_file(config, input, file, &mut self.units).await?;
        self.files.push(PlannedFile {
            input: input.name.clone(),
            file: file.location.display(),
            size: file.size,
            version: file.version.clone(),
        });
        Ok(())
    }

    /// Lists the inputs again and compares them with what planning saw.
    pub async fn check_inputs(&self, config: &Config, run_dir: &RunDir) -> Result<InputDrift> {
        if self.files.is_empty() {
            return Ok(InputDrift::default()); // a version 1 plan: nothing recorded to compare with
        }
        Ok(self.drift(&list_inputs(config, run_dir).await?))
    }

    /// How `listed` (every input's files now) differs from what planning saw.
    fn drift(&self, listed: &[(&InputConfig, InputFile)]) -> InputDrift {
        let mut drift = InputDrift::default();
        let planned: std::collections::HashMap<&str, &PlannedFile> =
            self.files.iter().map(|f| (f.file.as_str(), f)).collect();
        let mut seen = std::collections::HashSet::new();
        for (_, file) in listed {
            let name = file.location.display();
            match planned.get(name.as_str()) {
                None => drift.new.push(name.clone()),
                Some(p) if p.size != file.size => {
                    drift
                        .changed
                        .push(format!("{name} ({} bytes when planned, {} now)", p.size, file.size));
                }
                Some(p) if p.version != file.version => {
                    drift.changed.push(format!(
                        "{name} (modified: {} when planned, {} now)",
                        p.version, file.version
                    ));
                }
                Some(_) => {}
            }
            seen.insert(name);
        }
        for f in &self.files {
            if !seen.contains(&f.file) {
                drift.gone.push(f.file.clone());
            }
        }
        drift
    }

    /// `safepipe plan --extend`: appends units for input files the plan does not hold yet.
    /// Existing units keep their ids (and so their results); returns the new files.
    pub async fn extend(&mut self, config: &Config, run_dir: &RunDir) -> Result<Vec<String>> {
        if self.files.is_empty() {
            return Err(Error::Config(format!(
                "the plan in {} predates input tracking (version {}); it cannot be extended: plan a new run directory",
                run_dir.display(),
                self.version
            )));
        }
        let listed = list_inputs(config, run_dir).await?;
        let drift = self.drift(&listed);
        drift.refuse_changes(config).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("cannot extend the plan: {msg}")),
            other => other,
        })?;
        let new: std::collections::HashSet<&str> = drift.new.iter().map(String::as_str).collect();
        for (input, file) in &listed {
            if new.contains(file.location.display().as_str()) {
                self.add_file(config, input, file).await?;
            }
        }
        if !drift.new.is_empty() {
            self.extended_at = Some(chrono::Utc::now().to_rfc3339());
            *self = self.store(config, run_dir).await?;
        }
        Ok(drift.new)
    }

    pub fn units_for_rank(&self, rank: u32, world: u32) -> Vec<WorkUnit> {
        self.units.iter().filter(|u| u.rank(world) == rank).cloned().collect()
    }
}

/// Every input's files as they are now; an input none of whose files remain lists nothing
/// (its planned files are reported gone).
async fn list_inputs<'a>(config: &'a Config, run_dir: &RunDir) -> Result<Vec<(&'a InputConfig, InputFile)>> {
    let mut listed = Vec::new();
    for input in &config.inputs {
        match list_input(run_dir.stores(), input).await {
            Ok(files) => listed.extend(files.into_iter().map(|f| (input, f))),
            Err(Error::Config(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(listed)
}

/// A listed input file.
struct InputFile {
    location: Location,
    size: u64,
    /// The ETag on object stores, the modification time on local disk.
    version: String,
}

impl InputFile {
    fn new(location: Location, meta: &object_store::ObjectMeta) -> InputFile {
        let version = match (&meta.e_tag, location.base.scheme()) {
            (Some(tag), scheme) if scheme != "file" => tag.clone(),
            _ => meta.last_modified.to_rfc3339(),
        };
        InputFile {
            location,
            size: meta.size,
            version,
        }
    }
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '['])
}

/// Expands an input's paths (files, directories, globs) into a sorted, de-duplicated file list.
async fn list_input(stores: &Stores, input: &InputConfig) -> Result<Vec<InputFile>> {
    let mut files: Vec<InputFile> = Vec::new();
    for (j, pattern) in input.paths.iter().enumerate() {
        let mut found = Vec::new();
        if has_glob(pattern) {
            let fixed: Vec<&str> = pattern.split('/').take_while(|s| !has_glob(s)).collect();
            let prefix = stores.resolve(&fixed.join("/"))?;
            let full = stores.resolve(pattern)?;
            let matcher = glob::Pattern::new(full.path.as_ref()).map_err(|e| {
                Error::Config(format!(
                    "inputs '{}'.paths[{j}] = {pattern:?}: bad glob: {e}",
                    input.name
                ))
            })?;
            let listed: Vec<_> = prefix.store.list(Some(&prefix.path)).try_collect().await?;
            for meta in listed {
                if matcher.matches(meta.location.as_ref()) {
                    found.push(InputFile::new(prefix.with_path(meta.location.clone()), &meta));
                }
            }
        } else {
            let location = stores.resolve(pattern)?;
            match location.store.head(&location.path).await {
                Ok(meta) => found.push(InputFile::new(location, &meta)),
                Err(_) => {
                    let listed: Vec<_> = location.store.list(Some(&location.path)).try_collect().await?;
                    for meta in listed {
                        let name = meta.location.filename().unwrap_or_default();
                        if name.starts_with(['.', '_']) || detect_format(input.format, name).is_err() {
                            continue; // hidden, marker or foreign files in a directory
                        }
                        found.push(InputFile::new(location.with_path(meta.location.clone()), &meta));
                    }
                }
            }
        }
        if found.is_empty() {
            return Err(Error::Config(format!(
                "inputs '{}'.paths[{j}] = {pattern:?} matches no file; check the path (relative paths are relative to the config file)",
                input.name
            )));
        }
        files.extend(found);
    }
    files.sort_by_key(|f| f.location.url());
    files.dedup_by(|a, b| a.location.url() == b.location.url());
    Ok(files)
}

/// How a file is read.
#[derive(Debug, PartialEq, Eq)]
enum FileKind {
    Parquet,
    Jsonl,
    CompressedJsonl(Codec),
}

fn detect_format(format: InputFormat, name: &str) -> std::result::Result<FileKind, String> {
    let lower = name.to_ascii_lowercase();
    let (stem, codec) = if let Some(stem) = lower.strip_suffix(".gz") {
        (stem, Some(Codec::Gzip))
    } else if let Some(stem) = lower.strip_suffix(".zst").or_else(|| lower.strip_suffix(".zstd")) {
        (stem, Some(Codec::Zstd))
    } else {
        (lower.as_str(), None)
    };
    let jsonl = |codec: Option<Codec>| match codec {
        Some(c) => FileKind::CompressedJsonl(c),
        None => FileKind::Jsonl,
    };
    match format {
        InputFormat::Parquet => Ok(FileKind::Parquet),
        InputFormat::Jsonl => Ok(jsonl(codec)),
        InputFormat::Auto if stem.ends_with(".parquet") && codec.is_none() => Ok(FileKind::Parquet),
        InputFormat::Auto if [".jsonl", ".json", ".ndjson"].iter().any(|e| stem.ends_with(e)) => Ok(jsonl(codec)),
        InputFormat::Auto => Err(format!(
            "cannot tell the format of {name:?} from its extension; set format = \"parquet\" or \"jsonl\" on the input"
        )),
    }
}

async fn plan_file(config: &Config, input: &InputConfig, file: &InputFile, units: &mut Vec<WorkUnit>) -> Result<()> {
    let name = file.location.path.filename().unwrap_or_default().to_string();
    let kind =
        detect_format(input.format, &name).map_err(|e| Error::Config(format!("inputs '{}': {e}", input.name)))?;
    let slices = match kind {
        FileKind::Parquet => {
            let mut reader = ObjectReader::new(file.location.store.clone(), file.location.path.clone(), file.size);
            match reader.get_metadata(None).await.map_err(storage_failure) {
                Ok(meta) => row_groups(&meta).unwrap_or_else(|error| vec![Slice::Unreadable { error }]),
                Err(Ok(storage)) => return Err(Error::Storage(storage)),
                Err(Err(e)) => vec![Slice::Unreadable {
                    error: format!("not a readable Parquet file: {e}"),
                }],
            }
        }
        FileKind::CompressedJsonl(codec) => vec![Slice::JsonlCompressed { codec }],
        FileKind::Jsonl => split_lines(&file.location, file.size, config.plan.jsonl_unit_bytes)
            .await?
            .into_iter()
            .map(|range| Slice::JsonlRange {
                start: range.start,
                end: range.end,
            })
            .collect(),
    };
    for slice in slices {
        // Unit ids are u32: a plan of more units (row groups are the footer's claim) is refused.
        let id = u32::try_from(units.len()).map_err(|_| {
            Error::Config(format!(
                "inputs '{}': {} makes the plan hold more than {} work units; split the inputs into several runs",
                input.name,
                file.location.display(),
                u32::MAX
            ))
        })?;
        units.push(WorkUnit {
            id,
            input: input.name.clone(),
            file: file.location.display(),
            size: file.size,
            slice,
        });
    }
    Ok(())
}

/// Most rows a Parquet file may claim (2^40): its footer is untrusted, and its counts become
/// row offsets and quarantine record counts.
const MAX_FILE_ROWS: u64 = 1 << 40;

/// One slice per row group, or why the footer's row counts cannot be believed.
fn row_groups(meta: &parquet::file::metadata::ParquetMetaData) -> std::result::Result<Vec<Slice>, String> {
    let mut first_row = 0u64;
    let mut slices = Vec::with_capacity(meta.num_row_groups());
    for (row_group, rg) in meta.row_groups().iter().enumerate() {
        // cannot overflow: first_row <= MAX_FILE_ROWS (2^40) and rows <= i64::MAX.
        let rows = u64::try_from(rg.num_rows())
            .ok()
            .filter(|rows| first_row + rows <= MAX_FILE_ROWS)
            .ok_or_else(|| {
                format!(
                    "its footer claims {} rows for row group {row_group} (at most {MAX_FILE_ROWS} rows per file are believed)",
                    rg.num_rows()
                )
            })?;
        slices.push(Slice::ParquetRowGroup {
            row_group,
            first_row,
            rows,
        });
        first_row += rows;
    }
    Ok(slices)
}

/// Splits `[0, size)` into ranges of about `target` bytes whose starts are line starts.
async fn split_lines(file: &Location, size: u64, target: u64) -> Result<Vec<Range<u64>>> {
    let mut ranges = Vec::new();
    let mut start = 0u64;
    while start < size {
        // Saturating: the size is the store's claim.
        let tentative = start.saturating_add(target);
        if tentative >= size {
            break;
        }
        let end = next_line_start(file, tentative, size).await?;
        if end >= size {
            break;
        }
        ranges.push(start..end);
        start = end;
    }
    ranges.push(start..size);
    Ok(ranges)
}

/// The first line start at or after `at` (the byte after a '\n' at `at - 1` or later), or `size`.
async fn next_line_start(file: &Location, at: u64, size: u64) -> Result<u64> {
    // cannot underflow: `at` is a start plus plan.jsonl_unit_bytes (checked at least 4096).
    let mut from = at - 1;
    while from < size {
        let to = from.saturating_add(BOUNDARY_WINDOW).min(size);
        let bytes = file.store.get_range(&file.path, from..to).await?;
        if let Some(i) = memchr_newline(&bytes) {
            return Ok(from + i as u64 + 1);
        }
        from = to;
    }
    Ok(size)
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

/// `[plan]`: how inputs are cut into work units.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Target size of one work unit of an uncompressed JSON Lines file.
    pub jsonl_unit_bytes: u64,
}

impl PlanConfig {
    /// Checks the values serde cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.jsonl_unit_bytes < 4096 {
            return Err(format!(
                "plan.jsonl_unit_bytes = {} is too small; use at least 4096",
                self.jsonl_unit_bytes
            ));
        }
        Ok(())
    }
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            jsonl_unit_bytes: 64 << 20,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_from_extensions() {
        let auto = InputFormat::Auto;
        assert_eq!(detect_format(auto, "a.parquet").unwrap(), FileKind::Parquet);
        assert_eq!(detect_format(auto, "a.jsonl").unwrap(), FileKind::Jsonl);
        assert_eq!(
            detect_format(auto, "a.JSONL.GZ").unwrap(),
            FileKind::CompressedJsonl(Codec::Gzip)
        );
        assert_eq!(
            detect_format(auto, "a.json.zst").unwrap(),
            FileKind::CompressedJsonl(Codec::Zstd)
        );
        assert!(detect_format(auto, "a.csv").unwrap_err().contains("format ="));
        assert_eq!(detect_format(InputFormat::Jsonl, "a.txt").unwrap(), FileKind::Jsonl);
    }

    #[tokio::test]
    async fn ranges_cover_the_file_and_start_at_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.jsonl");
        let mut content = String::new();
        for i in 0..500 {
            content.push_str(&format!("{{\"text\": \"line {i} {}\"}}\n", "x".repeat(i % 37)));
        }
        std::fs::write(&path, &content).unwrap();
        let stores = Stores::default();
        let loc = stores.resolve(path.to_str().unwrap()).unwrap();
        let ranges = split_lines(&loc, content.len() as u64, 4096).await.unwrap();
        assert!(ranges.len() > 3);
        assert_eq!(ranges[0].start, 0);
        assert_eq!(ranges.last().unwrap().end, content.len() as u64);
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
            assert_eq!(content.as_bytes()[pair[1].start as usize - 1], b'\n');
        }
    }
}
