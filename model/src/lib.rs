//! ML runtimes of safepipe, knowing nothing of stages or files in a run directory:
//!
//! - [`gguf`]: the metadata of GGUF model files (the tokenizer and hyper-parameters live there);
//! - [`tokenizer`]: the pretraining tokenizer with the harmfulness tag as one special token;
//! - [`llama`]: the SmolLM2 model family with its CPU reference backend (forward + backward);
//! - [`train`]: AdamW, schedules, checkpoints;
//! - [`collective`]: reductions across data-parallel ranks (threads, or processes over TCP with an
//!   authenticated rendezvous);
//! - [`classifier`]: the safety classifier (ONNX through `ort`), chunked max scoring, and the
//!   training of its linear head;
//! - [`llm`]: text generation: one inference engine for GGUF models and our checkpoints (KV
//!   cache, continuous batching, beam search and Safe Beam Search), the OpenAI-compatible HTTP
//!   client, the request cache.
//! - [`cuda`]: the CUDA backend's foundation: finding the CUDA libraries, our kernels compiled
//!   by NVRTC for the GPU's architecture, opening a device (the GPU trainer builds on it).

pub mod classifier;
pub mod collective;
pub mod cuda;
pub mod gguf;
pub mod llama;
pub mod llm;
pub mod rng;
pub mod tokenizer;
pub mod train;

pub use tokenizer::{TextTokenizer, TokenizerError, TokenizerOptions};
