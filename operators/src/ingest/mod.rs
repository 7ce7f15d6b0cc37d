//! **ingest**: raw Parquet / JSON Lines slices -> `documents` + `quarantine`.
//!
//! One call reads one work unit (a [`Slice`] of one file) from an object store and streams
//! [`IngestBatch`]es. Guarantees:
//! - every input record ends as exactly one `documents` row or one `quarantine` row with a reason
//!   ([`Reason`]); blank JSONL lines are not records and are skipped;
//! - output order is input order, so the output is a pure function of (slice, options);
//! - a missing id is derived from the text (`sha256:` + 32 hex digits of SHA-256), so it is stable
//!   across reruns and machines;
//! - memory is bounded by `batch_rows` / [`BATCH_TEXT_BYTES`] per batch and by the longest record
//!   we agree to read ([`IngestOptions::max_record_bytes`]); longer records are skipped unread
//!   past that point and quarantined.
//!
//! A file that cannot be read as data at all (corrupt compression, truncated or wrong-schema
//! Parquet) is data's fault: it becomes quarantine rows and the unit still completes. Storage
//! failures (network, permissions) are returned as [`OpError`](crate::OpError): a rerun retries.
//!
//! Cost: CPU-bound JSON parsing (~100-200 MB/s per core) or Parquet decoding; no network beyond
//! reading the slice once.

mod jsonl;
mod parquet;
mod sink;

use crate::{OpResult, UnitCounts};
use arrow::record_batch::RecordBatch;
use futures::stream::BoxStream;
use object_store::{ObjectStore, path::Path};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use sink::{Reason, derived_id};

/// Flush a batch once its text reaches this many bytes (keeps `Utf8` offsets small and memory
/// bounded whatever `batch_rows` is).
pub const BATCH_TEXT_BYTES: usize = 64 << 20;

/// Which part of a file one work unit covers. Persisted in the work plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Slice {
    /// One Parquet row group; `first_row` is its first row's index in the file.
    ParquetRowGroup { row_group: usize, first_row: u64, rows: u64 },
    /// Bytes `[start, end)` of an uncompressed JSON Lines file, both at line starts.
    JsonlRange { start: u64, end: u64 },
    /// A whole compressed JSON Lines file.
    JsonlCompressed { codec: Codec },
    /// A file the planner could not open as its format; ingest quarantines it as one record.
    Unreadable { error: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Codec {
    Gzip,
    Zstd,
}

/// How to read records of one input into `documents`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IngestOptions {
    /// Written to `documents.source` (the input's name in the config).
    pub source: String,
    pub text_column: String,
    pub id_column: String,
    /// Input column name for each of [`schema::METADATA_FIELDS`](crate::schema::METADATA_FIELDS)
    /// except `extra`, in the same order.
    pub metadata_columns: Vec<String>,
    /// Texts longer than this (in bytes) are quarantined as `text_too_long`.
    pub max_text_bytes: usize,
    /// Rows per output batch.
    pub batch_rows: usize,
}

impl IngestOptions {
    /// The longest JSONL line read into memory: enough for a maximal text with JSON escaping and
    /// metadata. Longer lines are quarantined as `record_too_long` after reading only this much.
    pub fn max_record_bytes(&self) -> usize {
        self.max_text_bytes.saturating_mul(2).saturating_add(1 << 20)
    }
}

/// One work unit's input: a slice of a file in an object store.
#[derive(Clone)]
pub struct IngestInput {
    pub store: Arc<dyn ObjectStore>,
    pub path: Path,
    /// The file's URL as the user wrote it, for quarantine rows.
    pub file: String,
    pub size: u64,
    pub unit: u32,
    pub slice: Slice,
}

/// One batch of output: `documents` and `quarantine` rows plus the counts they represent.
pub struct IngestBatch {
    pub documents: RecordBatch,
    pub quarantine: RecordBatch,
    pub counts: UnitCounts,
}

/// Reads one unit. Lazy: nothing is fetched before the first poll.
pub fn ingest(input: IngestInput, opts: Arc<IngestOptions>) -> BoxStream<'static, OpResult<IngestBatch>> {
    match input.slice.clone() {
        Slice::ParquetRowGroup { row_group, first_row, rows } => {
            parquet::read_row_group(input, opts, row_group, first_row, rows)
        }
        Slice::JsonlRange { start, end } => jsonl::read(input, opts, jsonl::Framing::Range { start, end }),
        Slice::JsonlCompressed { codec } => jsonl::read(input, opts, jsonl::Framing::Compressed(codec)),
        Slice::Unreadable { error } => {
            let mut sink = sink::Sink::new(&input, &opts);
            sink.quarantine_unit(Reason::UnreadableFile, &error, 1);
            Box::pin(futures::stream::iter([Ok(sink.flush())]))
        }
    }
}
