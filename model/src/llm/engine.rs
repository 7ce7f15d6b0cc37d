//! The in-process engine: a Llama-family GGUF model (SmolLM2-135M-Instruct by default) run on the
//! CPU with quantised weights, a KV cache per sequence and continuous batching.
//!
//! Each forward step stacks the new tokens of every active sequence (a prompt chunk for a
//! sequence being prefilled, one token for a sequence being decoded) into one activation matrix,
//! so each weight block is read once per step for the whole batch; attention then runs per
//! sequence over its own cache. A sequence's logits depend only on its own tokens (activations are
//! quantised per row, sums run in a fixed order), so batching never changes what is generated.
//!
//! RoPE rotates adjacent pairs: GGUF converters permute the Q and K projections of Hugging Face
//! checkpoints so that this equals the rotate-half form of the original model.

use super::chat::ChatTemplate;
use super::quant::{GGML_F16, GGML_F32, QActivations, QMatrix, f16_to_f32};
use super::sampling::Sampler;
pub use super::shape::EngineShape;
use super::{FinishReason, GenerateError, Generation, SamplingParams};
use crate::gguf::{Metadata, TensorInfo, Value};
use crate::tokenizer::{TextTokenizer, TokenizerOptions};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    q: QMatrix,
    k: QMatrix,
    v: QMatrix,
    o: QMatrix,
    gate: QMatrix,
    up: QMatrix,
    down: QMatrix,
}

/// A loaded model: weights, tokenizer and chat template.
pub struct LlamaEngine {
    pub shape: EngineShape,
    embed: QMatrix,
    /// The output projection when not tied to the embedding.
    output: Option<QMatrix>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    tokenizer: TextTokenizer,
    template: ChatTemplate,
    /// Tokens that end a generation (the end-of-turn and end-of-text tokens).
    stop_ids: Vec<u32>,
    /// `<name>@<sha256 of the file, 16 hex>`: what cache keys and fingerprints use.
    identity: String,
    /// Rows fed through the model per step at most (prompt chunks + decode tokens).
    pub step_tokens: usize,
}

/// One sequence's KV cache: per layer, `positions x kv_dim` keys and values.
struct Cache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl LlamaEngine {
    /// Loads a Llama-architecture GGUF (Q4_1 / Q8_0 matrices, F32 / F16 norms).
    pub fn load(path: &Path) -> Result<LlamaEngine, String> {
        let name = path.display().to_string();
        let err = |e: String| format!("{name}: {e}");
        let meta = Metadata::read(path).map_err(|e| e.to_string())?;
        let shape = EngineShape::from_metadata(&meta).map_err(err)?;
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let tensors: BTreeMap<&str, &TensorInfo> = meta.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let data = |t: &TensorInfo| -> Result<&[u8], String> {
            // cannot overflow: `Metadata::parse` checked data_offset + offset (+ the tensor's
            // bytes) against the file's length; `get` below catches a file that shrank since.
            let start = (meta.data_offset + t.offset) as usize;
            bytes
                .get(start..)
                .ok_or_else(|| err(format!("tensor {} lies past the end of the file", t.name)))
        };
        let tensor = |n: &str| {
            tensors
                .get(n)
                .copied()
                .ok_or_else(|| err(format!("tensor {n} is missing")))
        };
        let matrix = |n: &str| -> Result<QMatrix, String> {
            let t = tensor(n)?;
            // `EngineShape::from_metadata` checked every matrix is 2-D and within bounds: the
            // casts cannot truncate (cols is the hidden or feed-forward width, rows one of those
            // or the vocabulary, each already a usize).
            let (cols, rows) = match t.dims[..] {
                [c, r] => (c as usize, r as usize),
                _ => return Err(err(format!("tensor {n} is not a matrix"))),
            };
            QMatrix::from_ggml(t.kind, rows, cols, data(t)?).map_err(|e| err(format!("tensor {n}: {e}")))
        };
        let vector = |n: &str| -> Result<Vec<f32>, String> {
            let t = tensor(n)?;
            // cannot truncate or overflow below: `from_metadata` checked the shape is [hidden].
            let len = t.elements() as usize;
            let raw = data(t)?;
            match t.kind {
                GGML_F32 => raw
                    .get(..len * 4)
                    .map(|b| {
                        b.chunks_exact(4)
                            // cannot fail: chunks_exact(4) yields 4-byte slices.
                            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                            .collect()
                    })
                    .ok_or_else(|| err(format!("tensor {n} is truncated"))),
                GGML_F16 => raw
                    .get(..len * 2)
                    .map(|b| {
                        b.chunks_exact(2)
                            .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                            .collect()
                    })
                    .ok_or_else(|| err(format!("tensor {n} is truncated"))),
                other => Err(err(format!("tensor {n} has type {other}; norms must be F32 or F16"))),
            }
        };
        let embed = matrix("token_embd.weight")?;
        let output = if tensors.contains_key("output.weight") {
            Some(matrix("output.weight")?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(shape.layers);
        for i in 0..shape.layers {
            let b = |n: &str| format!("blk.{i}.{n}");
            layers.push(Layer {
                attn_norm: vector(&b("attn_norm.weight"))?,
                ffn_norm: vector(&b("ffn_norm.weight"))?,
                q: matrix(&b("attn_q.weight"))?,
                k: matrix(&b("attn_k.weight"))?,
                v: matrix(&b("attn_v.weight"))?,
                o: matrix(&b("attn_output.weight"))?,
                gate: matrix(&b("ffn_gate.weight"))?,
                up: matrix(&b("ffn_up.weight"))?,
                down: matrix(&b("ffn_down.weight"))?,
            });
        }
        let norm = vector("output_norm.weight")?;
        let options = TokenizerOptions {
            eos: "<|endoftext|>".into(),
            tag: None,
        };
        let tokenizer = match TextTokenizer::load(path, &options) {
            Ok(t) => t,
            // Models without <|endoftext|>: end documents with the GGUF's own EOS token.
            Err(_) => {
                let eos = meta
                    .token("tokenizer.ggml.eos_token_id")
                    .ok_or_else(|| err("no end-of-text token in the tokenizer metadata".into()))?;
                let options = TokenizerOptions {
                    eos: eos.to_string(),
                    tag: None,
                };
                TextTokenizer::load(path, &options).map_err(|e| e.to_string())?
            }
        };
        if tokenizer.vocab_size() > shape.vocab {
            return Err(err(format!(
                "the tokenizer has {} tokens but token_embd.weight only {} rows",
                tokenizer.vocab_size(),
                shape.vocab
            )));
        }
        let template = ChatTemplate::from_gguf(&meta).map_err(err)?;
        let mut stop_ids = vec![tokenizer.eos_id()];
        // An id past u32 is no token: dropped, not truncated into some other token's id.
        let token_id = |key: &str| {
            meta.get(key)
                .and_then(Value::as_u64)
                .and_then(|id| u32::try_from(id).ok())
        };
        stop_ids.extend(token_id("tokenizer.ggml.eos_token_id"));
        stop_ids.extend(token_id("tokenizer.ggml.eot_token_id"));
        stop_ids.retain(|&id| (id as usize) < shape.vocab);
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let digest = crate::classifier::file_digest(path).map_err(|e| err(e.to_string()))?;
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
        Ok(LlamaEngine {
            shape,
            embed,
            output,
            norm,
            layers,
            tokenizer,
            template,
            stop_ids,
            // cannot fail: `file_digest` returns 64 hex digits.
            identity: format!("{stem}@{}", &digest[..16]),
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

    fn new_cache(&self) -> Cache {
        Cache {
            k: vec![Vec::new(); self.shape.layers],
            v: vec![Vec::new(); self.shape.layers],
            len: 0,
        }
    }

    /// Runs the new `tokens` of each sequence through the model, extending its cache, and returns
    /// the logits after the last new token of each sequence.
    fn forward(&self, work: &mut [(&mut Cache, &[u32])]) -> Vec<Vec<f32>> {
        let s = &self.shape;
        let (d, kv_dim, hd) = (s.hidden, s.kv_heads * s.head_dim, s.head_dim);
        // Which sequence and position each stacked row belongs to.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        for (i, (cache, tokens)) in work.iter().enumerate() {
            rows.extend((0..tokens.len()).map(|t| (i, cache.len + t)));
        }
        let n = rows.len();
        // The rotation of each row's position, once per step (every layer uses the same).
        let rotations: Vec<Vec<(f32, f32)>> = rows.iter().map(|&(_, pos)| rotation(pos, hd, s.rope_base)).collect();
        let mut x = vec![0f32; n * d];
        let ids = work.iter().flat_map(|(_, t)| t.iter().copied());
        for (row, id) in x.chunks_exact_mut(d).zip(ids) {
            self.embed.dequantize_row(id as usize, row);
        }
        let mut h = vec![0f32; n * d];
        let (mut q, mut k, mut v) = (vec![0f32; n * d], vec![0f32; n * kv_dim], vec![0f32; n * kv_dim]);
        let mut attn = vec![0f32; n * d];
        let mut proj = vec![0f32; n * d];
        let (mut gate, mut up) = (vec![0f32; n * s.intermediate], vec![0f32; n * s.intermediate]);
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&x, &layer.attn_norm, s.rms_eps, &mut h);
            let hq = QActivations::quantize(&h, d);
            layer.q.matmul(&hq, &mut q);
            layer.k.matmul(&hq, &mut k);
            layer.v.matmul(&hq, &mut v);
            for (r, turn) in rotations.iter().enumerate() {
                rope(&mut q[r * d..(r + 1) * d], turn);
                rope(&mut k[r * kv_dim..(r + 1) * kv_dim], turn);
            }
            let mut offset = 0;
            for (cache, tokens) in work.iter_mut() {
                let m = tokens.len();
                cache.k[li].extend_from_slice(&k[offset * kv_dim..(offset + m) * kv_dim]);
                cache.v[li].extend_from_slice(&v[offset * kv_dim..(offset + m) * kv_dim]);
                offset += m;
            }
            let caches: Vec<(&[f32], &[f32])> = work.iter().map(|(c, _)| (&c.k[li][..], &c.v[li][..])).collect();
            let group = s.heads / s.kv_heads;
            let scale = 1.0 / (hd as f32).sqrt();
            attn.par_chunks_mut(d)
                .zip(q.par_chunks(d))
                .zip(rows.par_iter())
                .for_each_init(Vec::new, |scores: &mut Vec<f32>, ((out, q), &(seq, pos))| {
                    let (keys, values) = caches[seq];
                    for head in 0..s.heads {
                        let kvh = head / group;
                        let qh = &q[head * hd..(head + 1) * hd];
                        scores.clear();
                        for p in 0..=pos {
                            let key = &keys[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd];
                            scores.push(dot(qh, key) * scale);
                        }
                        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                        let mut total = 0f32;
                        for sc in scores.iter_mut() {
                            *sc = (*sc - max).exp();
                            total += *sc;
                        }
                        let oh = &mut out[head * hd..(head + 1) * hd];
                        oh.fill(0.0);
                        for (p, &w) in scores.iter().enumerate() {
                            let value = &values[p * kv_dim + kvh * hd..p * kv_dim + (kvh + 1) * hd];
                            for (o, &v) in oh.iter_mut().zip(value) {
                                *o += w * v;
                            }
                        }
                        let inv = 1.0 / total;
                        oh.iter_mut().for_each(|o| *o *= inv);
                    }
                });
            layer.o.matmul(&QActivations::quantize(&attn, d), &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            rms_norm(&x, &layer.ffn_norm, s.rms_eps, &mut h);
            let hq = QActivations::quantize(&h, d);
            layer.gate.matmul(&hq, &mut gate);
            layer.up.matmul(&hq, &mut up);
            gate.iter_mut()
                .zip(&up)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            layer
                .down
                .matmul(&QActivations::quantize(&gate, s.intermediate), &mut proj);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
        }
        for (cache, tokens) in work.iter_mut() {
            cache.len += tokens.len();
        }
        // Logits only for the last new row of each sequence.
        let mut last = Vec::with_capacity(work.len() * d);
        let mut end = 0;
        for (_, tokens) in work.iter() {
            end += tokens.len();
            last.extend_from_slice(&x[(end - 1) * d..end * d]);
        }
        let mut normed = vec![0f32; last.len()];
        rms_norm(&last, &self.norm, s.rms_eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; work.len() * head.rows];
        head.matmul(&QActivations::quantize(&normed, d), &mut logits);
        logits.chunks_exact(head.rows).map(<[f32]>::to_vec).collect()
    }

    /// Generates a completion for each prompt (token ids) with continuous batching: up to
    /// `max_batch` sequences decode together, a finished one makes room for the next prompt.
    /// `done(i, result)` is called as each finishes, in completion order; `tokens` counts every
    /// generated token as it is sampled (for live tokens/s).
    pub fn generate_ids(
        &self,
        prompts: &[(Vec<u32>, SamplingParams)],
        max_batch: usize,
        tokens: &std::sync::atomic::AtomicU64,
        done: &mut dyn FnMut(usize, Result<Generation, GenerateError>),
    ) {
        struct Active {
            index: usize,
            cache: Cache,
            prompt: Vec<u32>,
            /// Prompt tokens already in the cache.
            fed: usize,
            generated: Vec<u32>,
            sampler: Sampler,
        }
        let mut queue = (0..prompts.len()).rev().collect::<Vec<usize>>();
        let mut active: Vec<Active> = Vec::new();
        let max_batch = max_batch.max(1);
        loop {
            while active.len() < max_batch {
                let Some(index) = queue.pop() else { break };
                let (prompt, params) = &prompts[index];
                if prompt.is_empty() {
                    done(index, Err(GenerateError::Rejected("the prompt is empty".into())));
                    continue;
                }
                if prompt.len() >= self.shape.context {
                    done(
                        index,
                        Err(GenerateError::Rejected(format!(
                            "the prompt has {} tokens; the model's context is {}",
                            prompt.len(),
                            self.shape.context
                        ))),
                    );
                    continue;
                }
                active.push(Active {
                    index,
                    cache: self.new_cache(),
                    prompt: prompt.clone(),
                    fed: 0,
                    generated: Vec::new(),
                    sampler: Sampler::new(params),
                });
            }
            if active.is_empty() {
                return;
            }
            // This step's rows: one token per decoding sequence, then prompt chunks within budget.
            let decoding = active.iter().filter(|a| a.fed == a.prompt.len()).count();
            let mut budget = self.step_tokens.saturating_sub(decoding).max(1);
            let mut plan: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
            for (i, a) in active.iter().enumerate() {
                if a.fed == a.prompt.len() {
                    plan.push((i, 0..1));
                } else if budget > 0 {
                    let take = (a.prompt.len() - a.fed).min(budget);
                    budget -= take;
                    plan.push((i, a.fed..a.fed + take));
                }
            }
            let step_tokens: Vec<Vec<u32>> = plan
                .iter()
                .map(|(i, range)| {
                    let a = &active[*i];
                    if a.fed == a.prompt.len() {
                        vec![*a.generated.last().expect("a decoding sequence has a token")]
                    } else {
                        a.prompt[range.clone()].to_vec()
                    }
                })
                .collect();
            let logits = {
                let mut caches: Vec<Option<&mut Cache>> = active.iter_mut().map(|a| Some(&mut a.cache)).collect();
                let mut work: Vec<(&mut Cache, &[u32])> = plan
                    .iter()
                    .zip(&step_tokens)
                    .map(|((i, _), t)| (caches[*i].take().expect("one entry per sequence"), &t[..]))
                    .collect();
                self.forward(&mut work)
            };
            let mut finished: Vec<usize> = Vec::new();
            for ((i, range), logits) in plan.iter().zip(logits) {
                let a = &mut active[*i];
                if a.fed < a.prompt.len() {
                    a.fed = range.end;
                    if a.fed < a.prompt.len() {
                        continue;
                    }
                }
                let token = a.sampler.sample(&logits);
                tokens.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let params = &prompts[a.index].1;
                let reason = if self.stop_ids.contains(&token) {
                    Some(FinishReason::Stop)
                } else {
                    a.generated.push(token);
                    if a.generated.len() >= params.max_tokens || a.cache.len + 1 >= self.shape.context {
                        Some(FinishReason::Length)
                    } else if !params.stop.is_empty() {
                        let text = self.tokenizer.decode(&a.generated).unwrap_or_default();
                        params
                            .stop
                            .iter()
                            .any(|s| text.contains(s.as_str()))
                            .then_some(FinishReason::Stop)
                    } else {
                        None
                    }
                };
                if let Some(reason) = reason {
                    finished.push(*i);
                    let mut text = match self.tokenizer.decode(&a.generated) {
                        Ok(t) => t,
                        Err(e) => {
                            done(a.index, Err(GenerateError::Rejected(e.to_string())));
                            continue;
                        }
                    };
                    if let Some(cut) = params.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                        text.truncate(cut);
                    }
                    done(
                        a.index,
                        Ok(Generation {
                            text,
                            finish_reason: reason,
                            prompt_tokens: a.prompt.len() as u32,
                            completion_tokens: a.generated.len() as u32,
                        }),
                    );
                }
            }
            finished.sort_unstable();
            for i in finished.into_iter().rev() {
                active.remove(i);
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums: a fixed order the compiler can vectorise.
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
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

/// `(sin, cos)` of each pair's angle at position `pos`: pair i turns by pos * base^(-2i / head_dim).
fn rotation(pos: usize, head_dim: usize, base: f32) -> Vec<(f32, f32)> {
    (0..head_dim / 2)
        .map(|i| (pos as f32 * base.powf(-2.0 * i as f32 / head_dim as f32)).sin_cos())
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
