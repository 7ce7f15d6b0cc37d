//! ML runtimes of safepipe, knowing nothing of stages or files in a run directory:
//!
//! - [`gguf`]: the metadata of GGUF model files (the tokenizer and hyper-parameters live there);
//! - [`tokenizer`]: the pretraining tokenizer with the harmfulness tag as one special token.
//!
//! The classifier (ONNX through `ort`), the language model and the trainer come with their
//! issues (docs/ROADMAP.md).

pub mod gguf;
pub mod tokenizer;

pub use tokenizer::{TextTokenizer, TokenizerError, TokenizerOptions};
