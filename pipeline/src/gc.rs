//! `safepipe gc`: deletes files in the run directory that no completion record or manifest
//! names — outputs of killed or superseded attempts (`<stage>/_attempts/`), files published by
//! an attempt killed before its record, staging leftovers. Committed outputs, records, record
//! snapshots, leases and the plan are never touched.
//!
//! A unit being written right now is also unnamed until it commits, so only files older than a
//! minimum age are deleted (default one hour); run gc when no rank is running, or keep the age
//! above the longest unit time.

use crate::config::Config;
use crate::engine::records::{DONE_DIR, FAILED_DIR, LEASES_DIR};
use crate::engine::run_dir::RunDir;
use crate::engine::snapshot::SNAPSHOT_DIR;
use crate::error::Result;
use crate::stages::{Scope, StageGraph};
use object_store::ObjectMeta;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

/// What gc found (and deleted unless it was a dry run).
#[derive(Debug, Default)]
pub struct GcReport {
    pub kept: usize,
    /// Unreferenced files old enough to delete, as URLs or paths.
    pub orphans: Vec<String>,
    pub orphan_bytes: u64,
    /// Unreferenced files younger than the minimum age, left alone.
    pub too_young: usize,
}

pub async fn collect(config: &Config, min_age: Duration, dry_run: bool) -> Result<GcReport> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let now = chrono::Utc::now();
    let mut report = GcReport::default();
    let mut named: HashSet<String> = HashSet::new();
    // One listing per stage folder (for a per-unit stage, the one that loads its records).
    let mut listed: Vec<(String, ObjectMeta)> = Vec::new();
    for node in StageGraph::new(&Arc::new(config.clone()))?.nodes {
        match node.scope {
            Scope::Unit(_) => {
                let files = run_dir.stage(node.name()).await?;
                named.extend(
                    files
                        .done
                        .values()
                        .flat_map(|c| c.record.outputs.values().map(|f| f.file.clone())),
                );
                listed.extend(files.files);
            }
            Scope::Global => {
                // The committed manifest names the live shards, and the part records of a
                // multi-rank pack still being assembled name theirs.
                if let Some(m) = crate::pack::load_manifest(&run_dir).await?.manifest() {
                    named.extend(m.shards.iter().map(|f| f.file.clone()));
                }
                named.extend(crate::pack::part_shards(&run_dir).await?);
                for meta in run_dir.list(node.name()).await? {
                    if let Some(relative) = run_dir.relative(&run_dir.root().with_path(meta.location.clone())) {
                        listed.push((relative, meta));
                    }
                }
            }
        }
    }
    let bookkeeping = [DONE_DIR, FAILED_DIR, LEASES_DIR, SNAPSHOT_DIR];
    for (relative, meta) in listed {
        let second = relative.split('/').nth(1).unwrap_or_default();
        if bookkeeping.contains(&second)
            || relative == crate::pack::MANIFEST
            || relative.starts_with(crate::pack::PARTS_DIR)
        {
            continue;
        }
        if named.contains(&relative) {
            report.kept += 1;
            continue;
        }
        let age = (now - meta.last_modified).to_std().unwrap_or_default();
        if age < min_age {
            report.too_young += 1;
            continue;
        }
        let location = run_dir.root().with_path(meta.location);
        if !dry_run {
            run_dir.delete(&location).await?;
        }
        report.orphan_bytes += meta.size;
        report.orphans.push(location.display());
    }
    Ok(report)
}
