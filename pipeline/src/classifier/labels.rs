//! The labelled table `safepipe classifier train` reads, and which part of training each
//! example serves.
//!
//! Columns: a text, an integer score (the label index, 0 = safe), an optional split (`train` or
//! `test`) and an optional group (what kind of text it is, e.g. `mail` or `request`, so
//! false-positive rates can be read and bounded per kind). Without a split column,
//! `test_fraction` of the texts, chosen by the SHA-256 of the text, are held out. Training rows
//! are dealt into `folds` folds by other bits of the same hash (the threshold is chosen on
//! out-of-fold predictions), so a text and its copies always land in one part and one fold.

use crate::error::{Error, Result};
use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// What an example is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Part {
    /// Fitting, and (out of fold) choosing the threshold.
    Train,
    /// Held out: the reported metrics.
    Test,
}

/// One labelled example.
#[derive(Debug)]
pub struct Example {
    pub text: String,
    pub label: usize,
    /// The group column's value (`"all"` without one).
    pub group: String,
    pub part: Part,
    /// The training fold, 0..folds (0 for test examples).
    pub fold: usize,
}

/// The column names and how examples without an explicit split are divided.
#[derive(Debug, Clone)]
pub struct LabelColumns {
    pub text: String,
    pub score: String,
    pub split: String,
    pub group: String,
}

/// How the parts are chosen and how many examples are taken.
#[derive(Debug, Clone, Copy)]
pub struct Division {
    /// Held out when the table has no split column.
    pub test_fraction: f64,
    /// Training folds for the out-of-fold threshold (at least 2).
    pub folds: usize,
    /// At most this many examples per (part, label), 0 = all.
    pub limit: usize,
}

/// A fraction in 0..1 from 8 bytes of the text's SHA-256 (`word` 0 for the test split, 1 for
/// the fold), so the two choices are independent.
fn bucket(text: &str, word: usize) -> f64 {
    let h = Sha256::digest(text.as_bytes());
    // cannot fail: a SHA-256 digest has 32 bytes, and word is 0 or 1.
    let bytes: [u8; 8] = h[word * 8..word * 8 + 8].try_into().expect("8 bytes");
    (u64::from_le_bytes(bytes) % 1_000_000) as f64 / 1_000_000.0
}

pub fn read_examples(path: &Path, columns: &LabelColumns, division: Division) -> Result<Vec<Example>> {
    let err = |detail: String| Error::Config(format!("--data {}: {detail}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| err(e.to_string()))?
        .build()
        .map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    let mut rows_read = 0usize;
    let mut taken: HashMap<(Part, i64), usize> = HashMap::new();
    for batch in reader {
        let batch = batch.map_err(|e| err(e.to_string()))?;
        let column = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                let names: Vec<&str> = batch.schema_ref().fields().iter().map(|f| f.name().as_str()).collect();
                err(format!("no column {name:?} (columns: {})", names.join(", ")))
            })
        };
        let optional = |name: &str| -> Result<Option<arrow::array::ArrayRef>> {
            Ok(match batch.column_by_name(name) {
                Some(c) => Some(cast(c, &DataType::Utf8)?),
                None => None,
            })
        };
        let texts = cast(&column(&columns.text)?, &DataType::Utf8)?;
        let scores = column(&columns.score)?;
        if !scores.data_type().is_integer() {
            return Err(err(format!(
                "column {:?} is {}, not an integer type (scores are labels 0..5)",
                columns.score,
                scores.data_type()
            )));
        }
        let scores = cast(&scores, &DataType::Int64)?;
        let (splits, groups) = (optional(&columns.split)?, optional(&columns.group)?);
        let (texts, scores) = (texts.as_string::<i32>(), scores.as_primitive::<Int64Type>());
        for row in 0..batch.num_rows() {
            if texts.is_null(row) || scores.is_null(row) {
                return Err(err(format!(
                    "row {} has a null {} or {}",
                    rows_read + row,
                    columns.text,
                    columns.score
                )));
            }
            let (text, score) = (texts.value(row), scores.value(row));
            if score < 0 {
                return Err(err(format!("negative score {score}")));
            }
            let split = splits
                .as_ref()
                .map(|s| s.as_string::<i32>())
                .filter(|s| !s.is_null(row));
            let part = match split.map(|s| s.value(row)) {
                Some("test") => Part::Test,
                Some("train") => Part::Train,
                Some(other) => {
                    return Err(err(format!(
                        "split {other:?} in row {} is neither \"train\" nor \"test\"",
                        rows_read + row
                    )));
                }
                None if bucket(text, 0) < division.test_fraction => Part::Test,
                None => Part::Train,
            };
            let fold = match part {
                Part::Train => ((bucket(text, 1) * division.folds as f64) as usize).min(division.folds - 1),
                Part::Test => 0,
            };
            let group = groups
                .as_ref()
                .map(|g| g.as_string::<i32>())
                .filter(|g| !g.is_null(row))
                .map_or("all", |g| g.value(row));
            let count = taken.entry((part, score)).or_default();
            if division.limit > 0 && *count >= division.limit {
                continue;
            }
            *count += 1;
            out.push(Example {
                text: text.to_string(),
                label: score as usize,
                group: group.to_string(),
                part,
                fold,
            });
        }
        rows_read += batch.num_rows();
    }
    Ok(out)
}
