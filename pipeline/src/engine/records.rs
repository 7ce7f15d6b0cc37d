//! Completion and failure records: the commit protocol's bookkeeping in the run directory.
//!
//! ```text
//! <run_dir>/<stage>/<table>/unit-000042-<fp>-<attempt>.parquet   committed outputs
//! <run_dir>/<stage>/_attempts/<attempt>/<table>/unit-000042.parquet  an attempt's outputs until published
//! <run_dir>/<stage>/_done/unit-000042.json    completion record, written last (synced, atomic)
//! <run_dir>/<stage>/_failed/unit-000042.json  last failure, removed on success
//! <run_dir>/<stage>/_leases/unit-000042/<generation>.json  who owns the unit right now
//! ```
//! A unit is committed for a stage exactly when a valid completion record exists and every file
//! it names is present; the record names its files relative to the run directory, so readers
//! (`safepipe sql`, the next stage, other tools) never see a half-written unit, and a copied or
//! moved run directory reads only its own files.

use crate::engine::snapshot::FileTag;
use crate::error::{Error, Result};
use safepipe_operators::UnitCounts;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub const DONE_DIR: &str = "_done";
pub const FAILED_DIR: &str = "_failed";
pub const LEASES_DIR: &str = "_leases";
pub const ATTEMPTS_DIR: &str = "_attempts";

/// Version of the record layout. Records of another version (e.g. the absolute file paths of
/// version 1) are reported as damaged and their units redone.
pub const RECORD_VERSION: u32 = 2;

/// One committed output file of a unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputFile {
    /// Path of the Parquet file relative to the run directory (`ingest/documents/unit-….parquet`).
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
}

/// What a committed result was made from: the one thing [`crate::engine::freshness`] compares.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stamp {
    /// The stage fingerprint the outputs were made under (settings + plan + upstream fingerprints
    /// + code version).
    pub fingerprint: String,
    /// Hash of the stage's own settings (tells "settings changed" from "upstream changed").
    pub settings_fingerprint: String,
    /// Content digest of each upstream completion record read (stage name -> digest). A redo
    /// upstream, even under the same fingerprint, gives a new digest, so this result is stale.
    #[serde(default)]
    pub upstream: BTreeMap<String, String>,
}

impl Stamp {
    /// What a result made now under `current`, from upstream records with these digests, carries.
    pub fn new(current: &crate::stages::Fingerprint, upstream: BTreeMap<String, String>) -> Stamp {
        Stamp {
            fingerprint: current.stage.clone(),
            settings_fingerprint: current.settings.clone(),
            upstream,
        }
    }
}

/// Written after all of a unit's outputs are published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionRecord {
    #[serde(default)]
    pub version: u32,
    pub stage: String,
    pub unit: u32,
    #[serde(flatten)]
    pub stamp: Stamp,
    /// The attempt that made the outputs (unique per try; part of every output's name).
    #[serde(default)]
    pub attempt: String,
    pub rank: u32,
    pub world_size: u32,
    pub counts: UnitCounts,
    /// Output table name -> file; tables with no rows have no file.
    pub outputs: BTreeMap<String, OutputFile>,
    pub started_at: String,
    pub finished_at: String,
    pub seconds: f64,
}

/// A completion record as read from the run directory, with the digest of its bytes (its
/// identity for downstream stages).
#[derive(Debug, Clone)]
pub struct Committed {
    pub record: CompletionRecord,
    pub digest: String,
    /// Which stored file the record was read from or written as (for the stage's snapshot,
    /// [`crate::engine::snapshot`]); `None` when the store gave no ETag.
    pub tag: Option<FileTag>,
}

impl Committed {
    /// Parses a stored record; `Err` says why it cannot count as committed.
    pub fn parse(bytes: &[u8]) -> std::result::Result<Committed, String> {
        if bytes.is_empty() {
            return Err("the record file is empty (a crash before it was flushed?)".into());
        }
        let record: CompletionRecord =
            serde_json::from_slice(bytes).map_err(|e| format!("the record is not valid JSON of a record: {e}"))?;
        if record.version != RECORD_VERSION {
            return Err(format!(
                "the record has layout version {} (this safepipe writes {RECORD_VERSION})",
                record.version
            ));
        }
        Ok(Committed {
            record,
            digest: digest(bytes),
            tag: None,
        })
    }
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

/// SHA-256 of some bytes, as the 32 hex digits used for record identities.
pub fn digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))[..32].to_string()
}

/// The record file name of a unit (`unit-000042.json`).
pub fn unit_file(unit: u32) -> String {
    format!("unit-{unit:06}.json")
}

/// The unit id of a record file name.
pub fn unit_of(name: &str) -> Option<u32> {
    name.strip_prefix("unit-")?.strip_suffix(".json")?.parse().ok()
}

pub fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(value).map_err(|e| Error::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> CompletionRecord {
        CompletionRecord {
            version: RECORD_VERSION,
            stage: "ingest".into(),
            unit: 3,
            stamp: Stamp {
                fingerprint: "f".into(),
                settings_fingerprint: "s".into(),
                upstream: BTreeMap::from([("x".to_string(), "d".to_string())]),
            },
            attempt: "a".into(),
            rank: 0,
            world_size: 1,
            counts: UnitCounts::default(),
            outputs: BTreeMap::new(),
            started_at: "t0".into(),
            finished_at: "t1".into(),
            seconds: 0.5,
        }
    }

    #[test]
    fn a_record_round_trips_with_its_digest() {
        let bytes = to_json(&record()).unwrap();
        let parsed = Committed::parse(&bytes).unwrap();
        assert_eq!(parsed.record, record());
        assert_eq!(parsed.digest, digest(&bytes));
        let mut other = record();
        other.finished_at = "t2".into();
        assert_ne!(
            Committed::parse(&to_json(&other).unwrap()).unwrap().digest,
            parsed.digest
        );
    }

    #[test]
    fn empty_corrupt_and_old_records_are_refused_with_a_reason() {
        assert!(Committed::parse(b"").unwrap_err().contains("empty"));
        assert!(Committed::parse(b"{\"stage\": ").unwrap_err().contains("not valid"));
        let mut old = record();
        old.version = 1;
        assert!(
            Committed::parse(&to_json(&old).unwrap())
                .unwrap_err()
                .contains("version 1")
        );
        assert_eq!(unit_of("unit-000042.json"), Some(42));
        assert_eq!(unit_of("unit-x.json"), None);
    }
}
