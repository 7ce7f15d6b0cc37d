//! Per-stage snapshots of completion records: reading a stage of 100,000 units costs one
//! listing and one file instead of 100,000 reads.
//!
//! ```text
//! <run_dir>/<stage>/_snapshot/records.jsonl.zst   one header line, then one entry per record
//! ```
//! The listing of `<stage>/_done/` stays the truth. An entry holds one record with the tag of
//! the record file it was taken from (its ETag and size as the store lists them: on local disk
//! inode, modification time and size; on object stores the content hash the server gave the
//! PUT). The tag comes from the write that made the file or from the response that read it,
//! never from a separate listing, so an entry's record is exactly the bytes its tag names.
//! [`crate::engine::run_dir::RunDir::stage`] uses an entry only when the listing shows the
//! unit's record file with the same tag; every other record is read itself. A stale, partial,
//! missing or corrupt snapshot therefore costs reads, never correctness, and several ranks may
//! each write one (the last whole write wins).
//!
//! `safepipe run` writes a stage's snapshot when it ends the stage with at least
//! `runner.snapshot_records` records that the old snapshot did not hold.

use crate::engine::records::{Committed, CompletionRecord, RECORD_VERSION};
use crate::error::{Error, Result};
use object_store::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{BufRead, Write};

/// Where a stage's snapshot lives, relative to the stage's folder.
pub const SNAPSHOT_DIR: &str = "_snapshot";
pub const SNAPSHOT_FILE: &str = "_snapshot/records.jsonl.zst";

/// Layout version of the snapshot file; another version is ignored (read as no snapshot).
const SNAPSHOT_VERSION: u32 = 1;

/// Which stored bytes a record was parsed from: the store's ETag and the size of its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTag {
    pub e_tag: String,
    pub size: u64,
}

impl FileTag {
    /// The tag a listing shows for an object (`None` when the store gives no ETag).
    pub fn of(meta: &ObjectMeta) -> Option<FileTag> {
        Some(FileTag {
            e_tag: meta.e_tag.clone()?,
            size: meta.size,
        })
    }

    /// The tag `object_store`'s local file system lists for a file with this metadata
    /// (inode, modification time in microseconds, size; the scheme of common HTTP servers).
    /// A rename keeps all three, so the tag taken from a written file before it is renamed into
    /// place is the one listed after. (Unix only, as the rest of the engine's local layer.)
    pub fn of_local(metadata: &std::fs::Metadata) -> FileTag {
        use std::os::unix::fs::MetadataExt;
        let mtime = metadata
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default()
            .as_micros();
        FileTag {
            e_tag: format!("{:x}-{:x}-{:x}", metadata.ino(), mtime, metadata.len()),
            size: metadata.len(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    snapshot_version: u32,
    stage: String,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    tag: FileTag,
    /// Digest of the record file's bytes (the record's identity downstream).
    digest: String,
    record: CompletionRecord,
}

/// A loaded snapshot: the records it holds, by unit.
#[derive(Default)]
pub struct Snapshot {
    entries: HashMap<u32, Entry>,
}

impl Snapshot {
    /// Parses a snapshot file of `stage`. `Err` says why it cannot be used; the caller then reads
    /// every record itself.
    pub fn parse(stage: &str, compressed: &[u8]) -> std::result::Result<Snapshot, String> {
        let reader = zstd::stream::read::Decoder::new(compressed).map_err(|e| format!("not zstd: {e}"))?;
        let mut lines = std::io::BufReader::new(reader).lines();
        let header: Header = match lines.next() {
            Some(line) => {
                serde_json::from_str(&line.map_err(|e| e.to_string())?).map_err(|e| format!("bad header: {e}"))?
            }
            None => return Err("the file is empty".into()),
        };
        if header.snapshot_version != SNAPSHOT_VERSION || header.stage != stage {
            return Err(format!(
                "it is version {} of stage {:?} (expected version {SNAPSHOT_VERSION} of {stage:?})",
                header.snapshot_version, header.stage
            ));
        }
        let mut entries = HashMap::new();
        for line in lines {
            let entry: Entry =
                serde_json::from_str(&line.map_err(|e| e.to_string())?).map_err(|e| format!("bad entry: {e}"))?;
            if entry.record.version == RECORD_VERSION && entry.record.stage == stage {
                entries.insert(entry.record.unit, entry);
            }
        }
        Ok(Snapshot { entries })
    }

    /// The record of `unit` if the snapshot holds the very file the listing shows (`listed`).
    pub fn take(&mut self, unit: u32, listed: &ObjectMeta) -> Option<Committed> {
        let tag = FileTag::of(listed)?;
        if self.entries.get(&unit)?.tag != tag {
            return None;
        }
        let entry = self.entries.remove(&unit)?;
        Some(Committed {
            record: entry.record,
            digest: entry.digest,
            tag: Some(entry.tag),
        })
    }
}

/// The snapshot file of `stage` holding every record of `records` that has a tag, by unit
/// order; also returns how many entries it holds.
pub fn encode<'a>(stage: &str, records: impl IntoIterator<Item = &'a Committed>) -> Result<(Vec<u8>, usize)> {
    let mut tagged: Vec<&Committed> = records.into_iter().filter(|c| c.tag.is_some()).collect();
    tagged.sort_by_key(|c| c.record.unit);
    let fail = |e: std::io::Error| Error::Internal(format!("encoding the record snapshot of {stage}: {e}"));
    let mut out = zstd::stream::write::Encoder::new(Vec::new(), 3).map_err(fail)?;
    let header = Header {
        snapshot_version: SNAPSHOT_VERSION,
        stage: stage.to_string(),
    };
    out.write_all(&json_line(&header)?).map_err(fail)?;
    for c in &tagged {
        let entry = EntryRef {
            tag: c.tag.as_ref().expect("filtered on tag"),
            digest: &c.digest,
            record: &c.record,
        };
        out.write_all(&json_line(&entry)?).map_err(fail)?;
    }
    Ok((out.finish().map_err(fail)?, tagged.len()))
}

/// [`Entry`] by reference, for writing.
#[derive(Serialize)]
struct EntryRef<'a> {
    tag: &'a FileTag,
    digest: &'a str,
    record: &'a CompletionRecord,
}

/// One JSON line.
fn json_line<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(value).map_err(|e| Error::Internal(e.to_string()))?;
    bytes.push(b'\n');
    Ok(bytes)
}
