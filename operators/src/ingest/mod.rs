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
mod text_column;

use crate::holdout::{Holdout, Part};
use crate::{OpResult, UnitCounts};
use arrow::record_batch::RecordBatch;
use futures::stream::BoxStream;
use object_store::{ObjectStore, path::Path};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use sink::{Reason, derived_id};

/// Flush a batch once its strings (text, id, metadata, quarantine details) reach this many bytes
/// (keeps `Utf8` offsets far below Arrow's 2 GiB limit and memory bounded whatever `batch_rows`
/// is).
pub const BATCH_TEXT_BYTES: usize = 64 << 20;

/// Which part of a file one work unit covers. Persisted in the work plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Slice {
    /// One Parquet row group; `first_row` is its first row's index in the file.
    ParquetRowGroup {
        row_group: usize,
        first_row: u64,
        rows: u64,
    },
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
    /// A metadata field (or `extra` as a whole) longer than this is dropped from its record and
    /// named in `extra.dropped_metadata`.
    pub max_metadata_bytes: usize,
    /// What happens to input fields that map to no `documents` column.
    pub extra_columns: ExtraColumns,
    /// Parquet: the decoded bytes one batch may hold. Rows per batch follow from the row group's
    /// sizes in the footer; a page that inflates past this quarantines its row group
    /// (`too_large`) before it is decoded.
    pub max_batch_bytes: usize,
    /// The input's evaluation split, and which part to keep (ingest: the training part).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<(Holdout, Part)>,
}

/// Input fields that map to no `documents` column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtraColumns {
    /// Kept as a JSON object in `metadata.extra`.
    #[default]
    Keep,
    /// Not read at all (Parquet reads only the mapped columns).
    Skip,
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
        Slice::ParquetRowGroup {
            row_group,
            first_row,
            rows,
        } => parquet::read_row_group(input, opts, row_group, first_row, rows),
        Slice::JsonlRange { start, end } => jsonl::read(input, opts, jsonl::Framing::Range { start, end }),
        Slice::JsonlCompressed { codec } => jsonl::read(input, opts, jsonl::Framing::Compressed(codec)),
        Slice::Unreadable { error } => {
            let mut sink = sink::Sink::new(&input, &opts);
            sink.quarantine_unit(Reason::UnreadableFile, &error, 1);
            Box::pin(futures::stream::iter([Ok(sink.flush())]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;
    use futures::TryStreamExt;
    use object_store::local::LocalFileSystem;

    fn options(batch_rows: usize) -> Arc<IngestOptions> {
        Arc::new(IngestOptions {
            source: "t".into(),
            text_column: "text".into(),
            id_column: "id".into(),
            metadata_columns: [
                "dump",
                "url",
                "date",
                "file_path",
                "language",
                "language_score",
                "token_count",
            ]
            .map(String::from)
            .to_vec(),
            max_text_bytes: 64,
            batch_rows,
            max_metadata_bytes: 1 << 10,
            extra_columns: ExtraColumns::Keep,
            max_batch_bytes: 1 << 20,
            holdout: None,
        })
    }

    async fn read_all(content: &[u8], slice: Slice, batch_rows: usize) -> (Vec<String>, Vec<String>, UnitCounts) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.jsonl");
        std::fs::write(&file, content).unwrap();
        let input = IngestInput {
            store: Arc::new(LocalFileSystem::new()),
            path: Path::from_absolute_path(&file).unwrap(),
            file: file.display().to_string(),
            size: content.len() as u64,
            unit: 0,
            slice,
        };
        let batches: Vec<IngestBatch> = ingest(input, options(batch_rows)).try_collect().await.unwrap();
        let (mut ids, mut reasons, mut counts) = (vec![], vec![], UnitCounts::default());
        for b in batches {
            ids.extend(
                b.documents
                    .column(0)
                    .as_string::<i32>()
                    .iter()
                    .map(|s| s.unwrap().to_string()),
            );
            reasons.extend(
                b.quarantine
                    .column(5)
                    .as_string::<i32>()
                    .iter()
                    .map(|s| s.unwrap().to_string()),
            );
            counts.merge(&b.counts);
        }
        (ids, reasons, counts)
    }

    const LINES: &[u8] = b"{\"id\":\"a\",\"text\":\"one\",\"lang\":\"x\"}\n\
        not json\n\
        \n\
        {\"text\":\"derived\"}\r\n\
        {\"id\":\"e\",\"text\":\"\"}\n\
        {\"id\":\"l\",\"text\":\"0123456789012345678901234567890123456789012345678901234567890123456789\"}\n\
        {\"id\":\"z\",\"text\":\"last\"}";

    #[tokio::test]
    async fn every_line_is_a_document_or_a_reason_whatever_the_batch_size() {
        let whole = Slice::JsonlRange {
            start: 0,
            end: LINES.len() as u64,
        };
        let (ids, reasons, counts) = read_all(LINES, whole.clone(), 4096).await;
        assert_eq!(ids, ["a", &derived_id("derived"), "z"]);
        assert_eq!(reasons, ["invalid_json", "empty_text", "text_too_long"]);
        assert_eq!((counts.rows_in, counts.rows_out, counts.quarantined), (6, 3, 3));
        counts.check().unwrap();
        assert_eq!(read_all(LINES, whole, 1).await, (ids, reasons, counts));
    }

    #[tokio::test]
    async fn byte_ranges_at_line_starts_partition_the_records() {
        let cut = LINES.iter().position(|&b| b == b'\n').unwrap() as u64 + 1;
        let (first, _, c1) = read_all(LINES, Slice::JsonlRange { start: 0, end: cut }, 8).await;
        let (rest, _, c2) = read_all(
            LINES,
            Slice::JsonlRange {
                start: cut,
                end: LINES.len() as u64,
            },
            8,
        )
        .await;
        assert_eq!(first, ["a"]);
        assert_eq!(rest.len(), 2);
        assert_eq!(c1.rows_in + c2.rows_in, 6);
    }

    #[tokio::test]
    async fn gzip_and_zstd_read_the_same_records() {
        let plain = read_all(
            LINES,
            Slice::JsonlRange {
                start: 0,
                end: LINES.len() as u64,
            },
            2,
        )
        .await;
        for codec in [Codec::Gzip, Codec::Zstd] {
            let packed = compress(codec, LINES).await;
            assert_eq!(
                read_all(&packed, Slice::JsonlCompressed { codec }, 2).await,
                plain,
                "{codec:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_corrupt_stream_keeps_what_decoded_and_quarantines_the_rest() {
        let mut many = Vec::new();
        for i in 0..2000 {
            many.extend_from_slice(format!("{{\"id\":\"{i}\",\"text\":\"record number {i}\"}}\n").as_bytes());
        }
        let mut packed = compress(Codec::Gzip, &many).await;
        packed.truncate(packed.len() / 2);
        let (ids, reasons, counts) = read_all(&packed, Slice::JsonlCompressed { codec: Codec::Gzip }, 100).await;
        assert!(!ids.is_empty() && ids.len() < 2000, "{}", ids.len());
        assert_eq!(reasons, ["corrupt_stream"]);
        counts.check().unwrap();
    }

    async fn compress(codec: Codec, data: &[u8]) -> Vec<u8> {
        use async_compression::tokio::write::{GzipEncoder, ZstdEncoder};
        use tokio::io::AsyncWriteExt;
        match codec {
            Codec::Gzip => {
                let mut e = GzipEncoder::new(Vec::new());
                e.write_all(data).await.unwrap();
                e.shutdown().await.unwrap();
                e.into_inner()
            }
            Codec::Zstd => {
                let mut e = ZstdEncoder::new(Vec::new());
                e.write_all(data).await.unwrap();
                e.shutdown().await.unwrap();
                e.into_inner()
            }
        }
    }
}
