//! Loading a Llama-architecture GGUF (Q4_1 / Q8_0 matrices, F32 / F16 norms) for the engine:
//! the shape is checked from the metadata alone ([`EngineShape::from_metadata`]) before any
//! tensor data is read; the tokenizer and chat template come from the same file.

use super::chat::ChatTemplate;
use super::engine::Parts;
use super::quant::{GGML_F16, GGML_F32, QMatrix, f16_to_f32};
use super::shape::EngineShape;
use super::weights::{Layer, Matrix, Weights};
use crate::gguf::{Metadata, TensorInfo, Value};
use crate::tokenizer::{TextTokenizer, TokenizerOptions};
use std::collections::BTreeMap;
use std::path::Path;

/// Reads `path` into the engine's parts. GGUF converters permute Q and K for adjacent-pair
/// RoPE already, so the matrices are used as stored.
pub fn load(path: &Path) -> Result<Parts, String> {
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
    let matrix = |n: &str| -> Result<Matrix, String> {
        let t = tensor(n)?;
        // `EngineShape::from_metadata` checked every matrix is 2-D and within bounds: the casts
        // cannot truncate (cols is the hidden or feed-forward width, rows one of those or the
        // vocabulary, each already a usize).
        let (cols, rows) = match t.dims[..] {
            [c, r] => (c as usize, r as usize),
            _ => return Err(err(format!("tensor {n} is not a matrix"))),
        };
        QMatrix::from_ggml(t.kind, rows, cols, data(t)?)
            .map(Matrix::Quantized)
            .map_err(|e| err(format!("tensor {n}: {e}")))
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
    let digest = crate::classifier::file_digest(path).map_err(|e| err(e.to_string()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    Ok(Parts {
        shape,
        weights: Weights {
            embed,
            output,
            norm,
            layers,
        },
        tokenizer,
        template,
        stop_ids,
        // cannot fail: `file_digest` returns 64 hex digits.
        identity: format!("{stem}@{}", &digest[..16]),
    })
}
