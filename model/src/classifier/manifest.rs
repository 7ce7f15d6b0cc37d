//! The model manifest: a TOML file beside a classifier that says how to run it, so any
//! BERT/gte/e5/arctic-style ONNX export plugs in by path (docs/classifier.md has the keys).
//!
//! Two shapes are supported:
//! - a **sequence-classification export** whose output is already the logits (`output_kind =
//!   "logits"`), e.g. the paper's `locuslab/safety-classifier_gte-*` exported by
//!   `model/export/export_classifier.py`;
//! - an **encoder** (`output_kind = "hidden_states"` or `"pooled"`) plus a linear head in a
//!   safetensors file (`[head] path`), e.g. the demo MiniLM with the head that
//!   `safepipe classifier train` fits.
//!
//! Paths are relative to the manifest's directory. [`Manifest::load`] checks everything that can
//! be checked without loading the model.

use super::{ClassifierError, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the encoder's output becomes one vector per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The mean over the chunk's attended positions (sentence-transformers' default).
    #[default]
    Mean,
    /// The first position (`[CLS]`).
    Cls,
}

/// What the ONNX output named [`Manifest::output`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `[batch, seq, hidden]`: pooled here, then the head.
    #[default]
    HiddenStates,
    /// `[batch, hidden]`: the head is applied directly.
    Pooled,
    /// `[batch, labels]`: the classifier's logits; no head.
    Logits,
}

/// Names of the model's inputs. `token_type_ids` is optional (gte and e5 exports may lack it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inputs {
    #[serde(default = "default_input_ids")]
    pub input_ids: String,
    #[serde(default = "default_attention_mask")]
    pub attention_mask: String,
    #[serde(default)]
    pub token_type_ids: Option<String>,
}

fn default_input_ids() -> String {
    "input_ids".into()
}
fn default_attention_mask() -> String {
    "attention_mask".into()
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs {
            input_ids: default_input_ids(),
            attention_mask: default_attention_mask(),
            token_type_ids: None,
        }
    }
}

/// The linear head over pooled embeddings: `logits = W x + b`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    /// A safetensors file with `classifier.weight` `[labels, hidden]` and `classifier.bias`.
    pub path: PathBuf,
    /// L2-normalise the pooled embedding before the head (sentence-transformers models do).
    #[serde(default)]
    pub normalize: bool,
}

/// A classifier manifest (`classifier.toml`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The model id written to `scores.model` (with the precision appended).
    pub name: String,
    /// The fp32 ONNX file.
    pub onnx: PathBuf,
    /// A dynamically quantised copy used by `precision = "int8"` (optional).
    #[serde(default)]
    pub onnx_int8: Option<PathBuf>,
    /// A Hugging Face `tokenizer.json`; its own padding and truncation settings are ignored.
    pub tokenizer: PathBuf,
    /// Tokens per chunk, special tokens included (the model's sequence length).
    pub max_length: usize,
    #[serde(default)]
    pub inputs: Inputs,
    /// The ONNX output to read.
    pub output: String,
    #[serde(default)]
    pub output_kind: OutputKind,
    #[serde(default)]
    pub pooling: Pooling,
    /// The score of each label, in label order (the paper's classifier: `[0, 1, 2, 3, 4, 5]`).
    pub scores: Vec<u8>,
    /// The head, required unless `output_kind = "logits"`.
    #[serde(default)]
    pub head: Option<HeadSpec>,
}

impl Manifest {
    /// Reads and checks a classifier manifest (logits, or an encoder with its head).
    pub fn load(path: &Path) -> Result<Manifest> {
        Self::read(path, true)
    }

    /// Reads and checks an encoder manifest: an encoder output, a head optional (the input of
    /// `safepipe classifier train`).
    pub fn load_encoder(path: &Path) -> Result<Manifest> {
        Self::read(path, false)
    }

    /// Reads `path`, resolving the file names against its directory.
    fn read(path: &Path, need_head: bool) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| ClassifierError::Io {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let mut manifest: Manifest = toml::from_str(&text).map_err(|e| ClassifierError::Manifest {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        manifest.resolve(dir);
        manifest.check(need_head).map_err(|detail| ClassifierError::Manifest {
            path: path.display().to_string(),
            detail,
        })?;
        Ok(manifest)
    }

    fn resolve(&mut self, dir: &Path) {
        self.onnx = dir.join(&self.onnx);
        self.onnx_int8 = self.onnx_int8.as_ref().map(|p| dir.join(p));
        self.tokenizer = dir.join(&self.tokenizer);
        if let Some(head) = &mut self.head {
            head.path = dir.join(&head.path);
        }
    }

    /// The number of labels.
    pub fn labels(&self) -> usize {
        self.scores.len()
    }

    fn check(&self, need_head: bool) -> std::result::Result<(), String> {
        if self.max_length < 3 {
            return Err(format!("max_length = {} is too small (at least 3)", self.max_length));
        }
        if self.scores.len() < 2 {
            return Err("scores must list the score of every label (at least 2)".into());
        }
        match (self.output_kind, &self.head) {
            (OutputKind::Logits, Some(_)) => {
                return Err("output_kind = \"logits\" has no [head]: the output already is the logits".into());
            }
            (OutputKind::Logits, None) if !need_head => {
                return Err(
                    "output_kind = \"logits\": this is a classifier, not an encoder; there is no head to train".into(),
                );
            }
            (OutputKind::HiddenStates | OutputKind::Pooled, None) if need_head => {
                return Err("an encoder output needs a [head] (a linear head in safetensors)".into());
            }
            _ => {}
        }
        for file in [
            Some(&self.onnx),
            Some(&self.tokenizer),
            self.head.as_ref().map(|h| &h.path),
        ]
        .into_iter()
        .flatten()
        {
            if !file.is_file() {
                return Err(format!(
                    "{} does not exist (run `make setup`, or fix the path)",
                    file.display()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logits_models_take_no_head_and_encoders_need_one() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["m.onnx", "tokenizer.json", "head.safetensors"] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let write = |body: &str| {
            let p = dir.path().join("classifier.toml");
            std::fs::write(&p, body).unwrap();
            Manifest::load(&p)
        };
        let base = "name = \"m\"\nonnx = \"m.onnx\"\ntokenizer = \"tokenizer.json\"\nmax_length = 512\nscores = [0, 1, 2, 3, 4, 5]\n";
        let ok = write(&format!("{base}output = \"logits\"\noutput_kind = \"logits\"\n")).unwrap();
        assert_eq!(ok.labels(), 6);
        assert_eq!(ok.onnx, dir.path().join("m.onnx"));
        let err = write(&format!("{base}output = \"last_hidden_state\"\n")).unwrap_err();
        assert!(err.to_string().contains("needs a [head]"), "{err}");
        let err = write(&format!(
            "{base}output = \"logits\"\noutput_kind = \"logits\"\n[head]\npath = \"head.safetensors\"\n"
        ))
        .unwrap_err();
        assert!(err.to_string().contains("has no [head]"), "{err}");
        let err =
            write(&format!("{base}output = \"logits\"\noutput_kind = \"logits\"\n").replace("m.onnx", "missing.onnx"))
                .unwrap_err();
        assert!(err.to_string().contains("missing field") || err.to_string().contains("does not exist"));
        assert!(err.to_string().contains("missing.onnx does not exist"), "{err}");
    }
}
