//! Collects ingest output rows into Arrow builders and keeps the unit's counts in step with them:
//! every `accept` or `quarantine` call counts one input record (or `records` of them).

use super::{BATCH_TEXT_BYTES, IngestBatch, IngestInput, IngestOptions};
use crate::holdout::{Holdout, Part};
use crate::{UnitCounts, schema};
use arrow::array::{
    ArrayBuilder, ArrayRef, Float64Builder, Int64Builder, RecordBatch, StringBuilder, StructArray, UInt32Builder,
    UInt64Builder,
};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Why a record went to quarantine. The string form is what the `reason` column holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    InvalidJson,
    InvalidUtf8,
    NotAnObject,
    MissingText,
    TextNotString,
    EmptyText,
    TextTooLong,
    RecordTooLong,
    InvalidId,
    SchemaMismatch,
    UnreadableFile,
    CorruptStream,
    UnreadableRowGroup,
    TooLarge,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidJson => "invalid_json",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::NotAnObject => "not_an_object",
            Reason::MissingText => "missing_text",
            Reason::TextNotString => "text_not_string",
            Reason::EmptyText => "empty_text",
            Reason::TextTooLong => "text_too_long",
            Reason::RecordTooLong => "record_too_long",
            Reason::InvalidId => "invalid_id",
            Reason::SchemaMismatch => "schema_mismatch",
            Reason::UnreadableFile => "unreadable_file",
            Reason::CorruptStream => "corrupt_stream",
            Reason::UnreadableRowGroup => "unreadable_row_group",
            Reason::TooLarge => "too_large",
        }
    }
}

/// A stable id for a record that has none: `sha256:` and the first 32 hex digits of the text's
/// SHA-256. Identical texts get identical ids.
pub fn derived_id(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..32])
}

/// Checks a text against the rules every input format shares.
pub fn check_text(text: &str, max_bytes: usize) -> Result<(), (Reason, String)> {
    if text.trim().is_empty() {
        return Err((
            Reason::EmptyText,
            format!("text is empty or whitespace ({} bytes)", text.len()),
        ));
    }
    if text.len() > max_bytes {
        return Err((
            Reason::TextTooLong,
            format!("text is {} bytes, over ingest.max_text_bytes = {max_bytes}", text.len()),
        ));
    }
    Ok(())
}

/// The metadata of one document, in `schema::METADATA_FIELDS` order.
#[derive(Default)]
pub struct Metadata {
    /// dump, url, date, file_path, language.
    pub strings: [Option<String>; 5],
    pub language_score: Option<f64>,
    pub token_count: Option<i64>,
    /// Other input fields as a JSON object.
    pub extra: Option<String>,
    /// The bytes of `extra` when the reader already found it over the bound and never built it.
    pub dropped_extra: usize,
}

const RAW_PREFIX_BYTES: usize = 1024;

/// The first bytes of a record, decoded lossily, cut at a character boundary.
pub fn raw_prefix(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(RAW_PREFIX_BYTES)];
    String::from_utf8_lossy(cut).into_owned()
}

pub struct Sink {
    source: String,
    holdout: Option<(Holdout, Part)>,
    file: String,
    unit: u32,
    batch_rows: usize,
    max_metadata_bytes: usize,
    text_bytes: usize,
    // documents
    id: StringBuilder,
    text: StringBuilder,
    src: StringBuilder,
    meta_strings: [StringBuilder; 5],
    language_score: Float64Builder,
    token_count: Int64Builder,
    extra: StringBuilder,
    // quarantine
    q_source: StringBuilder,
    q_file: StringBuilder,
    q_unit: UInt32Builder,
    q_offset: UInt64Builder,
    q_records: UInt64Builder,
    q_reason: StringBuilder,
    q_detail: StringBuilder,
    q_id: StringBuilder,
    q_raw: StringBuilder,
    counts: UnitCounts,
}

impl Sink {
    pub fn new(input: &IngestInput, opts: &IngestOptions) -> Self {
        Sink {
            source: opts.source.clone(),
            holdout: opts.holdout,
            file: input.file.clone(),
            unit: input.unit,
            batch_rows: opts.batch_rows.max(1),
            max_metadata_bytes: opts.max_metadata_bytes,
            text_bytes: 0,
            id: StringBuilder::new(),
            text: StringBuilder::new(),
            src: StringBuilder::new(),
            meta_strings: Default::default(),
            language_score: Float64Builder::new(),
            token_count: Int64Builder::new(),
            extra: StringBuilder::new(),
            q_source: StringBuilder::new(),
            q_file: StringBuilder::new(),
            q_unit: UInt32Builder::new(),
            q_offset: UInt64Builder::new(),
            q_records: UInt64Builder::new(),
            q_reason: StringBuilder::new(),
            q_detail: StringBuilder::new(),
            q_id: StringBuilder::new(),
            q_raw: StringBuilder::new(),
            counts: UnitCounts::default(),
        }
    }

    /// One usable record (counted as dropped when it belongs to the other part of a split input:
    /// `held_out` for ingest, `training_part` for the evaluation reader).
    pub fn accept(&mut self, id: Option<String>, text: &str, mut meta: Metadata) {
        let id = id.unwrap_or_else(|| derived_id(text));
        if let Some((holdout, part)) = &self.holdout
            && holdout.held_out(text) != (*part == Part::Evaluation)
        {
            self.counts.rows_in += 1;
            let rule = match part {
                Part::Training => "held_out",
                Part::Evaluation => "training_part",
            };
            self.counts.drop(rule, 1);
            return;
        }
        self.bound_metadata(&mut meta);
        // Every string column counts against the batch's byte bound, not only the text: an
        // Arrow string column holds at most 2 GiB, and huge metadata fields must not pass it.
        let meta_bytes: usize =
            meta.strings.iter().flatten().map(String::len).sum::<usize>() + meta.extra.as_ref().map_or(0, String::len);
        self.text_bytes += id.len() + meta_bytes;
        self.id.append_value(id);
        self.text.append_value(text);
        self.src.append_value(&self.source);
        for (builder, value) in self.meta_strings.iter_mut().zip(meta.strings) {
            builder.append_option(value);
        }
        self.language_score.append_option(meta.language_score);
        self.token_count.append_option(meta.token_count);
        self.extra.append_option(meta.extra);
        self.text_bytes += text.len();
        self.counts.rows_in += 1;
        self.counts.rows_out += 1;
    }

    /// Drops each metadata field (and `extra` as a whole) longer than `max_metadata_bytes`, and
    /// says so in `extra` under `dropped_metadata` (field name -> its bytes), so a record's
    /// metadata costs a bounded amount whatever the input holds and nothing goes silently.
    fn bound_metadata(&mut self, meta: &mut Metadata) {
        let max = self.max_metadata_bytes;
        let mut dropped = serde_json::Map::new();
        for (slot, (name, _)) in meta.strings.iter_mut().zip(schema::METADATA_FIELDS.iter()) {
            if slot.as_ref().is_some_and(|v| v.len() > max) {
                dropped.insert(name.to_string(), slot.take().map_or(0, |v| v.len()).into());
            }
        }
        if meta.extra.as_ref().is_some_and(|v| v.len() > max) {
            meta.dropped_extra = meta.extra.take().map_or(0, |v| v.len());
        }
        if meta.dropped_extra > 0 {
            dropped.insert("extra".into(), meta.dropped_extra.into());
        }
        if dropped.is_empty() {
            return;
        }
        *self.counts.figures.entry("metadata_dropped".into()).or_default() += 1;
        let mut extra = match meta.extra.as_deref().map(serde_json::from_str::<serde_json::Value>) {
            Some(Ok(serde_json::Value::Object(fields))) => fields,
            _ => serde_json::Map::new(),
        };
        extra.insert("dropped_metadata".into(), serde_json::Value::Object(dropped));
        meta.extra = Some(serde_json::Value::Object(extra).to_string());
    }

    /// One unusable record at `offset`.
    pub fn quarantine(&mut self, offset: u64, reason: Reason, detail: &str, id: Option<&str>, raw: Option<&[u8]>) {
        self.push_quarantine(Some(offset), 1, reason, detail, id, raw);
    }

    /// A whole unit (file or row group) that could not be read; `records` input records lost.
    pub fn quarantine_unit(&mut self, reason: Reason, detail: &str, records: u64) {
        self.push_quarantine(None, records, reason, detail, None, None);
    }

    /// Records `[offset, offset + records)` lost after a read error part-way through.
    pub fn quarantine_rest(&mut self, offset: u64, records: u64, reason: Reason, detail: &str) {
        self.push_quarantine(Some(offset), records, reason, detail, None, None);
    }

    fn push_quarantine(
        &mut self,
        offset: Option<u64>,
        records: u64,
        reason: Reason,
        detail: &str,
        id: Option<&str>,
        raw: Option<&[u8]>,
    ) {
        self.q_source.append_value(&self.source);
        self.q_file.append_value(&self.file);
        self.q_unit.append_value(self.unit);
        self.q_offset.append_option(offset);
        self.q_records.append_value(records);
        self.q_reason.append_value(reason.as_str());
        self.q_detail.append_value(detail);
        self.q_id.append_option(id);
        self.q_raw.append_option(raw.map(raw_prefix));
        self.text_bytes += detail.len() + raw.map_or(0, |r| r.len().min(RAW_PREFIX_BYTES));
        self.counts.rows_in += records;
        self.counts.quarantined += records;
    }

    /// Rows buffered (documents and quarantine).
    pub fn buffered(&self) -> usize {
        self.id.len() + self.q_reason.len()
    }

    pub fn is_full(&self) -> bool {
        self.buffered() >= self.batch_rows || self.text_bytes >= BATCH_TEXT_BYTES
    }

    /// Takes what was collected since the last flush.
    pub fn flush(&mut self) -> IngestBatch {
        self.text_bytes = 0;
        let meta_fields = schema::metadata_fields();
        let mut meta_columns: Vec<ArrayRef> = self
            .meta_strings
            .iter_mut()
            .map(|b| Arc::new(b.finish()) as ArrayRef)
            .collect();
        meta_columns.push(Arc::new(self.language_score.finish()));
        meta_columns.push(Arc::new(self.token_count.finish()));
        meta_columns.push(Arc::new(self.extra.finish()));
        let metadata = StructArray::new(meta_fields, meta_columns, None);
        let documents = RecordBatch::try_new(
            schema::DOCUMENTS.clone(),
            vec![
                Arc::new(self.id.finish()),
                Arc::new(self.text.finish()),
                Arc::new(self.src.finish()),
                Arc::new(metadata),
            ],
        )
        .expect("documents builders follow schema::DOCUMENTS");
        let quarantine = RecordBatch::try_new(
            schema::QUARANTINE.clone(),
            vec![
                Arc::new(self.q_source.finish()),
                Arc::new(self.q_file.finish()),
                Arc::new(self.q_unit.finish()),
                Arc::new(self.q_offset.finish()),
                Arc::new(self.q_records.finish()),
                Arc::new(self.q_reason.finish()),
                Arc::new(self.q_detail.finish()),
                Arc::new(self.q_id.finish()),
                Arc::new(self.q_raw.finish()),
            ],
        )
        .expect("quarantine builders follow schema::QUARANTINE");
        IngestBatch {
            documents,
            quarantine,
            counts: std::mem::take(&mut self.counts),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        assert_eq!(derived_id("hello"), derived_id("hello"));
        assert_ne!(derived_id("hello"), derived_id("hello "));
        assert_eq!(derived_id("hello").len(), "sha256:".len() + 32);
    }

    #[test]
    fn text_rules() {
        assert_eq!(check_text(" \n\t", 10).unwrap_err().0, Reason::EmptyText);
        assert_eq!(check_text("abcdefghijk", 10).unwrap_err().0, Reason::TextTooLong);
        assert!(check_text("abc", 10).is_ok());
    }

    #[test]
    fn raw_prefix_cuts_lossily() {
        let long = "é".repeat(1000); // 2000 bytes
        let p = raw_prefix(long.as_bytes());
        assert!(p.len() <= RAW_PREFIX_BYTES + 3);
        assert!(p.starts_with("éé"));
    }
}
