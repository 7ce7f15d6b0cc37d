//! The shape of a Llama-family GGUF model, read and checked from its metadata alone.
//!
//! [`EngineShape::from_metadata`] validates every hyper-parameter and the shape and type of every
//! tensor the engine will read against each other and against the file (the GGUF reader already
//! checked that each tensor lies inside it), before a byte of tensor data is read or a buffer is
//! allocated: a crafted file is an error naming the key or tensor, never a division by zero, an
//! overflow or an out-of-range index later.

use super::quant::{GGML_F16, GGML_F32, GGML_Q4_1, GGML_Q8_0};
use crate::gguf::{Metadata, TensorInfo, Value};

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

/// Upper bounds far above any model the CPU engine could run, well below overflow.
const MAX_WIDTH: usize = 1 << 20;
const MAX_LAYERS: usize = 4096;
const MAX_CONTEXT: usize = 1 << 24;

fn count(meta: &Metadata, key: &str, default: Option<usize>, max: usize) -> Result<usize, String> {
    let value = match meta.get(key) {
        None => default.ok_or_else(|| format!("metadata key {key} is missing"))?,
        Some(v) => v
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| format!("metadata key {key} = {v:?} is not a count"))?,
    };
    if value == 0 || value > max {
        return Err(format!("metadata key {key} = {value} is outside 1..={max}"));
    }
    Ok(value)
}

fn real(meta: &Metadata, key: &str, default: f32) -> Result<f32, String> {
    let value = match meta.get(key) {
        None => return Ok(default),
        Some(Value::F64(v)) => *v as f32,
        Some(other) => other
            .as_u64()
            .map(|v| v as f32)
            .ok_or_else(|| format!("metadata key {key} = {other:?} is not a number"))?,
    };
    if !value.is_finite() || value < 0.0 {
        return Err(format!(
            "metadata key {key} = {value} is not a finite non-negative number"
        ));
    }
    Ok(value)
}

impl EngineShape {
    /// The checked shape of the `llama` model described by `meta`: consistent head counts
    /// (heads divide the width, kv-heads divide the heads, an even head dimension for RoPE),
    /// and every tensor the engine reads present with the expected shape and a supported type.
    pub fn from_metadata(meta: &Metadata) -> Result<EngineShape, String> {
        let arch = meta.get("general.architecture").and_then(Value::as_str).unwrap_or("");
        if arch != "llama" {
            return Err(format!(
                "architecture {arch:?}; the in-process engine runs \"llama\" models"
            ));
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden = count(meta, &key("embedding_length"), None, MAX_WIDTH)?;
        let heads = count(meta, &key("attention.head_count"), None, MAX_WIDTH)?;
        let kv_heads = count(meta, &key("attention.head_count_kv"), Some(heads), MAX_WIDTH)?;
        if !hidden.is_multiple_of(heads) {
            return Err(format!(
                "embedding_length {hidden} is not a multiple of head_count {heads}"
            ));
        }
        if !heads.is_multiple_of(kv_heads) {
            return Err(format!(
                "head_count {heads} is not a multiple of head_count_kv {kv_heads}"
            ));
        }
        let head_dim = hidden / heads;
        if !head_dim.is_multiple_of(2) {
            return Err(format!("the head dimension {head_dim} is odd; RoPE rotates pairs"));
        }
        let rope_base = real(meta, &key("rope.freq_base"), 10_000.0)?;
        if rope_base <= 0.0 {
            return Err("rope.freq_base must be positive".into());
        }
        let embed = tensor(meta, "token_embd.weight")?;
        let vocab = match embed.dims[..] {
            [_, rows] => usize::try_from(rows).map_err(|_| "the vocabulary does not fit in memory".to_string())?,
            _ => return Err("tensor token_embd.weight is not a matrix".into()),
        };
        let shape = EngineShape {
            hidden,
            intermediate: count(meta, &key("feed_forward_length"), None, MAX_WIDTH)?,
            layers: count(meta, &key("block_count"), None, MAX_LAYERS)?,
            heads,
            kv_heads,
            head_dim,
            vocab,
            context: count(meta, &key("context_length"), Some(2048), MAX_CONTEXT)?,
            rope_base,
            rms_eps: real(meta, &key("attention.layer_norm_rms_epsilon"), 1e-5)?,
        };
        shape.check_tensors(meta)?;
        Ok(shape)
    }

    /// The shape of a checkpoint described by a validated `config.json`.
    pub fn from_config(c: &crate::llama::LlamaConfig) -> EngineShape {
        EngineShape {
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim(),
            vocab: c.vocab_size,
            context: c.max_position_embeddings,
            rope_base: c.rope_theta as f32,
            rms_eps: c.rms_norm_eps as f32,
        }
    }

    /// Every tensor the engine reads: present, a supported type, and the shape this model needs
    /// (ggml order: the contiguous dimension first).
    fn check_tensors(&self, meta: &Metadata) -> Result<(), String> {
        // cannot overflow: kv_heads <= heads, so kv_heads * head_dim <= hidden <= MAX_WIDTH.
        let (h, f, kv) = (
            self.hidden as u64,
            self.intermediate as u64,
            (self.kv_heads * self.head_dim) as u64,
        );
        let matrix = |name: &str, cols: u64, rows: Option<u64>| -> Result<(), String> {
            let t = tensor(meta, name)?;
            if !matches!(t.kind, GGML_Q4_1 | GGML_Q8_0) {
                return Err(format!(
                    "tensor {name} has type {}; matrices must be Q4_1 or Q8_0",
                    t.kind
                ));
            }
            match (&t.dims[..], rows) {
                ([c, _], None) if *c == cols => Ok(()),
                ([c, r], Some(rows)) if *c == cols && *r == rows => Ok(()),
                (dims, _) => Err(format!(
                    "tensor {name} has shape {dims:?}; this model needs [{cols}, {}]",
                    rows.map_or("vocabulary".into(), |r| r.to_string())
                )),
            }
        };
        let vector = |name: &str| -> Result<(), String> {
            let t = tensor(meta, name)?;
            if !matches!(t.kind, GGML_F32 | GGML_F16) {
                return Err(format!("tensor {name} has type {}; norms must be F32 or F16", t.kind));
            }
            if t.dims[..] != [h] {
                return Err(format!("tensor {name} has shape {:?}; this model needs [{h}]", t.dims));
            }
            Ok(())
        };
        matrix("token_embd.weight", h, None)?;
        if meta.tensors.iter().any(|t| t.name == "output.weight") {
            matrix("output.weight", h, Some(self.vocab as u64))?;
        }
        vector("output_norm.weight")?;
        for i in 0..self.layers {
            let b = |n: &str| format!("blk.{i}.{n}");
            vector(&b("attn_norm.weight"))?;
            vector(&b("ffn_norm.weight"))?;
            matrix(&b("attn_q.weight"), h, Some(h))?;
            matrix(&b("attn_k.weight"), h, Some(kv))?;
            matrix(&b("attn_v.weight"), h, Some(kv))?;
            matrix(&b("attn_output.weight"), h, Some(h))?;
            matrix(&b("ffn_gate.weight"), h, Some(f))?;
            matrix(&b("ffn_up.weight"), h, Some(f))?;
            matrix(&b("ffn_down.weight"), f, Some(h))?;
        }
        Ok(())
    }
}

fn tensor<'a>(meta: &'a Metadata, name: &str) -> Result<&'a TensorInfo, String> {
    meta.tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("tensor {name} is missing"))
}
