//! The one Llama forward of safepipe's inference: a Llama-family model on the CPU, from a GGUF
//! file (quantised blocks, [`super::load_gguf`]; SmolLM2-135M-Instruct by default) or from a
//! Hugging Face checkpoint such as `safepipe train` writes (f32 or Q8_0,
//! [`super::checkpoint`]), with a KV cache per sequence.
//!
//! [`LlamaEngine::forward`] runs a batch of work items, each some new tokens on top of a
//! sequence's [`KvCache`], stacked into one activation matrix so each weight is read once per
//! step for the whole batch; attention runs per item over its cache and its own new tokens. The
//! cache is read, never written: each item's new keys and values come back as a [`KvDelta`] to
//! append (decoding) or to drop (a look-ahead), so many items may extend the same cache in one
//! pass (Safe Beam Search's candidates). A row's results depend only on its own sequence
//! (activations are quantised per row, sums run in a fixed order): batching never changes what
//! is generated. The generation loop (continuous batching, decoders) is in [`super::batch`].
//!
//! RoPE rotates adjacent pairs: GGUF converters permute the Q and K projections of Hugging Face
//! checkpoints so that this equals the rotate-half form of the original model, and the
//! checkpoint loader does the same permutation.

use super::chat::ChatTemplate;
use super::checkpoint::Precision;
pub use super::shape::EngineShape;
use super::weights::{Input, Weights, dot};
use crate::tokenizer::{DEFAULT_TAG, TextTokenizer};
use rayon::prelude::*;
use std::path::Path;

/// What a loader hands the engine.
pub struct Parts {
    pub shape: EngineShape,
    pub weights: Weights,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Tokens that end a generation (the end-of-turn and end-of-text tokens).
    pub stop_ids: Vec<u32>,
    /// `<name>@<sha256 of the weights file, 16 hex>`: what cache keys and fingerprints use.
    pub identity: String,
}

/// A loaded model: weights, tokenizer and chat template.
pub struct LlamaEngine {
    pub shape: EngineShape,
    weights: Weights,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    stop_ids: Vec<u32>,
    /// The harmfulness tag's id when the vocabulary has it (Safe Beam Search reads its probability).
    tag_id: Option<u32>,
    identity: String,
    /// Rows fed through the model per step at most (prompt chunks + decode tokens).
    pub step_tokens: usize,
}

/// One sequence's keys and values: per layer, `len x kv_dim` each.
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds the keys and values a forward step computed for this sequence's new tokens.
    pub fn append(&mut self, delta: &KvDelta) {
        for (layer, (k, v)) in delta.k.iter().zip(&delta.v).enumerate() {
            self.k[layer].extend_from_slice(k);
            self.v[layer].extend_from_slice(v);
        }
        self.len += delta.tokens;
    }
}

/// The keys and values of one work item's new tokens, per layer.
#[derive(Debug, Clone)]
pub struct KvDelta {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    tokens: usize,
}

/// What [`LlamaEngine::forward`] returns per work item.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The next-token logits after the item's last token (`vocab` values), or after each of its
    /// tokens (`tokens x vocab`) when every position was asked for.
    pub logits: Vec<f32>,
    pub delta: KvDelta,
}

impl LlamaEngine {
    /// Loads a GGUF file, or a checkpoint directory in f32.
    pub fn load(path: &Path) -> Result<LlamaEngine, String> {
        Self::load_with(path, Precision::F32)
    }

    /// Loads a GGUF file (as stored), or a checkpoint directory in `precision`.
    pub fn load_with(path: &Path, precision: Precision) -> Result<LlamaEngine, String> {
        let parts = if path.is_dir() {
            super::checkpoint::load(path, precision)?
        } else {
            super::load_gguf::load(path)?
        };
        Self::from_parts(parts)
    }

    /// An engine over loaded parts: checks the tokenizer fits the model, finds the tag token.
    pub fn from_parts(parts: Parts) -> Result<LlamaEngine, String> {
        let Parts {
            shape,
            weights,
            tokenizer,
            template,
            mut stop_ids,
            identity,
        } = parts;
        if tokenizer.vocab_size() > shape.vocab {
            return Err(format!(
                "{identity}: the tokenizer has {} tokens but the model's embedding only {} rows",
                tokenizer.vocab_size(),
                shape.vocab
            ));
        }
        stop_ids.retain(|&id| (id as usize) < shape.vocab);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let tag_id = tokenizer
            .special_tokens()
            .iter()
            .find(|(text, _)| text == DEFAULT_TAG)
            .map(|&(_, id)| id);
        Ok(LlamaEngine {
            shape,
            weights,
            tokenizer,
            template,
            stop_ids,
            tag_id,
            identity,
            step_tokens: 512,
        })
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The harmfulness tag's token id, when the vocabulary has [`DEFAULT_TAG`].
    pub fn tag_id(&self) -> Option<u32> {
        self.tag_id
    }

    /// Tokens that end a generation.
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// An empty cache for a new sequence.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            k: vec![Vec::new(); self.shape.layers],
            v: vec![Vec::new(); self.shape.layers],
            len: 0,
        }
    }

    /// Runs each work item's new tokens on top of its cache (several items may share one) and
    /// returns, per item, the logits after its last token (or after every token when
    /// `every_position`) and the keys and values of its tokens. Items with no tokens get no
    /// logits and an empty delta.
    pub fn forward(&self, work: &[(&KvCache, &[u32])], every_position: bool) -> Vec<StepOutput> {
        let s = &self.shape;
        let w = &self.weights;
        let (d, kv_dim, hd) = (s.hidden, s.kv_heads * s.head_dim, s.head_dim);
        // Which item and position each stacked row belongs to, and where each item starts.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut starts = Vec::with_capacity(work.len() + 1);
        for (i, (cache, tokens)) in work.iter().enumerate() {
            starts.push(rows.len());
            rows.extend((0..tokens.len()).map(|t| (i, cache.len + t)));
        }
        starts.push(rows.len());
        let n = rows.len();
        if n == 0 {
            let empty = || vec![Vec::new(); self.shape.layers];
            return work
                .iter()
                .map(|_| StepOutput {
                    logits: Vec::new(),
                    delta: KvDelta {
                        k: empty(),
                        v: empty(),
                        tokens: 0,
                    },
                })
                .collect();
        }
        // The rotation of each row's position, once per step (every layer uses the same).
        let rotations: Vec<Vec<(f32, f32)>> = rows.iter().map(|&(_, pos)| rotation(pos, hd, s.rope_base)).collect();
        let mut x = vec![0f32; n * d];
        let ids = work.iter().flat_map(|(_, t)| t.iter().copied());
        for (row, id) in x.chunks_exact_mut(d).zip(ids) {
            w.embed.row(id as usize, row);
        }
        let mut h = vec![0f32; n * d];
        let mut q = vec![0f32; n * d];
        let mut step_k = vec![vec![0f32; n * kv_dim]; s.layers];
        let mut step_v = vec![vec![0f32; n * kv_dim]; s.layers];
        let mut attn = vec![0f32; n * d];
        let mut proj = vec![0f32; n * d];
        let (mut gate, mut up) = (vec![0f32; n * s.intermediate], vec![0f32; n * s.intermediate]);
        for (li, layer) in w.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, s.rms_eps, &mut h);
            let input = Input::new(&h);
            layer.q.matmul(&input, &mut q);
            layer.k.matmul(&input, &mut step_k[li]);
            layer.v.matmul(&input, &mut step_v[li]);
            for (r, turn) in rotations.iter().enumerate() {
                rope(&mut q[r * d..(r + 1) * d], turn);
                rope(&mut step_k[li][r * kv_dim..(r + 1) * kv_dim], turn);
            }
            let (new_k, new_v) = (&step_k[li], &step_v[li]);
            let group = s.heads / s.kv_heads;
            let scale = 1.0 / (hd as f32).sqrt();
            attn.par_chunks_mut(d)
                .zip(q.par_chunks(d))
                .zip(rows.par_iter())
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, ((out, q), &(item, pos))| {
                    let cache = work[item].0;
                    let held = cache.len;
                    // Position p's key/value: from the cache, else from this step's rows.
                    let at = |p: usize, kvh: usize| -> std::ops::Range<usize> {
                        let base = if p < held { p } else { starts[item] + p - held };
                        base * kv_dim + kvh * hd..base * kv_dim + (kvh + 1) * hd
                    };
                    for head in 0..s.heads {
                        let kvh = head / group;
                        let qh = &q[head * hd..(head + 1) * hd];
                        scores.clear();
                        for p in 0..=pos {
                            let keys = if p < held { &cache.k[li] } else { new_k };
                            scores.push(dot(qh, &keys[at(p, kvh)]) * scale);
                        }
                        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                        let mut total = 0f32;
                        for sc in scores.iter_mut() {
                            *sc = (*sc - max).exp();
                            total += *sc;
                        }
                        let oh = &mut out[head * hd..(head + 1) * hd];
                        oh.fill(0.0);
                        for (p, &weight) in scores.iter().enumerate() {
                            let values = if p < held { &cache.v[li] } else { new_v };
                            for (o, &v) in oh.iter_mut().zip(&values[at(p, kvh)]) {
                                *o += weight * v;
                            }
                        }
                        let inv = 1.0 / total;
                        oh.iter_mut().for_each(|o| *o *= inv);
                    }
                });
            layer.o.matmul(&Input::new(&attn), &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            rms_norm(&x, &layer.ffn_norm, s.rms_eps, &mut h);
            let input = Input::new(&h);
            layer.gate.matmul(&input, &mut gate);
            layer.up.matmul(&input, &mut up);
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            layer.down.matmul(&Input::new(&gate), &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        // The rows whose logits are wanted: every row, or each item's last.
        let wanted: Vec<usize> = if every_position {
            (0..n).collect()
        } else {
            starts.windows(2).filter(|r| r[1] > r[0]).map(|r| r[1] - 1).collect()
        };
        let mut last = Vec::with_capacity(wanted.len() * d);
        for &r in &wanted {
            last.extend_from_slice(&x[r * d..(r + 1) * d]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &w.norm, s.rms_eps, &mut normed);
        let head = w.output.as_ref().unwrap_or(&w.embed);
        let vocab = head.rows();
        let mut logits = vec![0f32; wanted.len() * vocab];
        head.matmul(&Input::new(&normed), &mut logits);
        let mut outputs = Vec::with_capacity(work.len());
        let mut taken = 0;
        for (i, span) in starts.windows(2).enumerate() {
            let (a, b) = (span[0], span[1]);
            let count = if every_position { b - a } else { usize::from(b > a) };
            let item_logits = logits[taken * vocab..(taken + count) * vocab].to_vec();
            taken += count;
            let slice = |layers: &[Vec<f32>]| -> Vec<Vec<f32>> {
                layers.iter().map(|l| l[a * kv_dim..b * kv_dim].to_vec()).collect()
            };
            debug_assert_eq!(work[i].1.len(), b - a);
            outputs.push(StepOutput {
                logits: item_logits,
                delta: KvDelta {
                    k: slice(&step_k),
                    v: slice(&step_v),
                    tokens: b - a,
                },
            });
        }
        outputs
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (mean + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
}

/// `(sin, cos)` of each pair's angle at position `pos`: pair i turns by pos * base^(-2i / head_dim),
/// computed in f64 as the trainer does (the angle of a far position loses its low bits in f32).
fn rotation(pos: usize, head_dim: usize, base: f32) -> Vec<(f32, f32)> {
    (0..head_dim / 2)
        .map(|i| {
            let (sin, cos) = (pos as f64 * f64::from(base).powf(-2.0 * i as f64 / head_dim as f64)).sin_cos();
            (sin as f32, cos as f32)
        })
        .collect()
}

/// Rotates adjacent pairs of each head of `x` by `turn` (from [`rotation`]).
fn rope(x: &mut [f32], turn: &[(f32, f32)]) {
    for head in x.chunks_exact_mut(turn.len() * 2) {
        for (pair, &(sin, cos)) in head.chunks_exact_mut(2).zip(turn) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * cos - b * sin;
            pair[1] = a * sin + b * cos;
        }
    }
}
