//! **score**: `documents` -> `scores`, the safety classifier's verdict per document.
//!
//! Guarantees: one `scores` row per input document, in input order, keyed by `id` (no text
//! copied: scores are a side table, so changing a routing threshold never rescores). The
//! semantics are the classifier's ([`safepipe_model::classifier`]): chunks of the model's
//! length, softmax per chunk, the document takes its worst chunk. Documents are processed in
//! windows of `window` documents; the next window is tokenized and chunked on a second thread
//! while the current one is inferred, and within a window chunks are sorted by length and
//! batched to a token budget. Results do not depend on the window or batch sizes (beyond ONNX
//! Runtime's float summation order) nor on how units are spread over ranks.

use crate::{OpError, OpResult, schema};
use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Float32Builder, ListBuilder, RecordBatch, StringArray, UInt8Array,
    UInt32Array, UInt64Array,
};
use safepipe_model::classifier::{Classifier, DocumentScore};
use std::sync::Arc;
use std::sync::mpsc::sync_channel;
use std::time::Instant;

/// The query that feeds the stage: every document of the unit, in order.
pub const SELECT_FOR_SCORING: &str = "SELECT id, text FROM documents";

/// Totals of one scoring call, for progress and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScoreTotals {
    pub documents: u64,
    pub chunks: u64,
    /// Tokens fed to the model (special tokens included, padding excluded).
    pub model_tokens: u64,
    pub seconds: f64,
}

/// Scores `(id, text)` rows into a `scores` batch, `window` documents at a time with the next
/// window prepared while the current one is inferred.
pub fn score_batch(
    classifier: &Classifier,
    batch: &RecordBatch,
    window: usize,
) -> OpResult<(RecordBatch, ScoreTotals)> {
    // Any string layout (Utf8View, LargeUtf8) becomes Utf8 first.
    let ids = arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8)?;
    let texts = arrow::compute::cast(batch.column(1), &arrow::datatypes::DataType::Utf8)?;
    let (ids, texts) = (ids.as_string::<i32>(), texts.as_string::<i32>());
    let n = batch.num_rows();
    let window = window.max(1);
    let started = Instant::now();
    let mut totals = ScoreTotals::default();
    let mut scores: Vec<DocumentScore> = Vec::with_capacity(n);
    std::thread::scope(|scope| -> OpResult<()> {
        let (tx, rx) = sync_channel(1);
        scope.spawn(move || {
            for start in (0..n).step_by(window) {
                let end = (start + window).min(n);
                let slice: Vec<&str> = (start..end)
                    .map(|i| if texts.is_valid(i) { texts.value(i) } else { "" })
                    .collect();
                if tx.send(classifier.prepare(&slice)).is_err() {
                    return;
                }
            }
        });
        for prepared in rx {
            let prepared = prepared.map_err(model_error)?;
            totals.chunks += prepared.chunks() as u64;
            totals.model_tokens += prepared.model_tokens();
            scores.extend(classifier.score_prepared(&prepared).map_err(model_error)?);
        }
        Ok(())
    })?;
    if scores.len() != n {
        return Err(OpError::Config(format!("scored {} of {n} documents", scores.len())));
    }
    totals.documents = n as u64;
    totals.seconds = started.elapsed().as_secs_f64();
    Ok((to_batch(ids, &scores, &classifier.model_id())?, totals))
}

fn model_error(e: safepipe_model::classifier::ClassifierError) -> OpError {
    OpError::Model(e.to_string())
}

fn to_batch(ids: &StringArray, scores: &[DocumentScore], model: &str) -> OpResult<RecordBatch> {
    let mut probs = ListBuilder::new(Float32Builder::new()).with_field(schema::probability_field());
    for s in scores {
        probs.values().append_slice(&s.probs);
        probs.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.clone()),
        Arc::new(UInt8Array::from_iter_values(scores.iter().map(|s| s.score))),
        Arc::new(probs.finish()),
        Arc::new(Float32Array::from_iter_values(scores.iter().map(|s| s.expected))),
        Arc::new(UInt32Array::from_iter_values(scores.iter().map(|s| s.chunks))),
        Arc::new(UInt64Array::from_iter_values(scores.iter().map(|s| s.tokens))),
        Arc::new(StringArray::from_iter_values(std::iter::repeat_n(model, scores.len()))),
    ];
    Ok(RecordBatch::try_new(schema::SCORES.clone(), columns)?)
}
