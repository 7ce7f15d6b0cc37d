//! ML runtimes of safepipe, knowing nothing of stages or files in a run directory:
//!
//! - [`gguf`]: the metadata of GGUF model files (the tokenizer and hyper-parameters live there);
//! - [`tokenizer`]: the pretraining tokenizer with the harmfulness tag as one special token;
//! - [`llama`]: the SmolLM2 model family with its CPU reference backend (forward + backward);
//! - [`train`]: AdamW, schedules, data-parallel collectives, checkpoints.
//!
//! The classifier (ONNX through `ort`) and the CUDA backend come with their issues
//! (docs/ROADMAP.md).

pub mod gguf;
pub mod llama;
pub mod rng;
pub mod tokenizer;
pub mod train;

pub use tokenizer::{TextTokenizer, TokenizerError, TokenizerOptions};
