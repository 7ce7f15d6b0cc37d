//! `safepipe gc`: deletes files in the run directory that no completion record names — outputs
//! of killed or superseded attempts, staging leftovers. Committed outputs, records and the plan
//! are never touched.
//!
//! A unit being written right now is also unnamed until it commits, so only files older than a
//! minimum age are deleted (default one hour); run gc when no rank is running, or keep the age
//! above the longest unit time.

use crate::config::Config;
use crate::error::Result;
use crate::records::{self, DONE_DIR, FAILED_DIR};
use crate::stages;
use crate::storage::{Location, Stores};
use futures::TryStreamExt;
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
    let stores = Stores::default();
    let run_dir = stores.resolve(&config.run_dir)?;
    let now = chrono::Utc::now();
    let mut report = GcReport::default();
    for stage in stages::pipeline(&Arc::new(config.clone())) {
        let done = records::load_done(&run_dir, stage.name()).await?;
        let named: HashSet<String> = done
            .values()
            .flat_map(|r| r.outputs.values())
            .map(|f| stores.resolve(&f.file).map(|l| l.url()))
            .collect::<Result<_>>()?;
        sweep(&run_dir.child(stage.name()), &named, now, min_age, dry_run, &mut report).await?;
    }
    // The pack stage's shards: the committed manifest names the live ones.
    let manifest = crate::pack::load_manifest(&run_dir).await?;
    let named: HashSet<String> = manifest
        .iter()
        .flat_map(|m| m.shards.iter())
        .map(|f| stores.resolve(&f.file).map(|l| l.url()))
        .collect::<Result<_>>()?;
    sweep(
        &run_dir.child("pack/shards"),
        &named,
        now,
        min_age,
        dry_run,
        &mut report,
    )
    .await?;
    Ok(report)
}

/// Deletes (or lists) the files under `prefix` that `named` does not hold, records excepted.
async fn sweep(
    prefix: &Location,
    named: &HashSet<String>,
    now: chrono::DateTime<chrono::Utc>,
    min_age: Duration,
    dry_run: bool,
    report: &mut GcReport,
) -> Result<()> {
    let listed: Vec<_> = prefix.store.list(Some(&prefix.path)).try_collect().await?;
    for meta in listed {
        let relative = meta
            .location
            .as_ref()
            .strip_prefix(prefix.path.as_ref())
            .unwrap_or_default();
        if relative.starts_with(&format!("/{DONE_DIR}/")) || relative.starts_with(&format!("/{FAILED_DIR}/")) {
            continue;
        }
        let location = prefix.with_path(meta.location.clone());
        if named.contains(&location.url()) {
            report.kept += 1;
            continue;
        }
        let age = (now - meta.last_modified).to_std().unwrap_or_default();
        if age < min_age {
            report.too_young += 1;
            continue;
        }
        if !dry_run {
            records::delete_if_exists(&location).await?;
        }
        report.orphan_bytes += meta.size;
        report.orphans.push(location.display());
    }
    Ok(())
}
