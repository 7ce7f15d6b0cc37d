//! Adapter of the tokenize operator: kept documents and tagged texts of a unit -> `tokens`.

use super::{OutputTable, Stage, StageBatch, UnitInput, UnitStage, Upstream, unit_session};
use crate::config::{Lazy, resolve};
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_model::{TextTokenizer, TokenizerOptions};
use safepipe_operators::tokenize::{select_for_training, tokenize_batch};
use safepipe_operators::{UnitCounts, schema};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

pub struct TokenizeStage {
    settings: TokenizeSettings,
}

impl TokenizeStage {
    pub fn new(settings: TokenizeSettings) -> Self {
        TokenizeStage { settings }
    }
}

impl Stage for TokenizeStage {
    fn name(&self) -> &'static str {
        "tokenize"
    }

    /// With the synthesize stage in the graph, its kept rows are tokenized too.
    fn reads(&self) -> &'static [Upstream] {
        &[
            Upstream::Required("ingest"),
            Upstream::Required("route"),
            Upstream::Required("tag"),
            Upstream::Optional("synthesize"),
        ]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![OutputTable {
            name: "tokens",
            schema: schema::TOKENS.clone(),
        }]
    }

    /// The tokenizer's identity is the hash of its full JSON (vocabulary, merges, the tag and
    /// the pre-tokenizer), not its path: moving the file reruns nothing, editing it reruns all.
    fn settings(&self) -> Result<serde_json::Value> {
        let t = self.settings.tokenizer.get()?;
        // `text`: special-token strings in texts are encoded as text, the tag only at inserted tags.
        Ok(serde_json::json!({ "tokenizer": t.hash(), "eos_id": t.eos_id(), "specials": "text" }))
    }
}

impl UnitStage for TokenizeStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let tokenizer = self.settings.tokenizer.clone();
        futures::stream::once(async move {
            let with_synthetic = input.has("synthesize");
            let tokenizer = tokenizer.get()?.clone();
            let mut wanted = vec![
                ("ingest", "documents", schema::DOCUMENTS.clone()),
                ("route", "routes", schema::ROUTES.clone()),
                ("tag", "tagged", schema::TAGGED.clone()),
            ];
            if with_synthetic {
                wanted.push(("synthesize", "synthetic", schema::SYNTHETIC.clone()));
            }
            let ctx = unit_session(&input, &wanted).await?;
            let rows = ctx
                .sql(&select_for_training(with_synthetic))
                .await?
                .execute_stream()
                .await?;
            let batches = rows.and_then(move |batch| {
                let tokenizer = tokenizer.clone();
                async move {
                    // Encoding is CPU-bound work on rayon's pool: keep it off the async threads.
                    let tokens = tokio::task::spawn_blocking(move || tokenize_batch(&tokenizer, &batch))
                        .await
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?
                        .map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
                    Ok(tokens)
                }
            });
            let batches = batches.map(|tokens| {
                let tokens = tokens?;
                let n = tokens.num_rows() as u64;
                Ok::<_, Error>(StageBatch {
                    tables: vec![("tokens", tokens)],
                    counts: UnitCounts {
                        rows_in: n,
                        rows_out: n,
                        ..Default::default()
                    },
                })
            });
            Ok::<_, Error>(batches.boxed())
        })
        .try_flatten()
        .boxed()
    }
}

// ---- `[tokenize]`: the config section of this stage.

/// `[tokenize]`: present = the tokenize stage runs.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// A `.gguf` model (its tokenizer metadata is used) or a `tokenizer.json`.
    pub tokenizer: String,
    /// Appended after every document; must be in the vocabulary.
    #[serde(default = "default_eos")]
    pub eos: String,
}

fn default_eos() -> String {
    "<|endoftext|>".into()
}

/// The tokenize stage's settings; the tokenizer is loaded on first use.
#[derive(Debug, Clone)]
pub struct TokenizeSettings {
    pub path: String,
    pub tokenizer: Lazy<Arc<TextTokenizer>>,
}

impl TokenizeConfig {
    /// Resolves the tokenizer's path against the config's folder `dir`; the tokenizer (with the
    /// harmfulness tag `tag` as a special token) is loaded on first use. `shown` names the
    /// config file in errors.
    pub fn settings(self, dir: &Path, shown: &str, tag: &str) -> TokenizeSettings {
        let file = resolve(dir, &self.tokenizer);
        let options = TokenizerOptions {
            eos: self.eos.clone(),
            tag: Some(tag.to_string()),
        };
        let (key, at, shown) = (self.tokenizer.clone(), file.clone(), shown.to_string());
        let tokenizer = Lazy::new(move || {
            if !Path::new(&at).exists() {
                return Err(format!(
                    "{shown}: tokenize.tokenizer = {key:?}: {at} does not exist (`make setup` fetches the \
                     SmolLM2 model into models/)"
                ));
            }
            TextTokenizer::load(Path::new(&at), &options)
                .map(Arc::new)
                .map_err(|e| format!("{shown}: tokenize.tokenizer: {e}"))
        });
        TokenizeSettings { path: file, tokenizer }
    }
}
