//! The GPU model's data on the host side: where every tensor lives in the flat parameter
//! buffers ([`Layout`]), and a micro-batch turned into the arrays the kernels read ([`Inputs`]).
//!
//! Layout of the parameters: one flat fp32 buffer in [`Params::tensors`]' order (so q, k, v of
//! a layer are one `[d + 2 kv, d]` matrix and gate, up one `[2 f, d]` matrix: fused
//! projections), with the embedding padded to a multiple of 128 rows and every tensor starting
//! 256-byte aligned, on the device only.
//! Gradients and AdamW moments share the layout, so the optimiser, the norm and the all-reduce
//! each run over one buffer.

use super::CudaError;
use crate::llama::{Batch, LlamaConfig, Params};

/// The embedding's rows on the device: the vocabulary rounded up to a multiple of 128 (tensor
/// cores like aligned shapes); the padding rows stay zero and never reach a checkpoint.
pub fn padded_vocab(vocab: usize) -> usize {
    vocab.div_ceil(128) * 128
}

/// Every tensor starts at a multiple of this many elements (256 bytes in bf16): cuBLASLt's
/// algorithms are chosen for 256-byte aligned operands. Matrices (products of multiples of 64)
/// are multiples already, so fused q/k/v and gate/up stay adjacent; norm weights get padding.
pub const ALIGN: usize = 128;

/// The most ranks that may shard the optimiser state ([`Layout::shard`]).
pub const MAX_SHARDS: usize = 1024;

/// One rank's part of the flat buffers (elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub start: usize,
    pub len: usize,
}

/// One tensor's place in the flat buffers.
#[derive(Debug, Clone)]
pub struct Slot {
    pub name: String,
    pub offset: usize,
    /// Elements on the device (with the embedding's padding rows and the alignment padding).
    pub len: usize,
    /// Elements in a checkpoint.
    pub saved_len: usize,
    /// Weight decay applies (matrices, not norm weights).
    pub decay: bool,
}

/// Where every tensor lives in the flat parameter buffers.
#[derive(Debug, Clone)]
pub struct Layout {
    pub slots: Vec<Slot>,
    pub total: usize,
}

/// Offsets of one layer's tensors (element offsets into the flat buffers).
#[derive(Debug, Clone, Copy)]
pub(super) struct LayerSlots {
    pub(super) attn_norm: usize,
    pub(super) qkv: usize,
    pub(super) o: usize,
    pub(super) mlp_norm: usize,
    pub(super) gate_up: usize,
    pub(super) down: usize,
}

impl Layout {
    pub fn new(config: &LlamaConfig) -> Layout {
        let shapes = Params::<f32>::shapes(config);
        let mut slots = Vec::with_capacity(shapes.len());
        let mut offset = 0;
        for (name, shape) in shapes {
            let saved_len: usize = shape.iter().product();
            let len = if name == "model.embed_tokens.weight" {
                padded_vocab(config.vocab_size) * config.hidden_size
            } else {
                saved_len.div_ceil(ALIGN) * ALIGN
            };
            slots.push(Slot {
                name,
                offset,
                len,
                saved_len,
                decay: shape.len() == 2,
            });
            offset += len;
        }
        Layout { slots, total: offset }
    }

    pub(super) fn embed(&self) -> usize {
        self.slots[0].offset
    }

    pub(super) fn final_norm(&self) -> usize {
        self.slots[self.slots.len() - 1].offset
    }

    /// Layer `l`'s tensors: 9 slots each after the embedding (norm, q, k, v, o, norm, gate, up, down).
    pub(super) fn layer(&self, l: usize) -> LayerSlots {
        let s = |i: usize| self.slots[1 + 9 * l + i].offset;
        LayerSlots {
            attn_norm: s(0),
            qkv: s(1),
            o: s(4),
            mlp_norm: s(5),
            gate_up: s(6),
            down: s(8),
        }
    }

    /// Elements the flat buffers hold: the layout plus room to pad it to equal shards for up to
    /// [`MAX_SHARDS`] ranks (0.5 MiB of fp32 at most).
    pub fn capacity(&self) -> usize {
        self.total + MAX_SHARDS * ALIGN
    }

    /// Rank `rank`'s shard of the flat buffers when `world` ranks share the optimiser state:
    /// equal, aligned, contiguous, together covering the layout (the last ones may hold only
    /// padding, which no tensor uses).
    pub fn shard(&self, rank: usize, world: usize) -> Result<Shard, CudaError> {
        if world == 0 || world > MAX_SHARDS || rank >= world {
            return Err(CudaError::Driver(format!(
                "sharding the optimiser state needs 1..={MAX_SHARDS} ranks and a rank below them (rank {rank} of {world})"
            )));
        }
        let len = self.total.div_ceil(world * ALIGN) * ALIGN;
        Ok(Shard { start: rank * len, len })
    }

    /// The elements of layer `l`'s tensors: one contiguous range (a gradient bucket).
    pub fn layer_range(&self, l: usize) -> std::ops::Range<usize> {
        let (first, last) = (&self.slots[1 + 9 * l], &self.slots[9 + 9 * l]);
        first.offset..last.offset + last.len
    }

    /// `params` as one flat host vector in this layout (padding zero).
    pub fn flatten(&self, params: &Params<f32>) -> Vec<f32> {
        let mut flat = vec![0f32; self.total];
        for (slot, (_, values, _)) in self.slots.iter().zip(params.tensors()) {
            flat[slot.offset..slot.offset + values.len()].copy_from_slice(values);
        }
        flat
    }

    /// The inverse of [`Layout::flatten`] (padding dropped).
    pub fn unflatten(&self, flat: &[f32], config: &LlamaConfig) -> Params<f32> {
        let mut params = Params::<f32>::zeros(config);
        for (slot, (_, values, _)) in self.slots.iter().zip(params.tensors_mut()) {
            values.copy_from_slice(&flat[slot.offset..slot.offset + slot.saved_len]);
        }
        params
    }
}

/// A micro-batch's host-side inputs: ids, targets, per-target loss weights, documents, and the
/// positions grouped by token for the embedding's backward pass.
pub(super) struct Inputs {
    pub(super) ids: Vec<i32>,
    pub(super) targets: Vec<i32>,
    pub(super) weights: Vec<f32>,
    pub(super) segments: Option<Vec<i32>>,
    /// Per token, the row position where its document starts (row start without documents).
    pub(super) doc_start: Vec<i32>,
    pub(super) counted: usize,
    pub(super) group_tokens: Vec<i32>,
    pub(super) group_starts: Vec<i32>,
    pub(super) group_positions: Vec<i32>,
}

impl Inputs {
    pub(super) fn of(batch: &Batch, vocab: usize) -> Result<Inputs, CudaError> {
        let n = batch.rows * batch.seq_len;
        if batch.tokens.len() != batch.rows * (batch.seq_len + 1) {
            return Err(CudaError::Driver(format!(
                "a batch of {} rows x {} needs {} token ids, it has {}",
                batch.rows,
                batch.seq_len + 1,
                batch.rows * (batch.seq_len + 1),
                batch.tokens.len()
            )));
        }
        if let Some(bad) = batch.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(CudaError::Driver(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let at = |i: usize, shift: usize| {
            batch.tokens[(i / batch.seq_len) * (batch.seq_len + 1) + i % batch.seq_len + shift] as i32
        };
        let ids: Vec<i32> = (0..n).map(|i| at(i, 0)).collect();
        let targets: Vec<i32> = (0..n).map(|i| at(i, 1)).collect();
        let counts = |i: usize| batch.loss_mask.as_ref().is_none_or(|m| m[i]);
        let counted = (0..n).filter(|&i| counts(i)).count();
        let weight = if counted > 0 { 1.0 / counted as f32 } else { 0.0 };
        let weights = (0..n).map(|i| if counts(i) { weight } else { 0.0 }).collect();
        let segments: Option<Vec<i32>> = batch.segments.as_ref().map(|s| s.iter().map(|&x| x as i32).collect());
        let mut doc_start = vec![0i32; n];
        for i in 0..n {
            let t = i % batch.seq_len;
            let continues = t > 0 && segments.as_ref().is_none_or(|s| s[i] == s[i - 1]);
            doc_start[i] = if continues { doc_start[i - 1] } else { t as i32 };
            // The fused attention masks by document start: a document must be one run of its row.
            if let Some(s) = &segments
                && !continues
                && t > 0
                && (i - t..i).any(|j| s[j] == s[i])
            {
                return Err(CudaError::Driver(format!(
                    "row {} returns to document {} at position {t} after another one: documents must be contiguous runs",
                    i / batch.seq_len,
                    s[i]
                )));
            }
        }
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&p| (ids[p], p));
        let (mut group_tokens, mut group_starts, mut group_positions) = (Vec::new(), vec![0i32], Vec::with_capacity(n));
        for p in order {
            if group_tokens.last() != Some(&ids[p]) {
                if !group_positions.is_empty() {
                    group_starts.push(group_positions.len() as i32);
                }
                group_tokens.push(ids[p]);
            }
            group_positions.push(p as i32);
        }
        group_starts.push(group_positions.len() as i32);
        if group_tokens.is_empty() {
            group_starts = vec![0];
        }
        Ok(Inputs {
            ids,
            targets,
            weights,
            segments,
            doc_start,
            counted,
            group_tokens,
            group_starts,
            group_positions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_fuses_projections_pads_the_embedding_and_round_trips() {
        let config = LlamaConfig::preset("micro").unwrap();
        let layout = Layout::new(&config);
        let (d, f, kv) = (config.hidden_size, config.intermediate_size, config.kv_dim());
        assert_eq!(layout.slots[0].len, padded_vocab(config.vocab_size) * d);
        assert_eq!(padded_vocab(config.vocab_size) % 128, 0);
        for l in 0..config.num_hidden_layers {
            let s = layout.layer(l);
            // q, k, v one [d + 2 kv, d] matrix; gate, up one [2 f, d] matrix.
            assert_eq!(layout.slots[1 + 9 * l + 2].offset, s.qkv + d * d);
            assert_eq!(layout.slots[1 + 9 * l + 3].offset, s.qkv + d * d + kv * d);
            assert_eq!(s.o, s.qkv + (d + 2 * kv) * d);
            assert_eq!(layout.slots[1 + 9 * l + 7].offset, s.gate_up + f * d);
            assert_eq!(s.down, s.gate_up + 2 * f * d);
        }
        let params = Params::<f32>::init(&config, 3);
        let flat = layout.flatten(&params);
        assert_eq!(flat.len(), layout.total);
        let padding = &flat[config.vocab_size * d..layout.slots[0].len];
        assert!(padding.iter().all(|&x| x == 0.0));
        assert_eq!(layout.unflatten(&flat, &config), params);
        assert!(
            layout
                .slots
                .iter()
                .all(|s| s.offset % ALIGN == 0 && s.len >= s.saved_len)
        );
        // Layer buckets tile the buffer between the embedding and the final norm.
        assert_eq!(layout.layer_range(0).start, layout.slots[0].len);
        for l in 1..config.num_hidden_layers {
            assert_eq!(layout.layer_range(l).start, layout.layer_range(l - 1).end);
        }
        assert_eq!(
            layout.layer_range(config.num_hidden_layers - 1).end,
            layout.final_norm()
        );
        // Shards: equal, aligned, in order, covering the layout within the capacity.
        for world in [1, 3, 8, 64] {
            let shards: Vec<Shard> = (0..world).map(|r| layout.shard(r, world).unwrap()).collect();
            assert!(
                shards
                    .windows(2)
                    .all(|w| w[0].start + w[0].len == w[1].start && w[0].len == w[1].len)
            );
            assert!(shards.iter().all(|s| s.start % ALIGN == 0));
            let end = shards[world - 1].start + shards[world - 1].len;
            assert!(end >= layout.total && end <= layout.capacity(), "{world} ranks");
        }
        assert!(layout.shard(3, 3).is_err() && layout.shard(0, MAX_SHARDS + 1).is_err());
        // Decay on matrices only.
        assert!(layout.slots.iter().all(|s| s.decay != s.name.ends_with("norm.weight")));
    }

    #[test]
    fn inputs_group_positions_by_token_and_mark_document_starts() {
        let batch = Batch {
            rows: 2,
            seq_len: 4,
            tokens: vec![5, 7, 5, 9, 1, 7, 7, 2, 5, 3],
            segments: Some(vec![0, 0, 1, 1, 2, 2, 2, 3]),
            loss_mask: Some(vec![true, false, true, true, true, true, true, true]),
        };
        let inputs = Inputs::of(&batch, 10).unwrap();
        assert_eq!(inputs.ids, vec![5, 7, 5, 9, 7, 7, 2, 5]);
        assert_eq!(inputs.targets, vec![7, 5, 9, 1, 7, 2, 5, 3]);
        assert_eq!(inputs.counted, 7);
        assert_eq!(inputs.weights[1], 0.0);
        assert_eq!(inputs.weights[0], 1.0 / 7.0);
        // Row-relative document starts; a new row always starts a document.
        assert_eq!(inputs.doc_start, vec![0, 0, 2, 2, 0, 0, 0, 3]);
        assert_eq!(inputs.group_tokens, vec![2, 5, 7, 9]);
        assert_eq!(inputs.group_starts, vec![0, 1, 4, 7, 8]);
        assert_eq!(inputs.group_positions, vec![6, 0, 2, 7, 1, 4, 5, 3]);
        // Out-of-vocabulary ids, short batches and a document split in two are errors.
        assert!(Inputs::of(&batch, 8).is_err());
        let split = Batch {
            segments: Some(vec![0, 1, 0, 0, 2, 2, 2, 3]),
            ..batch.clone()
        };
        assert!(Inputs::of(&split, 10).err().unwrap().to_string().contains("contiguous"));
        let short = Batch {
            tokens: vec![1; 9],
            ..batch
        };
        assert!(Inputs::of(&short, 10).is_err());
    }
}
