//! `[llm]`: the text-generation backend the synthesis stages share (their own sections live
//! beside their adapters, `stages/synthesize.rs`); and `safepipe generate` (prompts in, completions out, over the same
//! backends) for trying a model or a server.

use crate::error::{Error, Result};
use safepipe_model::llm::checkpoint::{self, Precision};
use safepipe_model::llm::endpoint::{credentials_at_risk, redact_url};
use safepipe_model::llm::http::{Api, HttpConfig, OpenAiClient};
use safepipe_model::llm::{
    ChatRequest, ChatTemplate, Decoder, GenerationStats, Generator, InProcess, LlamaEngine, Message, SamplingParams,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// Our engine on a GGUF file, in this process (no server needed).
    #[default]
    InProcess,
    /// An OpenAI-compatible server.
    Openai,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiKind {
    #[default]
    Chat,
    Completions,
}

/// `[llm]` as written in the config (docs/config.md). `Debug` shows the base URL redacted.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    #[serde(default)]
    pub backend: Backend,
    /// in-process: a GGUF file or a checkpoint directory (`safepipe train`'s); openai: the
    /// served model's name.
    pub model: String,
    /// in-process, checkpoint directories: `f32` (as trained) or `q8_0` (quantised at load).
    #[serde(default = "default_precision")]
    pub precision: String,
    /// in-process: sequences decoded together.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// openai: the server's base URL up to the version, e.g. `http://127.0.0.1:8080/v1`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// openai: the environment variable holding the API key (the key itself never goes in a file).
    #[serde(default = "default_key_env")]
    pub api_key_env: String,
    #[serde(default)]
    pub api: ApiKind,
    /// openai + completions: a GGUF whose chat template renders the prompts.
    #[serde(default)]
    pub chat_template: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_retries")]
    pub max_retries: u32,
    #[serde(default = "default_backoff_base")]
    pub backoff_base_s: f64,
    #[serde(default = "default_backoff_max")]
    pub backoff_max_s: f64,
    #[serde(default = "default_breaker_threshold")]
    pub breaker_threshold: u32,
    #[serde(default = "default_breaker_cooldown")]
    pub breaker_cooldown_s: f64,
    /// openai: a response body past this many bytes fails its request.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// openai: the longest wait a server's `Retry-After` can impose.
    #[serde(default = "default_max_retry_after")]
    pub max_retry_after_s: f64,
    /// openai: send the key (or the URL's credentials) over plain http to another machine.
    #[serde(default)]
    pub allow_insecure_api_key: bool,
    /// Where finished generations are recorded (default: `RUN_DIR/cache/llm`; must be a local
    /// or shared file system path).
    #[serde(default)]
    pub cache_dir: Option<String>,
}

fn default_precision() -> String {
    "f32".into()
}
fn default_max_batch() -> usize {
    8
}
fn default_key_env() -> String {
    "OPENAI_API_KEY".into()
}
fn default_timeout() -> f64 {
    120.0
}
fn default_in_flight() -> usize {
    256
}
fn default_retries() -> u32 {
    5
}
fn default_backoff_base() -> f64 {
    0.5
}
fn default_backoff_max() -> f64 {
    60.0
}
fn default_breaker_threshold() -> u32 {
    8
}
fn default_breaker_cooldown() -> f64 {
    5.0
}
fn default_max_response_bytes() -> u64 {
    safepipe_model::llm::http::DEFAULT_MAX_RESPONSE_BYTES
}
fn default_max_retry_after() -> f64 {
    60.0
}

impl std::fmt::Debug for LlmConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmConfig")
            .field("backend", &self.backend)
            .field("model", &self.model)
            .field("base_url", &self.base_url.as_deref().map(redact_url))
            .field("api_key_env", &self.api_key_env)
            .field("api", &self.api)
            .field("timeout_s", &self.timeout_s)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_retries", &self.max_retries)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("max_retry_after_s", &self.max_retry_after_s)
            .field("allow_insecure_api_key", &self.allow_insecure_api_key)
            .field("cache_dir", &self.cache_dir)
            .finish_non_exhaustive()
    }
}

/// Seconds as a `Duration` (validated finite and non-negative; absurdly large values saturate
/// at ~136 years instead of panicking).
fn secs(v: f64) -> Duration {
    Duration::try_from_secs_f64(v).unwrap_or(Duration::from_secs(u64::from(u32::MAX)))
}

impl LlmConfig {
    /// A config with defaults for `backend` and `model`.
    pub fn new(backend: Backend, model: &str) -> LlmConfig {
        let mut c: LlmConfig = toml::from_str(&format!("model = {model:?}")).expect("defaults");
        c.backend = backend;
        c
    }

    /// Checks the keys and resolves paths against the config's directory.
    pub fn validate(mut self, dir: &Path) -> std::result::Result<LlmConfig, String> {
        let resolve = |p: &str| dir.join(p).to_string_lossy().into_owned();
        match self.backend {
            Backend::InProcess => {
                self.model = resolve(&self.model);
                Precision::parse(&self.precision).map_err(|e| format!("llm.precision: {e}"))?;
                if self.max_batch == 0 {
                    return Err("llm.max_batch must be at least 1".into());
                }
            }
            Backend::Openai => {
                let url = self.base_url.as_deref().unwrap_or("");
                let parsed = url::Url::parse(url)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .ok_or_else(|| {
                        format!(
                            "llm.base_url = {:?}: the openai backend needs the server's URL, e.g. \"http://127.0.0.1:8080/v1\"",
                            redact_url(url)
                        )
                    })?;
                // The key is read from the environment now, as the client will read it.
                let key = std::env::var(&self.api_key_env).is_ok_and(|k| !k.is_empty());
                if let Some(what) = credentials_at_risk(&parsed, key)
                    && !self.allow_insecure_api_key
                {
                    let what = what.replace("the API key", &format!("the API key (${})", self.api_key_env));
                    return Err(format!(
                        "llm.base_url = {:?} is plain http to a host other than this machine: {what} would \
                         cross the network unencrypted; use https (or a loopback address), or set \
                         llm.allow_insecure_api_key = true on a network you trust",
                        redact_url(url)
                    ));
                }
                if self.api == ApiKind::Completions {
                    let t = self.chat_template.as_deref().ok_or(
                        "llm.api = \"completions\" needs llm.chat_template (a GGUF whose template renders the prompts)",
                    )?;
                    self.chat_template = Some(resolve(t));
                }
            }
        }
        for (key, v) in [
            ("timeout_s", self.timeout_s),
            ("backoff_base_s", self.backoff_base_s),
            ("backoff_max_s", self.backoff_max_s),
            ("breaker_cooldown_s", self.breaker_cooldown_s),
            ("max_retry_after_s", self.max_retry_after_s),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("llm.{key} = {v}: must be a non-negative number of seconds"));
            }
        }
        if self.max_in_flight == 0 {
            return Err("llm.max_in_flight must be at least 1".into());
        }
        if self.max_response_bytes == 0 {
            return Err("llm.max_response_bytes must be at least 1 (default 16777216, 16 MiB)".into());
        }
        Ok(self)
    }

    /// The model's identity for fingerprints: what changes generated text (the GGUF's content,
    /// or the served model and URL), never timeouts, retries or batch sizes. The URL is
    /// redacted ([`redact_url`]: no user info, secret query values replaced), so a key never
    /// lands in a fingerprint and rotating it reruns nothing; a URL without secrets is used as
    /// written, as before.
    pub fn identity(&self) -> std::result::Result<String, String> {
        match self.backend {
            Backend::InProcess => {
                let weights = checkpoint::weights_file(Path::new(&self.model));
                let digest = safepipe_model::classifier::file_digest(&weights).map_err(|e| e.to_string())?;
                // Quantising a checkpoint at load changes its outputs; a GGUF is used as stored.
                let suffix = if Path::new(&self.model).is_dir() && self.precision != "f32" {
                    format!("+{}", self.precision)
                } else {
                    String::new()
                };
                Ok(format!("in-process:{}{suffix}", &digest[..16]))
            }
            Backend::Openai => Ok(format!(
                "openai:{}@{}",
                self.model,
                redact_url(self.base_url.as_deref().unwrap_or(""))
            )),
        }
    }

    /// Loads the model or connects the client.
    pub fn build(&self) -> Result<Arc<dyn Generator>> {
        match self.backend {
            Backend::InProcess => {
                let precision = Precision::parse(&self.precision).map_err(Error::Config)?;
                let engine = LlamaEngine::load_with(Path::new(&self.model), precision)
                    .map_err(|e| Error::Config(format!("llm.model: {e}")))?;
                Ok(Arc::new(InProcess::new(engine, self.max_batch)))
            }
            Backend::Openai => {
                let template = match &self.chat_template {
                    Some(path) => {
                        let meta = safepipe_model::gguf::Metadata::read(Path::new(path))
                            .map_err(|e| Error::Config(format!("llm.chat_template: {e}")))?;
                        Some(
                            ChatTemplate::from_gguf(&meta)
                                .map_err(|e| Error::Config(format!("llm.chat_template: {e}")))?,
                        )
                    }
                    None => None,
                };
                let config = HttpConfig {
                    api_key: std::env::var(&self.api_key_env).ok().filter(|k| !k.is_empty()),
                    api: match self.api {
                        ApiKind::Chat => Api::Chat,
                        ApiKind::Completions => Api::Completions,
                    },
                    template,
                    timeout: secs(self.timeout_s),
                    max_in_flight: self.max_in_flight,
                    max_retries: self.max_retries,
                    backoff_base: secs(self.backoff_base_s),
                    backoff_max: secs(self.backoff_max_s),
                    breaker_threshold: self.breaker_threshold.max(1),
                    breaker_cooldown: secs(self.breaker_cooldown_s),
                    max_response_bytes: self.max_response_bytes,
                    max_retry_after: secs(self.max_retry_after_s),
                    allow_insecure_api_key: self.allow_insecure_api_key,
                    ..HttpConfig::new(self.base_url.as_deref().unwrap_or(""), &self.model)
                };
                Ok(Arc::new(
                    OpenAiClient::new(config).map_err(|e| Error::Config(format!("llm: {e}")))?,
                ))
            }
        }
    }
}

/// A progress line's numbers: tokens/s, in flight, retries, failures (and cache hits, added by
/// the caller).
pub fn progress_message(stats: &GenerationStats, started: Instant, cache_hits: u64) -> String {
    let tokens = GenerationStats::get(&stats.completion_tokens);
    format!(
        "{:.0} tok/s, {} in flight, {} retries, {} failed, {} cached",
        tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        GenerationStats::get(&stats.in_flight),
        GenerationStats::get(&stats.retries),
        GenerationStats::get(&stats.failures),
        cache_hits
    )
}

/// `safepipe generate`'s options.
#[derive(Debug, clap::Args)]
pub struct GenerateFlags {
    /// A GGUF file (in-process engine), or the served model's name with --server.
    #[arg(long, required_unless_present = "checkpoint", conflicts_with = "checkpoint")]
    model: Option<String>,
    /// A checkpoint directory written by `safepipe train` (config.json, model.safetensors,
    /// tokenizer.json), or any Hugging Face Llama checkpoint with tied embeddings.
    #[arg(long, conflicts_with = "server")]
    checkpoint: Option<PathBuf>,
    /// Checkpoints: `f32` (as trained) or `q8_0` (quantised at load).
    #[arg(long, default_value = "f32")]
    precision: String,
    /// An OpenAI-compatible server's base URL (e.g. http://127.0.0.1:8080/v1); default: run
    /// the model in this process.
    #[arg(long)]
    server: Option<String>,
    /// Sequences decoded together (in-process) or requests in flight (server).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// How tokens are chosen: `sample` (greedy at --temperature 0, the default), `greedy`,
    /// `beam` (--beams) or `safe-beam` (--beams, --candidates; the model needs the tag token).
    #[arg(long, default_value = "sample")]
    decoder: String,
    #[arg(long, default_value_t = 4)]
    beams: usize,
    /// Safe Beam Search: next tokens looked past per beam (half of all are discarded).
    #[arg(long, default_value_t = 8)]
    candidates: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    system: Option<String>,
    /// Prompts (user messages; a checkpoint without a chat template continues them as text);
    /// `-` reads one JSON string per line from stdin.
    #[arg(required = true)]
    pub prompts: Vec<String>,
}

impl GenerateFlags {
    /// The decoder and temperature the flags ask for.
    fn decoder(&self) -> Result<(Decoder, f32)> {
        let decoder = match self.decoder.as_str() {
            "sample" => Decoder::Sample,
            "greedy" => return Ok((Decoder::Sample, 0.0)),
            "beam" => Decoder::Beam { beams: self.beams },
            "safe-beam" => Decoder::SafeBeam {
                beams: self.beams,
                candidates: self.candidates,
            },
            other => {
                return Err(Error::Config(format!(
                    "--decoder {other:?}: expected sample, greedy, beam or safe-beam"
                )));
            }
        };
        decoder
            .validate()
            .map_err(|e| Error::Config(format!("--decoder: {e}")))?;
        Ok((decoder, self.temperature))
    }
}

/// Runs `safepipe generate`: one JSON object per prompt on stdout (in prompt order), a summary
/// with tokens/s on stderr.
pub fn generate(flags: GenerateFlags, prompts: Vec<String>) -> Result<()> {
    let (decoder, temperature) = flags.decoder()?;
    let model = match (&flags.model, &flags.checkpoint) {
        (_, Some(dir)) => dir.to_string_lossy().into_owned(),
        (Some(model), None) => model.clone(),
        // cannot happen: clap requires one of the two.
        (None, None) => return Err(Error::Config("--model or --checkpoint is required".into())),
    };
    let mut config = match &flags.server {
        Some(url) => LlmConfig {
            base_url: Some(url.clone()),
            max_in_flight: flags.batch.max(1),
            ..LlmConfig::new(Backend::Openai, &model)
        },
        None => LlmConfig {
            max_batch: flags.batch.max(1),
            precision: flags.precision.clone(),
            ..LlmConfig::new(Backend::InProcess, &model)
        },
    };
    config = config.validate(&PathBuf::from(".")).map_err(Error::Config)?;
    let generator = config.build()?;
    let requests: Vec<ChatRequest> = prompts
        .iter()
        .map(|p| {
            let mut messages = Vec::new();
            if let Some(system) = &flags.system {
                messages.push(Message::new("system", system.clone()));
            }
            messages.push(Message::new("user", p.clone()));
            ChatRequest {
                messages,
                prefill: String::new(),
                params: SamplingParams {
                    max_tokens: flags.max_tokens,
                    temperature,
                    top_p: flags.top_p,
                    stop: Vec::new(),
                    seed: flags.seed,
                    decoder,
                },
            }
        })
        .collect();
    let results = Mutex::new(vec![None; requests.len()]);
    let started = Instant::now();
    generator.generate(&requests, &|i, r| {
        results.lock().expect("results")[i] = Some(r);
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut tokens = 0u64;
    let mut failed = 0;
    for (i, r) in results.into_inner().expect("results").into_iter().enumerate() {
        let line = match r.expect("every request reports") {
            Ok(g) => {
                tokens += u64::from(g.completion_tokens);
                serde_json::json!({"prompt": i, "text": g.text, "finish_reason": g.finish_reason.as_str(),
                    "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens})
            }
            Err(e) => {
                failed += 1;
                serde_json::json!({"prompt": i, "error": e.to_string()})
            }
        };
        println!("{line}");
    }
    eprintln!(
        "generate: {} prompts, {tokens} tokens in {seconds:.2}s = {:.1} tokens/s ({} failed; decoder {}; model {})",
        requests.len(),
        tokens as f64 / seconds.max(1e-9),
        failed,
        decoder.name(),
        generator.model_id()
    );
    if failed > 0 {
        return Err(Error::Execution(format!(
            "{failed} of {} prompts failed",
            requests.len()
        )));
    }
    Ok(())
}

/// The backend shared by the synthesis stages: configured once, loaded on first use.
pub struct SharedGenerator {
    config: LlmConfig,
    /// Where the request cache lives (a local or shared file system directory).
    pub cache_dir: PathBuf,
    /// What identifies the backend's model in fingerprints (the GGUF's digest in-process).
    pub identity: String,
    slot: Mutex<Option<Arc<dyn Generator>>>,
}

impl std::fmt::Debug for SharedGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedGenerator")
            .field("config", &self.config)
            .field("cache_dir", &self.cache_dir)
            .finish()
    }
}

impl SharedGenerator {
    /// Where the request cache lives (`run_dir` must be local unless `llm.cache_dir` is set).
    pub fn cache_dir(config: &LlmConfig, dir: &Path, run_dir: &str) -> std::result::Result<PathBuf, String> {
        match &config.cache_dir {
            Some(c) => Ok(dir.join(c)),
            None if !run_dir.contains("://") || run_dir.starts_with("file://") => {
                Ok(PathBuf::from(run_dir.trim_start_matches("file://"))
                    .join("cache")
                    .join("llm"))
            }
            None => Err(format!(
                "run_dir {run_dir} is not a local path: set llm.cache_dir to a local or shared directory for the request cache"
            )),
        }
    }

    /// Validates `[llm]`, checks its model file and reads the model's identity.
    pub fn new(config: LlmConfig, dir: &Path, run_dir: &str) -> std::result::Result<SharedGenerator, String> {
        let config = config.validate(dir)?;
        if config.backend == Backend::InProcess && !Path::new(&config.model).is_file() {
            return Err(format!(
                "llm.model = {}: no such GGUF file (make setup fetches SmolLM2 into models/)",
                config.model
            ));
        }
        let cache_dir = SharedGenerator::cache_dir(&config, dir, run_dir)?;
        let identity = config.identity()?;
        Ok(SharedGenerator {
            config,
            cache_dir,
            identity,
            slot: Mutex::new(None),
        })
    }

    /// The backend, loaded (or connected) on first use. Blocking.
    pub fn get(&self) -> Result<Arc<dyn Generator>> {
        let mut slot = self.slot.lock().expect("generator slot");
        if let Some(g) = slot.as_ref() {
            return Ok(g.clone());
        }
        let g = self.config.build()?;
        *slot = Some(g.clone());
        Ok(g)
    }
}
