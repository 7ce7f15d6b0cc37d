//! The passes of the pack stage over every unit's `tokens`, for one share of the shards.
//!
//! Memory stays flat in the corpus size. Five streaming passes (the last two over this share's
//! buckets only):
//! 1. `kind, n_tokens`: tokens per mixture source and a histogram of selection hashes;
//! 2. (only for fractional passes) the documents of the one histogram bucket holding each
//!    source's cutoff, to make the selection exact to one document;
//! 3. `kind, n_tokens`: the tokens of every shuffle bucket (bucket = the seeded shuffle key's
//!    position in B equal key ranges), so every rank knows where each bucket's tokens start in
//!    the global stream, and so which rows and shards are its own ([`Layout`]);
//! 4. `kind, input_ids`: the selected copies of this share's buckets go to spill files on local
//!    disk;
//! 5. bucket by bucket: sort by key, pack this share's tokens into rows of `seq_len + 1`, write
//!    its shard files.
//!
//! Buckets are key ranges, so the stream is the documents in key order whatever B is, however
//! many ranks made the units and pack the shards: a share starts and ends on shard boundaries,
//! and a document cut by a share's start continues there exactly as in a one-process pack.

use super::PackConfig;
use super::spill::{FLUSH_SEQUENCES, ShardSink, SpillDir, parse_entries, write_entry};
use super::{Manifest, SourceReport, TokenizerInfo, open_parquet};
use crate::engine::records::Stamp;
use crate::engine::run_dir::RunDir;
use crate::error::{Error, Result};
use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::UInt32Type;
use futures::TryStreamExt;
use parquet::arrow::ProjectionMask;
use safepipe_model::TextTokenizer;
use safepipe_operators::pack::{
    CutoffFinder, MixSource, PURPOSE_SELECT, PURPOSE_SHUFFLE, Packer, doc_hash, plan_mixture,
};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::time::Instant;
use tracing::{info, warn};

/// Which share of the shards one process writes: rank `rank` of `world` packing ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub rank: u32,
    pub world: u32,
}

pub(super) struct PackJob<'a> {
    pub pack: &'a PackConfig,
    pub tokenizer: &'a TextTokenizer,
    pub run_dir: RunDir,
    /// Shards are written under `pack/_attempts/<attempt>/` until the commit publishes them.
    pub attempt: String,
    /// (unit id, tokens file relative to the run directory) in unit order.
    pub files: Vec<(u32, String)>,
    pub part: Part,
}

/// Where the shuffled token stream's buckets, rows and shards fall.
#[derive(Debug)]
struct Layout {
    /// Global token position at which each bucket starts, and the total at the end.
    starts: Vec<u64>,
    total: u64,
    row_len: u64,
    shard_rows: u64,
    /// Complete rows (the tokens after the last one are the dropped tail).
    rows: u64,
    shards: u64,
}

/// One rank's share: the shards whose first token falls in its buckets' tokens.
#[derive(Debug)]
struct Share {
    /// Buckets holding its tokens (its own, plus later ones its last shard reaches into).
    buckets: Range<usize>,
    first_shard: u64,
    /// Its tokens of the global stream: `[start, end)`, on row (and shard) boundaries.
    start: u64,
    end: u64,
}

impl Layout {
    fn new(bucket_tokens: &[u64], row_len: u64, shard_rows: u64) -> Layout {
        let mut starts = Vec::with_capacity(bucket_tokens.len() + 1);
        let mut at = 0;
        for &t in bucket_tokens {
            starts.push(at);
            at += t;
        }
        starts.push(at);
        let rows = at / row_len;
        Layout {
            starts,
            total: at,
            row_len,
            shard_rows,
            rows,
            shards: rows.div_ceil(shard_rows),
        }
    }

    fn share(&self, part: Part) -> Share {
        let buckets = self.starts.len() - 1;
        let (r, w) = (part.rank as usize, part.world.max(1) as usize);
        let (own_from, own_to) = (buckets * r / w, buckets * (r + 1) / w);
        let shard_tokens = self.shard_rows * self.row_len;
        // Shards whose first token lies in [starts[own_from], starts[own_to]).
        let first = self.starts[own_from].div_ceil(shard_tokens).min(self.shards);
        let last = if own_to == buckets {
            self.shards
        } else {
            self.starts[own_to].div_ceil(shard_tokens).min(self.shards)
        };
        let start = first * shard_tokens;
        let end = (last * self.shard_rows).min(self.rows) * self.row_len;
        if first >= last {
            return Share {
                buckets: 0..0,
                first_shard: first,
                start,
                end: start,
            };
        }
        // The buckets holding tokens [start, end).
        let from = self.starts.partition_point(|&s| s <= start).saturating_sub(1);
        let to = self.starts.partition_point(|&s| s < end).min(buckets);
        Share {
            buckets: from..to,
            first_shard: first,
            start,
            end,
        }
    }
}

/// Per-source state while planning.
struct SourceState {
    spec: MixSource,
    documents: u64,
    tokens: u64,
    finder: CutoffFinder,
    whole_epochs: u32,
    /// Tokens the fractional pass must select (0 = no fractional pass).
    target: u64,
    /// Selection cutoff of the fractional pass (0 = none).
    cutoff: u64,
    selected_tokens: u64,
}

/// More buckets than this would mean too many open files: buckets grow instead.
const MAX_BUCKETS: u64 = 512;

impl PackJob<'_> {
    /// Runs the passes and writes this part's shards (under the attempt folder). The returned
    /// manifest holds the global figures (identical on every rank) and this part's shards.
    pub(super) async fn execute(&self) -> Result<Manifest> {
        let clock = Instant::now();
        let step = |what: &str| {
            info!(
                stage = "pack",
                part = %format!("{} of {}", self.part.rank, self.part.world),
                seconds = format!("{:.1}", clock.elapsed().as_secs_f64()),
                "{what}"
            )
        };
        // Pass 1: token totals per kind, then the mixture.
        let mut by_kind: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        self.scan(&["kind", "n_tokens"], |_, _, batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let n = batch.column(1).as_primitive::<UInt32Type>();
            for i in 0..batch.num_rows() {
                let entry = by_kind.entry(kinds.value(i).to_string()).or_default();
                entry.0 += 1;
                entry.1 += u64::from(n.value(i));
            }
        })
        .await?;
        let mut sources = self.sources(&by_kind)?;
        let kind_source: HashMap<String, u16> = sources
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.spec.kinds.iter().map(move |k| (k.clone(), i as u16)))
            .collect();
        for (kind, (docs, _)) in &by_kind {
            if !kind_source.contains_key(kind) {
                warn!(kind = %kind, documents = docs, "tokens of this kind are in no pack.mix source: not packed");
            }
        }
        let specs: Vec<MixSource> = sources.iter().map(|s| s.spec.clone()).collect();
        let available: Vec<u64> = sources.iter().map(|s| s.tokens).collect();
        let epochs = plan_mixture(&specs, &available, self.pack.total_tokens)
            .map_err(|e| Error::Config(format!("pack: {e}")))?;
        let mut fractional = false;
        for (s, &e) in sources.iter_mut().zip(&epochs) {
            s.whole_epochs = e.floor() as u32;
            let rest = e - e.floor();
            let target = (rest * s.tokens as f64).round() as u64;
            s.finder = CutoffFinder::new(target);
            s.target = target;
            if target > 0 {
                fractional = true;
            }
        }
        step("pass 1 of 5 done: token totals and the mixture");

        // Pass 2: the exact selection cutoff of each fractional pass.
        if fractional {
            self.scan_selection(&kind_source, |s, h, n| sources[s].finder.histogram(h, n))
                .await?;
            let mut boundary = false;
            for s in sources.iter_mut() {
                boundary |= s.finder.boundary().is_some();
            }
            if boundary {
                self.scan_selection(&kind_source, |s, h, n| sources[s].finder.candidate(h, n))
                    .await?;
            }
        }
        for s in sources.iter_mut() {
            let finder = std::mem::replace(&mut s.finder, CutoffFinder::new(0));
            s.cutoff = if s.target == 0 { 0 } else { finder.cutoff() };
        }
        let planned: u64 = sources
            .iter()
            .zip(&epochs)
            .map(|(s, e)| (s.tokens as f64 * e) as u64)
            .sum();
        let buckets = (planned * 4 / self.pack.bucket_bytes + 1).min(MAX_BUCKETS);
        let selection: Vec<(u64, u32)> = sources.iter().map(|s| (s.cutoff, s.whole_epochs)).collect();
        let seed = self.pack.seed;
        // Copies of one document, and the bucket of each: the one rule passes 3 and 4 share.
        let copies = |s: u16, unit: u32, row: u32| -> u32 {
            let (cutoff, whole) = selection[usize::from(s)];
            let selected = cutoff > 0 && {
                let h = doc_hash(seed, PURPOSE_SELECT, unit, row, 0);
                h < cutoff || cutoff == u64::MAX
            };
            whole + u32::from(selected)
        };
        let bucket_of = |unit: u32, row: u32, epoch: u32| -> (u64, usize) {
            let key = doc_hash(seed, PURPOSE_SHUFFLE, unit, row, epoch);
            (key, ((u128::from(key) * u128::from(buckets)) >> 64) as usize)
        };
        step("pass 2 of 5 done: selection cutoffs");

        // Pass 3: the tokens of every bucket (all ranks compute the same layout), and the counts.
        let mut bucket_tokens = vec![0u64; buckets as usize];
        let (mut documents_in, mut packed_docs, mut not_selected, mut not_in_mixture) = (0u64, 0u64, 0u64, 0u64);
        self.scan(&["kind", "n_tokens"], |unit, first_row, batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let n = batch.column(1).as_primitive::<UInt32Type>();
            for i in 0..batch.num_rows() {
                documents_in += 1;
                let Some(&s) = kind_source.get(kinds.value(i)) else {
                    not_in_mixture += 1;
                    continue;
                };
                let row = first_row + i as u32;
                let k = copies(s, unit, row);
                if k == 0 {
                    not_selected += 1;
                    continue;
                }
                packed_docs += 1;
                let tokens = u64::from(n.value(i));
                sources[usize::from(s)].selected_tokens += u64::from(k) * tokens;
                for epoch in 0..k {
                    bucket_tokens[bucket_of(unit, row, epoch).1] += tokens;
                }
            }
        })
        .await?;
        let layout = Layout::new(
            &bucket_tokens,
            self.pack.seq_len as u64 + 1,
            self.pack.shard_sequences as u64,
        );
        let share = layout.share(self.part);
        step("pass 3 of 5 done: the shuffle's layout");

        // Pass 4: scatter the selected copies of this share's buckets onto local disk.
        let spill = SpillDir::create(self.pack.spill_dir.as_deref())?;
        let wanted = share.buckets.clone();
        let mut writers = wanted
            .clone()
            .map(|b| spill.writer(b as u64))
            .collect::<Result<Vec<BufWriter<std::fs::File>>>>()?;
        let mut io_error: Option<std::io::Error> = None;
        if !wanted.is_empty() {
            self.scan(&["kind", "input_ids"], |unit, first_row, batch| {
                let kinds = batch.column(0).as_string::<i32>();
                let ids = batch.column(1).as_list::<i32>();
                for i in 0..batch.num_rows() {
                    let Some(&s) = kind_source.get(kinds.value(i)) else {
                        continue;
                    };
                    let row = first_row + i as u32;
                    for epoch in 0..copies(s, unit, row) {
                        let (key, bucket) = bucket_of(unit, row, epoch);
                        if !wanted.contains(&bucket) {
                            continue;
                        }
                        let doc = ids.value(i);
                        let doc = doc.as_primitive::<UInt32Type>().values();
                        let writer = &mut writers[bucket - wanted.start];
                        if let Err(e) = write_entry(writer, key, unit, row, epoch, s, doc) {
                            io_error.get_or_insert(e);
                        }
                    }
                }
            })
            .await?;
        }
        for mut w in writers.drain(..) {
            if let Err(e) = w.flush() {
                io_error.get_or_insert(e);
            }
        }
        if let Some(e) = io_error {
            return Err(Error::Internal(format!(
                "pack: writing spill files in {}: {e}",
                spill.path.display()
            )));
        }
        step("pass 4 of 5 done: this share's documents spilled");

        // Pass 5: bucket by bucket in key order, the tokens [share.start, share.end) of the
        // global stream packed into rows and shards.
        let names: Vec<String> = sources.iter().map(|s| s.spec.name.clone()).collect();
        let mut packer = Packer::new(self.pack.seq_len, self.tokenizer.vocab_size(), names);
        let mut sink = ShardSink::new(self, packer.schema(), share.first_shard);
        let mut doc = Vec::new();
        let mut at = layout.starts[wanted.start.min(layout.starts.len() - 1)];
        'buckets: for b in wanted.clone() {
            let bytes = spill.read(b as u64)?;
            let mut entries = parse_entries(&bytes)?;
            entries.sort_unstable_by_key(|e| (e.key, e.unit, e.row, e.epoch));
            for e in &entries {
                let (from, to) = (at, at + e.len as u64);
                at = to;
                if to <= share.start {
                    continue;
                }
                // The document's part inside the share (the share starts and ends on row bounds).
                let skip = share.start.saturating_sub(from) as usize;
                let keep = (share.end.min(to) - from) as usize;
                doc.clear();
                doc.extend(
                    bytes[e.start + 4 * skip..e.start + 4 * keep]
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))),
                );
                if skip > 0 {
                    packer.resume(e.source);
                }
                packer.push(e.source, &doc);
                if packer.pending() >= FLUSH_SEQUENCES
                    && let Some(batch) = packer.take_batch()?
                {
                    sink.write(batch).await?;
                }
                if at >= share.end {
                    break 'buckets;
                }
            }
        }
        if let Some(batch) = packer.take_batch()? {
            sink.write(batch).await?;
        }
        let (shards, written) = sink.finish().await?;
        drop(spill);
        step("pass 5 of 5 done: shards written");

        let row_len = layout.row_len;
        if packer.finish() != 0 || written * row_len != share.end - share.start {
            return Err(Error::Internal(format!(
                "pack: token accounting broken: {written} rows written for tokens {}..{}",
                share.start, share.end
            )));
        }
        let selected = layout.total;
        let sum: u64 = sources.iter().map(|s| s.selected_tokens).sum();
        if sum != selected {
            return Err(Error::Internal(format!(
                "pack: token accounting broken: sources selected {sum}, buckets hold {selected}"
            )));
        }
        let weight_sum: f64 = sources.iter().filter_map(|s| s.spec.weight).sum();
        let reports = sources
            .iter()
            .zip(&epochs)
            .map(|(s, &e)| SourceReport {
                name: s.spec.name.clone(),
                kinds: s.spec.kinds.clone(),
                documents: s.documents,
                available_tokens: s.tokens,
                requested_fraction: s.spec.weight.map(|w| w / weight_sum),
                epochs: e,
                selected_tokens: s.selected_tokens,
                achieved_fraction: if selected == 0 {
                    0.0
                } else {
                    s.selected_tokens as f64 / selected as f64
                },
            })
            .collect();
        Ok(Manifest {
            version: 0,
            stamp: Stamp::default(),
            attempt: String::new(),
            tokenizer: TokenizerInfo {
                path: String::new(),
                sha256: self.tokenizer.hash().to_string(),
                vocab_size: self.tokenizer.vocab_size(),
                eos_id: self.tokenizer.eos_id(),
                tag_id: self.tokenizer.tag_id(),
            },
            seq_len: self.pack.seq_len,
            id_type: if self.tokenizer.vocab_size() > 65536 {
                "uint32"
            } else {
                "uint16"
            }
            .into(),
            sequences: layout.rows,
            tokens: layout.rows * row_len,
            tail_tokens_dropped: selected - layout.rows * row_len,
            documents_in,
            documents_packed: packed_docs,
            documents_not_selected: not_selected,
            documents_not_in_mixture: not_in_mixture,
            sources: reports,
            shards,
            units: 0,
            started_at: String::new(),
            finished_at: String::new(),
            seconds: 0.0,
            part: Some(super::PartInfo {
                rank: self.part.rank,
                world: self.part.world,
                first_shard: share.first_shard,
                bucket_bytes: self.pack.bucket_bytes,
            }),
        })
    }

    /// The mixture sources: the config's, or one per kind present (each taken once).
    fn sources(&self, by_kind: &BTreeMap<String, (u64, u64)>) -> Result<Vec<SourceState>> {
        let specs: Vec<MixSource> = if self.pack.mix.is_empty() {
            by_kind
                .keys()
                .map(|k| MixSource {
                    name: k.clone(),
                    kinds: vec![k.clone()],
                    weight: None,
                    epochs: None,
                    max_epochs: 1.0,
                })
                .collect()
        } else {
            self.pack
                .mix
                .iter()
                .map(|m| MixSource {
                    name: m.name.clone(),
                    kinds: if m.kinds.is_empty() {
                        vec![m.name.clone()]
                    } else {
                        m.kinds.clone()
                    },
                    weight: m.weight,
                    epochs: m.epochs,
                    max_epochs: m.max_epochs,
                })
                .collect()
        };
        // A kind belongs to one source: checked when the config is loaded.
        Ok(specs
            .into_iter()
            .map(|spec| {
                let (documents, tokens) = spec
                    .kinds
                    .iter()
                    .filter_map(|k| by_kind.get(k))
                    .fold((0, 0), |(d, t), (d2, t2)| (d + d2, t + t2));
                if documents == 0 {
                    warn!(source = %spec.name, kinds = ?spec.kinds, "pack.mix source has no documents");
                }
                SourceState {
                    spec,
                    documents,
                    tokens,
                    finder: CutoffFinder::new(0),
                    whole_epochs: 0,
                    target: 0,
                    cutoff: 0,
                    selected_tokens: 0,
                }
            })
            .collect())
    }

    /// Streams every document of a mixture source as `f(source, selection hash, tokens)`.
    async fn scan_selection(
        &self,
        kind_source: &HashMap<String, u16>,
        mut f: impl FnMut(usize, u64, u64),
    ) -> Result<()> {
        let seed = self.pack.seed;
        self.scan(&["kind", "n_tokens"], |unit, first_row, batch| {
            let kinds = batch.column(0).as_string::<i32>();
            let n = batch.column(1).as_primitive::<UInt32Type>();
            for i in 0..batch.num_rows() {
                if let Some(&s) = kind_source.get(kinds.value(i)) {
                    let h = doc_hash(seed, PURPOSE_SELECT, unit, first_row + i as u32, 0);
                    f(usize::from(s), h, u64::from(n.value(i)));
                }
            }
        })
        .await
    }

    /// Streams `columns` of every unit's tokens file in unit order; `f(unit, first_row, batch)`.
    async fn scan(&self, columns: &[&str], mut f: impl FnMut(u32, u32, &RecordBatch)) -> Result<()> {
        for (unit, file) in &self.files {
            let builder = open_parquet(&self.run_dir.file(file)?).await?;
            let roots: Vec<usize> = columns
                .iter()
                .map(|c| {
                    builder
                        .schema()
                        .index_of(c)
                        .map_err(|_| Error::Internal(format!("{file} has no column {c}")))
                })
                .collect::<Result<_>>()?;
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            let mut stream = builder.with_projection(mask).with_batch_size(4096).build()?;
            let mut row = 0u32;
            while let Some(batch) = stream.try_next().await? {
                f(*unit, row, &batch);
                row += batch.num_rows() as u32;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every rank's shares, over any bucket sizes: together exactly the rows, in order.
    #[test]
    fn shares_tile_the_rows_on_shard_boundaries() {
        let mut state = 7u64;
        for _ in 0..300 {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let buckets = 1 + (state >> 60) as usize;
            let tokens: Vec<u64> = (0..buckets).map(|i| (state >> (i % 40)) % 500).collect();
            let (row_len, shard_rows) = (1 + (state >> 20) % 17, 1 + (state >> 30) % 5);
            let layout = Layout::new(&tokens, row_len, shard_rows);
            for world in 1..=5u32 {
                let mut next = 0;
                for rank in 0..world {
                    let share = layout.share(Part { rank, world });
                    assert!(share.end >= share.start && share.end.is_multiple_of(row_len));
                    if share.end > share.start {
                        assert_eq!(share.start, next, "{layout:?} {share:?}");
                        assert!(share.start.is_multiple_of(shard_rows * row_len));
                        assert!(layout.starts[share.buckets.start] <= share.start);
                        assert!(layout.starts[share.buckets.end] >= share.end);
                        next = share.end;
                    }
                }
                assert_eq!(next, layout.rows * row_len, "world {world}: {layout:?}");
            }
        }
    }
}
