//! **pack**: the pieces of the global mix-and-pack stage that do not touch storage.
//!
//! - [`plan_mixture`]: how many passes (epochs, possibly fractional) over each source give the
//!   requested token fractions;
//! - [`CutoffFinder`]: for a fractional pass, the hash cutoff that selects documents in seeded
//!   random order until a token target is reached, in two streaming passes and 512 KiB per
//!   source (a histogram of the hash's top 16 bits, then only the documents of one bucket);
//! - [`doc_hash`]: the seeded per-document hash behind selection and shuffling;
//! - [`Packer`]: documents in, rows of exactly `seq_len + 1` tokens out, with the offset and
//!   source of every document segment.
//!
//! Everything is a function of (seed, unit id, row in the unit, epoch): the order in which units
//! are read, the number of ranks that made them and the batch sizes never change the output.

use crate::schema;
use crate::{OpError, OpResult};
use arrow::array::{
    ArrayRef, BooleanBuilder, ListArray, ListBuilder, RecordBatch, StringBuilder, UInt16Array, UInt32Array,
    UInt32Builder,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, SchemaRef};
use std::sync::Arc;

/// One source of the mixture: the `tokens` rows of some kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct MixSource {
    pub name: String,
    pub kinds: Vec<String>,
    /// Requested fraction of the packed tokens (weight mode).
    pub weight: Option<f64>,
    /// Exact passes over the source (epoch mode).
    pub epochs: Option<f64>,
    /// Weight mode: the most passes allowed over this source (1 = never repeat a document).
    pub max_epochs: f64,
}

/// Passes over each source so that the mixture matches the request.
///
/// Epoch mode (no weights): each source's `epochs` (default 1). Weight mode (every source has a
/// weight): the weights are normalised to fractions `w`; the total is `total_tokens` if given,
/// else the largest total no source needs more than `max_epochs` passes for
/// (`min(available * max_epochs / w)`); each source then takes `w * total` tokens.
pub fn plan_mixture(sources: &[MixSource], available: &[u64], total_tokens: Option<u64>) -> Result<Vec<f64>, String> {
    let weighted = sources.iter().filter(|s| s.weight.is_some()).count();
    if weighted == 0 {
        if total_tokens.is_some() {
            return Err("pack.total_tokens needs a weight on every pack.mix source".into());
        }
        return Ok(sources.iter().map(|s| s.epochs.unwrap_or(1.0)).collect());
    }
    if weighted != sources.len() {
        return Err("give every pack.mix source a weight, or none (then each takes `epochs` passes)".into());
    }
    let sum: f64 = sources.iter().filter_map(|s| s.weight).sum();
    let fractions: Vec<f64> = sources.iter().map(|s| s.weight.unwrap_or(0.0) / sum).collect();
    let mut total = f64::INFINITY;
    for ((s, &w), &a) in sources.iter().zip(&fractions).zip(available) {
        if w > 0.0 {
            if a == 0 {
                return Err(format!(
                    "pack.mix source {:?} has weight {} but no tokens (kinds {:?}); set its weight to 0 or remove it",
                    s.name,
                    s.weight.unwrap_or(0.0),
                    s.kinds
                ));
            }
            total = total.min(a as f64 * s.max_epochs / w);
        }
    }
    if let Some(wanted) = total_tokens {
        if wanted as f64 > total * (1.0 + 1e-9) {
            return Err(format!(
                "pack.total_tokens = {wanted} needs more passes than max_epochs allows (at most {} tokens \
                 with this mixture); raise max_epochs of the scarce sources or lower total_tokens",
                total.floor()
            ));
        }
        total = wanted as f64;
    }
    Ok(fractions
        .iter()
        .zip(available)
        .zip(sources)
        // Clamped: the tolerance above must never turn into a repeated document.
        .map(|((&w, &a), s)| {
            if a == 0 {
                0.0
            } else {
                (w * total / a as f64).min(s.max_epochs)
            }
        })
        .collect())
}

/// The seeded hash of one document copy for one purpose (selection, shuffling).
pub fn doc_hash(seed: u64, purpose: u64, unit: u32, row: u32, epoch: u32) -> u64 {
    let mut h = mix64(seed ^ purpose.wrapping_mul(0xA076_1D64_78BD_642F));
    h = mix64(h ^ u64::from(unit));
    h = mix64(h ^ u64::from(row));
    mix64(h ^ u64::from(epoch))
}

pub const PURPOSE_SELECT: u64 = 1;
pub const PURPOSE_SHUFFLE: u64 = 2;

/// The SplitMix64 finaliser: a fixed, well-mixed 64-bit permutation.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const BUCKETS: usize = 1 << 16;

/// Finds the selection cutoff of a fractional pass: the documents whose selection hash is below
/// the cutoff hold at least `target` tokens, and dropping the last of them would fall short.
///
/// Pass 1 feeds every document to [`CutoffFinder::histogram`]; [`CutoffFinder::boundary`] then
/// names the one hash bucket the cutoff falls in; pass 2 feeds the documents of that bucket to
/// [`CutoffFinder::candidate`]; [`CutoffFinder::cutoff`] gives the result.
#[derive(Debug, Clone)]
pub struct CutoffFinder {
    target: u64,
    mass: Vec<u64>,
    bucket: Option<(usize, u64)>,
    candidates: Vec<(u64, u64)>,
}

impl CutoffFinder {
    pub fn new(target: u64) -> Self {
        CutoffFinder {
            target,
            mass: vec![0; BUCKETS],
            bucket: None,
            candidates: Vec::new(),
        }
    }

    pub fn histogram(&mut self, hash: u64, tokens: u64) {
        self.mass[(hash >> 48) as usize] += tokens;
    }

    /// After pass 1: the bucket holding the cutoff, or `None` when every document is needed.
    pub fn boundary(&mut self) -> Option<usize> {
        if self.target == 0 {
            self.bucket = Some((0, 0));
            return Some(0);
        }
        let mut below = 0u64;
        for (b, &m) in self.mass.iter().enumerate() {
            if below + m >= self.target {
                self.bucket = Some((b, self.target - below));
                return Some(b);
            }
            below += m;
        }
        None
    }

    /// Pass 2: a document whose hash falls in the boundary bucket.
    pub fn candidate(&mut self, hash: u64, tokens: u64) {
        if let Some((b, _)) = self.bucket
            && (hash >> 48) as usize == b
        {
            self.candidates.push((hash, tokens));
        }
    }

    /// Documents with `hash < cutoff` are selected (`u64::MAX` is every document but those
    /// hashing to `u64::MAX` exactly, which the caller treats as selected too).
    pub fn cutoff(mut self) -> u64 {
        let Some((b, mut need)) = self.bucket else {
            return u64::MAX;
        };
        if need == 0 {
            return (b as u64) << 48;
        }
        self.candidates.sort_unstable();
        for (hash, tokens) in &self.candidates {
            if tokens >= &need {
                return hash.saturating_add(1);
            }
            need -= tokens;
        }
        u64::MAX
    }
}

/// Builds packed sequences of exactly `seq_len + 1` tokens from a stream of documents.
///
/// Documents are concatenated in the order given (each already ends with EOS); a document that
/// does not fit the current sequence continues at the start of the next one (`continues`). What
/// remains at the end, less than one sequence, is the tail: [`Packer::finish`] reports it and it
/// is not written (the manifest counts it).
pub struct Packer {
    row_len: usize,
    wide_ids: bool,
    ids: Vec<u32>,
    /// Per sequence in the pending batch: segment (offset, source index), continues flag.
    seq_segments: Vec<Vec<(u32, u16)>>,
    seq_continues: Vec<bool>,
    /// The sequence being filled.
    current: Vec<u32>,
    current_segments: Vec<(u32, u16)>,
    current_continues: bool,
    sources: Vec<String>,
}

impl Packer {
    /// `seq_len + 1` tokens per row; `vocab_size` picks uint16 ids when they fit.
    pub fn new(seq_len: usize, vocab_size: usize, sources: Vec<String>) -> Self {
        Packer {
            row_len: seq_len + 1,
            wide_ids: vocab_size > usize::from(u16::MAX) + 1,
            ids: Vec::new(),
            seq_segments: Vec::new(),
            seq_continues: Vec::new(),
            current: Vec::with_capacity(seq_len + 1),
            current_segments: Vec::new(),
            current_continues: false,
            sources,
        }
    }

    pub fn schema(&self) -> SchemaRef {
        schema::shards_schema(self.id_type())
    }

    fn id_type(&self) -> DataType {
        if self.wide_ids {
            DataType::UInt32
        } else {
            DataType::UInt16
        }
    }

    /// Complete sequences waiting in [`Packer::take_batch`].
    pub fn pending(&self) -> usize {
        self.seq_continues.len()
    }

    /// Starts in the middle of a document of `source` (a process packing a later share of the
    /// rows): the next row is marked as continuing it, as it would be after the document's
    /// earlier rows.
    pub fn resume(&mut self, source: u16) {
        if self.current.is_empty() {
            self.current_segments = vec![(0, source)];
        }
    }

    /// Appends one document of source `source` (an index into the source names).
    pub fn push(&mut self, source: u16, mut tokens: &[u32]) {
        while !tokens.is_empty() {
            if self.current.is_empty() {
                self.current_continues = !self.current_segments.is_empty();
                self.current_segments.clear();
            }
            self.current_segments.push((self.current.len() as u32, source));
            let room = self.row_len - self.current.len();
            let take = room.min(tokens.len());
            self.current.extend_from_slice(&tokens[..take]);
            tokens = &tokens[take..];
            if self.current.len() == self.row_len {
                self.ids.append(&mut self.current);
                self.seq_segments.push(self.current_segments.clone());
                self.seq_continues.push(self.current_continues);
                // A document that goes on marks the next sequence as a continuation.
                self.current_segments = if tokens.is_empty() {
                    Vec::new()
                } else {
                    vec![(0, source)]
                };
            }
        }
    }

    /// Takes the complete sequences as a `shards` batch (None when there are none).
    pub fn take_batch(&mut self) -> OpResult<Option<RecordBatch>> {
        let rows = self.seq_continues.len();
        if rows == 0 {
            return Ok(None);
        }
        let ids = std::mem::take(&mut self.ids);
        let values: ArrayRef = if self.wide_ids {
            Arc::new(UInt32Array::from(ids))
        } else {
            let narrow: Vec<u16> = ids
                .into_iter()
                .map(|t| u16::try_from(t).map_err(|_| OpError::Config(format!("token id {t} exceeds the vocabulary"))))
                .collect::<OpResult<_>>()?;
            Arc::new(UInt16Array::from(narrow))
        };
        let input_ids = ListArray::new(
            schema::token_id_field(self.id_type()),
            OffsetBuffer::from_lengths(std::iter::repeat_n(self.row_len, rows)),
            values,
            None,
        );
        let item = |ty| Arc::new(arrow::datatypes::Field::new("item", ty, false));
        let mut offsets = ListBuilder::new(UInt32Builder::new()).with_field(item(DataType::UInt32));
        let mut sources = ListBuilder::new(StringBuilder::new()).with_field(item(DataType::Utf8));
        let mut continues = BooleanBuilder::with_capacity(rows);
        for (segments, cont) in self.seq_segments.drain(..).zip(self.seq_continues.drain(..)) {
            for (offset, source) in segments {
                offsets.values().append_value(offset);
                sources.values().append_value(&self.sources[usize::from(source)]);
            }
            offsets.append(true);
            sources.append(true);
            continues.append_value(cont);
        }
        Ok(Some(RecordBatch::try_new(
            self.schema(),
            vec![
                Arc::new(input_ids),
                Arc::new(offsets.finish()),
                Arc::new(sources.finish()),
                Arc::new(continues.finish()),
            ],
        )?))
    }

    /// Tokens left over that do not fill a sequence (the tail, not written).
    pub fn finish(self) -> u64 {
        self.current.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::UInt16Type;

    fn source(name: &str, weight: Option<f64>, max_epochs: f64) -> MixSource {
        MixSource {
            name: name.into(),
            kinds: vec![name.into()],
            weight,
            epochs: None,
            max_epochs,
        }
    }

    #[test]
    fn weights_limit_the_total_by_the_scarcest_source() {
        let s = [source("a", Some(3.0), 1.0), source("b", Some(1.0), 1.0)];
        // a has 600 tokens, b 1000: a limits the total to 800; b takes 200 (0.2 passes).
        let epochs = plan_mixture(&s, &[600, 1000], None).unwrap();
        assert_eq!(epochs, vec![1.0, 0.2]);
        // With b allowed to repeat, a fixed total: 2000 = 1500 a (2.5 passes) + 500 b.
        let s = [source("a", Some(0.75), 3.0), source("b", Some(0.25), 1.0)];
        let epochs = plan_mixture(&s, &[600, 1000], Some(2000)).unwrap();
        assert_eq!(epochs, vec![2.5, 0.5]);
        let err = plan_mixture(&s, &[600, 1000], Some(5000)).unwrap_err();
        assert!(err.contains("max_epochs"), "{err}");
        let err = plan_mixture(&[source("a", Some(1.0), 1.0), source("b", None, 1.0)], &[1, 1], None).unwrap_err();
        assert!(err.contains("every pack.mix source a weight"), "{err}");
    }

    #[test]
    fn cutoff_selects_the_smallest_prefix_reaching_the_target() {
        let docs: Vec<(u64, u64)> = (0..5000u32)
            .map(|i| (doc_hash(7, PURPOSE_SELECT, 0, i, 0), u64::from(i % 97 + 1)))
            .collect();
        let total: u64 = docs.iter().map(|d| d.1).sum();
        for target in [0, 1, total / 3, total - 1, total] {
            let mut finder = CutoffFinder::new(target);
            docs.iter().for_each(|&(h, t)| finder.histogram(h, t));
            if finder.boundary().is_some() {
                docs.iter().for_each(|&(h, t)| finder.candidate(h, t));
            }
            let cutoff = finder.cutoff();
            let mut selected: Vec<(u64, u64)> = docs.iter().copied().filter(|d| d.0 < cutoff).collect();
            let sum: u64 = selected.iter().map(|d| d.1).sum();
            assert!(sum >= target, "target {target}: {sum}");
            selected.sort_unstable();
            if let Some(last) = selected.last() {
                assert!(sum - last.1 < target, "target {target}: one document too many");
            }
        }
    }

    #[test]
    fn packer_rows_are_exactly_seq_len_plus_one_and_lose_nothing() {
        let mut packer = Packer::new(7, 49153, vec!["a".into(), "b".into()]);
        let docs: Vec<Vec<u32>> = (0..20u32)
            .map(|i| (0..(i * 3 % 11 + 1)).map(|t| i * 100 + t).collect())
            .collect();
        for (i, d) in docs.iter().enumerate() {
            packer.push((i % 2) as u16, d);
        }
        let batch = packer.take_batch().unwrap().unwrap();
        let tail = packer.finish();
        let ids = batch.column(0).as_list::<i32>();
        let flat: Vec<u32> = ids
            .values()
            .as_primitive::<UInt16Type>()
            .values()
            .iter()
            .map(|&v| u32::from(v))
            .collect();
        let all: Vec<u32> = docs.concat();
        assert_eq!(flat.len() as u64 + tail, all.len() as u64);
        assert_eq!(flat, all[..flat.len()]);
        for row in 0..batch.num_rows() {
            assert_eq!(ids.value(row).len(), 8);
        }
        // Segment starts reproduce the document boundaries of the stream.
        let offsets = batch.column(1).as_list::<i32>();
        let continues = batch.column(3).as_boolean();
        let mut starts = Vec::new();
        for row in 0..batch.num_rows() {
            let o = offsets.value(row);
            let o = o.as_primitive::<arrow::datatypes::UInt32Type>();
            for (k, v) in o.values().iter().enumerate() {
                if !(k == 0 && continues.value(row)) {
                    starts.push(row as u32 * 8 + v);
                }
            }
        }
        let mut expected = Vec::new();
        let mut at = 0u32;
        for d in &docs {
            if (at as usize) < flat.len() {
                expected.push(at);
            }
            at += d.len() as u32;
        }
        assert_eq!(starts, expected);
        assert!(!continues.value(0));
        assert_eq!(offsets.value(0).len(), batch.column(2).as_list::<i32>().value(0).len());
    }
}
