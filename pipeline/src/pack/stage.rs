//! The pack stage as the graph sees it: its config section (`[pack]`), its declaration
//! ([`PackStage`]: reads every unit's `tokens`, writes `shards`, global scope) and the settings in
//! its fingerprint.

use crate::config::valid_name;
use crate::error::Result;
use crate::stages::{OutputTable, Stage, Upstream};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// `[pack]`: present = the global mix & pack stage runs (it reads `tokenize`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PackConfig {
    /// Tokens per training sequence; rows hold `seq_len + 1` (inputs and shifted targets).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Seeds document selection and the shuffle.
    #[serde(default)]
    pub seed: u64,
    /// Sequences per shard file.
    #[serde(default = "default_shard_sequences")]
    pub shard_sequences: usize,
    /// Weight mode only: tokens to pack (default: as many as the mixture allows without
    /// exceeding any source's `max_epochs`).
    #[serde(default)]
    pub total_tokens: Option<u64>,
    /// Memory per shuffle bucket; the shuffle spills `tokens` into buckets of this size.
    #[serde(default = "default_bucket_bytes")]
    pub bucket_bytes: u64,
    /// Local directory for the shuffle's spill files (default: the system temp directory).
    #[serde(default)]
    pub spill_dir: Option<String>,
    /// The mixture; default: one source per kind present, each taken once.
    #[serde(default)]
    pub mix: Vec<MixSourceConfig>,
}

fn default_seq_len() -> usize {
    2048
}
fn default_shard_sequences() -> usize {
    8192
}
fn default_bucket_bytes() -> u64 {
    64 << 20
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MixSourceConfig {
    pub name: String,
    /// `tokens.kind` values this source takes (default: `[name]`).
    #[serde(default)]
    pub kinds: Vec<String>,
    pub weight: Option<f64>,
    pub epochs: Option<f64>,
    #[serde(default = "one")]
    pub max_epochs: f64,
}

fn one() -> f64 {
    1.0
}

impl PackConfig {
    /// Checks the values serde cannot (ranges, the mixture's names, kinds and weights).
    pub fn check(&self) -> std::result::Result<(), String> {
        let pack = self;
        if !(1..=1 << 20).contains(&pack.seq_len) {
            return Err(format!("pack.seq_len = {} must be between 1 and 1048576", pack.seq_len));
        }
        if pack.shard_sequences == 0 {
            return Err("pack.shard_sequences must be at least 1".into());
        }
        if pack.bucket_bytes < 1 << 20 {
            return Err(format!(
                "pack.bucket_bytes = {} is too small; use at least 1048576",
                pack.bucket_bytes
            ));
        }
        let mut names = BTreeSet::new();
        for (i, m) in pack.mix.iter().enumerate() {
            if !valid_name(&m.name) || !names.insert(m.name.as_str()) {
                return Err(format!(
                    "pack.mix[{i}].name = {:?} must be a unique name (letters, digits, '_', '-', '.')",
                    m.name
                ));
            }
            for (key, value) in [
                ("weight", m.weight),
                ("epochs", m.epochs),
                ("max_epochs", Some(m.max_epochs)),
            ] {
                if let Some(v) = value
                    && !(v.is_finite() && v >= 0.0)
                {
                    return Err(format!("pack.mix[{i}].{key} = {v} must be a number >= 0"));
                }
            }
            if m.weight.is_some() && m.epochs.is_some() {
                return Err(format!(
                    "pack.mix[{i}]: give `weight` (a token fraction) or `epochs` (passes), not both"
                ));
            }
        }
        let mut kinds: BTreeMap<&str, &str> = BTreeMap::new();
        for m in &pack.mix {
            let own = if m.kinds.is_empty() {
                std::slice::from_ref(&m.name)
            } else {
                m.kinds.as_slice()
            };
            for k in own {
                if let Some(other) = kinds.insert(k, &m.name) {
                    return Err(format!(
                        "pack.mix: kind {k:?} is in both {other:?} and {:?}; a kind belongs to one source",
                        m.name
                    ));
                }
            }
        }
        let weighted = pack.mix.iter().filter(|m| m.weight.is_some()).count();
        if weighted != 0 && weighted != pack.mix.len() {
            return Err("pack.mix: give every source a weight, or none (then each takes `epochs` passes)".into());
        }
        if weighted != 0 && pack.mix.iter().filter_map(|m| m.weight).sum::<f64>() <= 0.0 {
            return Err("pack.mix: the weights sum to 0".into());
        }
        Ok(())
    }
}

/// The global pack stage's declaration; [`super::run_global`] runs it.
pub struct PackStage {
    config: PackConfig,
}

impl PackStage {
    pub fn new(config: PackConfig) -> Self {
        PackStage { config }
    }
}

impl Stage for PackStage {
    fn name(&self) -> &'static str {
        super::STAGE
    }

    fn reads(&self) -> &'static [Upstream] {
        &[Upstream::Required("tokenize")]
    }

    /// `shards`; its `input_ids` are `uint16` instead when the vocabulary fits (the manifest's
    /// `id_type`, known once the tokenizer is loaded).
    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "shards",
            schema: safepipe_operators::schema::shards_schema(arrow::datatypes::DataType::UInt32),
        }]
    }

    /// What changes the shards (the spill location and bucket size do not).
    fn settings(&self) -> Result<serde_json::Value> {
        let pack = &self.config;
        Ok(serde_json::json!({
            "seq_len": pack.seq_len, "seed": pack.seed, "shard_sequences": pack.shard_sequences,
            "total_tokens": pack.total_tokens,
            "mix": pack.mix.iter().map(|m| serde_json::json!([m.name, m.kinds, m.weight, m.epochs, m.max_epochs])).collect::<Vec<_>>(),
        }))
    }
}
