//! Completion and failure records: the commit protocol's bookkeeping in the run directory.
//!
//! ```text
//! <run_dir>/<stage>/<table>/unit-000042-<fp>.parquet   outputs, each one atomic PUT / rename
//! <run_dir>/<stage>/_done/unit-000042.json             completion record, written last
//! <run_dir>/<stage>/_failed/unit-000042.json           last failure, removed on success
//! ```
//! A unit is committed for a stage exactly when its completion record exists; the record names
//! the output files, so readers (`safepipe sql`, the next stage) never see a half-written unit or
//! the leftovers of a killed run.

use crate::error::{Error, Result};
use crate::storage::Location;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStoreExt;
use safepipe_operators::UnitCounts;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

pub const DONE_DIR: &str = "_done";
pub const FAILED_DIR: &str = "_failed";

/// One committed output file of a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Local path or URL of the Parquet file.
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Written after all of a unit's outputs are committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRecord {
    pub stage: String,
    pub unit: u32,
    /// The stage fingerprint the outputs were made under.
    pub fingerprint: String,
    /// Hash of the stage's own settings (tells "settings changed" from "upstream changed").
    pub settings_fingerprint: String,
    pub rank: u32,
    pub world_size: u32,
    pub counts: UnitCounts,
    /// Output table name -> file; tables with no rows have no file.
    pub outputs: BTreeMap<String, OutputFile>,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
}

/// The last failure of a unit that is not (re)committed yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureRecord {
    pub stage: String,
    pub unit: u32,
    pub fingerprint: String,
    pub rank: u32,
    pub error: String,
    pub at: String,
}

pub fn unit_file(unit: u32) -> String {
    format!("unit-{unit:06}.json")
}

pub fn done_location(run_dir: &Location, stage: &str, unit: u32) -> Location {
    run_dir.child(&format!("{stage}/{DONE_DIR}/{}", unit_file(unit)))
}

pub fn failed_location(run_dir: &Location, stage: &str, unit: u32) -> Location {
    run_dir.child(&format!("{stage}/{FAILED_DIR}/{}", unit_file(unit)))
}

/// Reads every JSON record under `<run_dir>/<stage>/<dir>/`, keyed by unit id.
async fn load_all<T: for<'de> Deserialize<'de>>(run_dir: &Location, stage: &str, dir: &str) -> Result<HashMap<u32, T>> {
    let prefix = run_dir.child(&format!("{stage}/{dir}"));
    let listed: Vec<_> = prefix.store.list(Some(&prefix.path)).try_collect().await?;
    let reads = listed
        .into_iter()
        .filter(|m| m.location.as_ref().ends_with(".json"))
        .map(|meta| {
            let store = prefix.store.clone();
            async move {
                let bytes = store.get(&meta.location).await?.bytes().await?;
                let record: T = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Internal(format!("{} is not a valid record: {e}", meta.location)))?;
                let unit = meta
                    .location
                    .filename()
                    .and_then(|n| n.strip_prefix("unit-"))
                    .and_then(|n| n.strip_suffix(".json"))
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| Error::Internal(format!("unexpected record name {}", meta.location)))?;
                Ok::<_, Error>((unit, record))
            }
        });
    let records: Vec<(u32, T)> = futures::stream::iter(reads).buffer_unordered(32).try_collect().await?;
    Ok(records.into_iter().collect())
}

pub async fn load_done(run_dir: &Location, stage: &str) -> Result<HashMap<u32, CompletionRecord>> {
    load_all(run_dir, stage, DONE_DIR).await
}

pub async fn load_failed(run_dir: &Location, stage: &str) -> Result<HashMap<u32, FailureRecord>> {
    load_all(run_dir, stage, FAILED_DIR).await
}

pub async fn write_json<T: Serialize>(location: &Location, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(e.to_string()))?;
    location.write(bytes).await
}

/// Deletes an object, treating "already gone" as success.
pub async fn delete_if_exists(location: &Location) -> Result<()> {
    match location.store.delete(&location.path).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
