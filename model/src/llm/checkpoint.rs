//! Loading a Hugging Face Llama checkpoint directory for the engine: what `safepipe train`
//! writes (`config.json`, `model.safetensors`, `tokenizer.json`), or any Llama checkpoint with
//! tied embeddings in one safetensors file.
//!
//! - Weights in F32, BF16 or F16 become f32 ([`Matrix::Dense`]), or Q8_0 blocks when asked
//!   (every matrix width must then be a multiple of 32).
//! - Q and K rows are reordered for the engine's adjacent-pair RoPE
//!   ([`interleave_rope_rows`]): the logits equal the trainer's rotate-half forward to float
//!   rounding (1e-4 in the tests). An `lm_head.weight` is used as the output projection when
//!   present; `rope_scaling` is refused.
//! - The tokenizer is `tokenizer.json` beside the weights; its end-of-text token is the
//!   config's `eos_token_id` (the engine finds the tag among its special tokens).
//! - The chat template is `tokenizer_config.json`'s `chat_template` when there is one; else a
//!   plain one (the messages' text, one blank line apart, no markers): a pretrained model
//!   continues its prompt as text.
//!
//! Every size is checked against `config.json`'s validated bounds and against the file before
//! anything is allocated from it: a hostile checkpoint is an error naming the tensor.

use super::chat::ChatTemplate;
use super::engine::Parts;
use super::quant::{QMatrix, f16_to_f32};
use super::shape::EngineShape;
use super::weights::{Layer, Matrix, Weights, interleave_rope_rows};
use crate::llama::LlamaConfig;
use crate::tokenizer::{TextTokenizer, TokenizerOptions};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// How to hold a checkpoint's matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32, as trained: logits equal the trainer's forward.
    #[default]
    F32,
    /// Q8_0 blocks (about 3.8x less memory, integer products; logits close to f32's).
    Q8_0,
}

impl Precision {
    pub fn parse(name: &str) -> Result<Precision, String> {
        match name {
            "f32" => Ok(Precision::F32),
            "q8_0" => Ok(Precision::Q8_0),
            other => Err(format!("precision {other:?}: expected \"f32\" or \"q8_0\"")),
        }
    }
}

/// Used when a checkpoint has no chat template: the messages' text, a blank line apart.
const PLAIN: &str =
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endfor %}";

/// The file whose bytes identify the model at `path`: the GGUF itself, or a checkpoint
/// directory's `model.safetensors`.
pub fn weights_file(path: &Path) -> PathBuf {
    if path.is_dir() {
        resolve(path).join("model.safetensors")
    } else {
        path.to_path_buf()
    }
}

/// The checkpoint `path` names: itself, or the one its `latest` file names when `path` is a
/// training run's `checkpoint_dir` (no `config.json`, a `latest` file).
pub fn resolve(path: &Path) -> PathBuf {
    if path.join("config.json").exists() {
        return path.to_path_buf();
    }
    match std::fs::read_to_string(path.join("latest")) {
        Ok(name) if !name.trim().is_empty() && !name.contains(['/', '\\']) => path.join(name.trim()),
        _ => path.to_path_buf(),
    }
}

/// Reads the checkpoint directory `dir` (or the latest checkpoint of a training run's folder,
/// [`resolve`]).
pub fn load(dir: &Path, precision: Precision) -> Result<Parts, String> {
    let dir = &resolve(dir);
    let at = |name: &str| dir.join(name);
    let read = |name: &str| std::fs::read(at(name)).map_err(|e| format!("cannot read {}: {e}", at(name).display()));
    let json: serde_json::Value =
        serde_json::from_slice(&read("config.json")?).map_err(|e| format!("{}: {e}", at("config.json").display()))?;
    let config = LlamaConfig::from_hf_json(&json).map_err(|e| format!("{}: {e}", at("config.json").display()))?;
    if !at("model.safetensors").exists() && at("model.safetensors.index.json").exists() {
        return Err(format!(
            "{}: sharded checkpoints (model.safetensors.index.json) are not supported; merge the shards into one model.safetensors",
            dir.display()
        ));
    }
    let bytes = read("model.safetensors")?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", at("model.safetensors").display()))?;
    let err = |e: String| format!("{}: {e}", at("model.safetensors").display());
    let (d, f, kv, hd) = (
        config.hidden_size,
        config.intermediate_size,
        config.kv_dim(),
        config.head_dim(),
    );
    let values = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
        let view = file
            .tensor(name)
            .map_err(|_| err(format!("tensor {name} is missing")))?;
        if view.shape() != shape {
            return Err(err(format!(
                "tensor {name} has shape {:?}; config.json needs {shape:?}",
                view.shape()
            )));
        }
        let data = view.data();
        Ok(match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                // cannot fail: chunks_exact(4) yields 4-byte slices.
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]])))
                .collect(),
            other => return Err(err(format!("tensor {name} is {other:?}; F32, BF16 or F16 are read"))),
        })
    };
    let matrix = |w: Vec<f32>, rows: usize, cols: usize, name: &str| -> Result<Matrix, String> {
        match precision {
            Precision::F32 => Ok(Matrix::Dense { rows, cols, w }),
            Precision::Q8_0 => QMatrix::quantize_q8_0(rows, cols, &w)
                .map(Matrix::Quantized)
                .map_err(|e| err(format!("tensor {name}: {e}"))),
        }
    };
    let linear = |name: &str, rows: usize, cols: usize| matrix(values(name, &[rows, cols])?, rows, cols, name);
    let embed_name = "model.embed_tokens.weight";
    let embed = matrix(
        values(embed_name, &[config.vocab_size, d])?,
        config.vocab_size,
        d,
        embed_name,
    )?;
    let mut layers = Vec::with_capacity(config.num_hidden_layers);
    for i in 0..config.num_hidden_layers {
        let n = |s: &str| format!("model.layers.{i}.{s}");
        let rope = |name: String, rows: usize| -> Result<Matrix, String> {
            let w = interleave_rope_rows(&values(&name, &[rows, d])?, hd, d);
            matrix(w, rows, d, &name)
        };
        layers.push(Layer {
            attn_norm: values(&n("input_layernorm.weight"), &[d])?,
            ffn_norm: values(&n("post_attention_layernorm.weight"), &[d])?,
            q: rope(n("self_attn.q_proj.weight"), d)?,
            k: rope(n("self_attn.k_proj.weight"), kv)?,
            v: linear(&n("self_attn.v_proj.weight"), kv, d)?,
            o: linear(&n("self_attn.o_proj.weight"), d, d)?,
            gate: linear(&n("mlp.gate_proj.weight"), f, d)?,
            up: linear(&n("mlp.up_proj.weight"), f, d)?,
            down: linear(&n("mlp.down_proj.weight"), d, f)?,
        });
    }
    let norm = values("model.norm.weight", &[d])?;
    // A checkpoint whose config leaves `tie_word_embeddings` out (Hugging Face then unties) may
    // carry its own output projection: use it rather than the embedding.
    let output = match file.tensor("lm_head.weight") {
        Ok(_) => Some(linear("lm_head.weight", config.vocab_size, d)?),
        Err(_) => None,
    };
    drop(file);
    drop(bytes);

    let tokenizer_text = String::from_utf8(read("tokenizer.json")?)
        .map_err(|_| format!("{} is not UTF-8", at("tokenizer.json").display()))?;
    let tokenizer_json: serde_json::Value = serde_json::from_str(&tokenizer_text)
        .map_err(|e| format!("{}: not a tokenizer.json: {e}", at("tokenizer.json").display()))?;
    let eos_id = json.get("eos_token_id").and_then(serde_json::Value::as_u64);
    let eos = eos_id
        .and_then(|id| token_content(&tokenizer_json, id))
        .unwrap_or_else(|| "<|endoftext|>".to_string());
    let tokenizer =
        TextTokenizer::load(&at("tokenizer.json"), &TokenizerOptions { eos, tag: None }).map_err(|e| e.to_string())?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(format!(
            "{}: the tokenizer has {} tokens but the model only {} rows",
            dir.display(),
            tokenizer.vocab_size(),
            config.vocab_size
        ));
    }
    let template = match std::fs::read(at("tokenizer_config.json")) {
        Ok(raw) => {
            let tc: serde_json::Value =
                serde_json::from_slice(&raw).map_err(|e| format!("{}: {e}", at("tokenizer_config.json").display()))?;
            let text = |k: &str| tc.get(k).and_then(serde_json::Value::as_str).unwrap_or("").to_string();
            match tc.get("chat_template").and_then(serde_json::Value::as_str) {
                Some(source) => ChatTemplate::new(source, &text("bos_token"), &text("eos_token")).map_err(|e| {
                    format!(
                        "{}: its chat template does not render: {e}",
                        at("tokenizer_config.json").display()
                    )
                })?,
                None => ChatTemplate::new(PLAIN, "", "")?,
            }
        }
        Err(_) => ChatTemplate::new(PLAIN, "", "")?,
    };
    let digest = crate::classifier::file_digest(&at("model.safetensors")).map_err(|e| e.to_string())?;
    let stem = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "checkpoint".into());
    let suffix = match precision {
        Precision::F32 => "",
        Precision::Q8_0 => "+q8_0",
    };
    Ok(Parts {
        shape: EngineShape::from_config(&config),
        weights: Weights {
            embed,
            output,
            norm,
            layers,
        },
        stop_ids: vec![tokenizer.eos_id()],
        tokenizer,
        template,
        // cannot fail: `file_digest` returns 64 hex digits.
        identity: format!("{stem}@{}{suffix}", &digest[..16]),
    })
}

/// The string of token `id` in a tokenizer.json (added tokens first, then the model's vocabulary).
fn token_content(json: &serde_json::Value, id: u64) -> Option<String> {
    let added = json.get("added_tokens")?.as_array()?;
    if let Some(t) = added
        .iter()
        .find(|t| t.get("id").and_then(serde_json::Value::as_u64) == Some(id))
    {
        return t.get("content")?.as_str().map(str::to_string);
    }
    json.get("model")?
        .get("vocab")?
        .as_object()?
        .iter()
        .find(|(_, v)| v.as_u64() == Some(id))
        .map(|(k, _)| k.clone())
}
