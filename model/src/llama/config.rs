//! Llama-family hyper-parameters (the SmolLM2 architecture), with presets, and the Hugging Face
//! `config.json` written beside checkpoints.

use serde::{Deserialize, Serialize};

/// The shape of a Llama-family model: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, no
/// biases, input and output embeddings tied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
}

/// SmolLM2's vocabulary plus the harmfulness tag (id 49152).
pub const SMOLLM2_VOCAB_WITH_TAG: usize = 49153;

impl LlamaConfig {
    /// A named preset: `smollm2-135m`, `smollm2-360m`, `smollm2-1.7b` (the published shapes, with
    /// the tag token added to the vocabulary), `tiny` and `micro` (for tests and the demo).
    pub fn preset(name: &str) -> Option<LlamaConfig> {
        let c = |hidden, inter, layers, heads, kv, theta| LlamaConfig {
            vocab_size: SMOLLM2_VOCAB_WITH_TAG,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            rope_theta: theta,
            rms_norm_eps: 1e-5,
            max_position_embeddings: 8192,
        };
        Some(match name {
            "smollm2-135m" => c(576, 1536, 30, 9, 3, 100_000.0),
            "smollm2-360m" => c(960, 2560, 32, 15, 5, 100_000.0),
            "smollm2-1.7b" => c(2048, 8192, 24, 32, 32, 130_000.0),
            "tiny" => c(64, 172, 2, 4, 2, 10_000.0),
            "micro" => LlamaConfig {
                vocab_size: 61,
                ..c(16, 24, 2, 4, 2, 10_000.0)
            },
            _ => return None,
        })
    }

    pub const PRESETS: [&'static str; 5] = ["smollm2-135m", "smollm2-360m", "smollm2-1.7b", "tiny", "micro"];

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn kv_dim(&self) -> usize {
        self.head_dim() * self.num_key_value_heads
    }

    /// Checks the shape is consistent; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} must be a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {} must be a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("the head dimension {} must be even (RoPE)", self.head_dim()));
        }
        if self.vocab_size == 0 || self.num_hidden_layers == 0 || self.intermediate_size == 0 {
            return Err("vocab_size, num_hidden_layers and intermediate_size must be positive".into());
        }
        // A config.json may come with a downloaded checkpoint: bound every size before anything
        // is allocated from it (the largest Llama models are far below these).
        for (name, value, max) in [
            ("vocab_size", self.vocab_size, 1 << 22),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            ("num_hidden_layers", self.num_hidden_layers, 1 << 10),
            ("num_attention_heads", self.num_attention_heads, 1 << 10),
            ("max_position_embeddings", self.max_position_embeddings, 1 << 24),
        ] {
            if value > max {
                return Err(format!("{name} = {value} is over the {max} this trainer accepts"));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta = {} must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return Err(format!(
                "rms_norm_eps = {} must be a non-negative number",
                self.rms_norm_eps
            ));
        }
        Ok(())
    }

    /// Parameters (embeddings counted once: they are tied). Cannot overflow on a validated
    /// config: its bounds keep the count below 2^47.
    pub fn parameter_count(&self) -> usize {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let attention = d * d * 2 + d * self.kv_dim() * 2;
        let layer = attention + 3 * d * f + 2 * d;
        self.vocab_size * d + self.num_hidden_layers * layer + d
    }

    /// Training FLOPs per token (forward + backward, 6N plus attention), for MFU.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let attention = 12.0 * self.num_hidden_layers as f64 * self.hidden_size as f64 * seq_len as f64 / 2.0;
        6.0 * self.parameter_count() as f64 + attention
    }

    /// The `config.json` `transformers` reads for `LlamaForCausalLM`.
    pub fn hf_config_json(&self, bos: u32, eos: u32) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        })
    }

    /// Reads the fields we use from a Hugging Face `config.json`.
    pub fn from_hf_json(json: &serde_json::Value) -> Result<LlamaConfig, String> {
        let int = |k: &str| {
            json.get(k)
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| format!("config.json has no integer {k}"))
        };
        let float = |k: &str, default: f64| json.get(k).and_then(serde_json::Value::as_f64).unwrap_or(default);
        if json.get("tie_word_embeddings").and_then(serde_json::Value::as_bool) == Some(false) {
            return Err("only models with tied embeddings (tie_word_embeddings = true) are supported".into());
        }
        if json.get("rope_scaling").is_some_and(|v| !v.is_null()) {
            return Err("rope_scaling is set: scaled RoPE (Llama 3.1 and later) is not supported".into());
        }
        let heads = int("num_attention_heads")?;
        let config = LlamaConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: int("num_key_value_heads").unwrap_or(heads),
            rope_theta: float("rope_theta", 10_000.0),
            rms_norm_eps: float("rms_norm_eps", 1e-5),
            max_position_embeddings: int("max_position_embeddings").unwrap_or(8192),
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_135m_has_the_published_size() {
        for name in LlamaConfig::PRESETS {
            LlamaConfig::preset(name).unwrap().validate().unwrap();
        }
        // SmolLM2-135M: 134.5M parameters with 49152 tokens; +576 for the tag row.
        let c = LlamaConfig::preset("smollm2-135m").unwrap();
        assert_eq!(c.parameter_count(), 134_515_008 + 576);
        let back = LlamaConfig::from_hf_json(&c.hf_config_json(1, 0)).unwrap();
        assert_eq!(back, c);
    }
}
