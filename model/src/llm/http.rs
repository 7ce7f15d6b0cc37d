//! A client for OpenAI-compatible servers (`/v1/chat/completions` or `/v1/completions`): what
//! users run against vLLM, SGLang, TGI, llama.cpp's server or a hosted API.
//!
//! Guarantees: at most `max_in_flight` requests at once; each attempt has its own timeout;
//! connection errors, timeouts, unreadable bodies, 408, 429 and 5xx are retried with jittered
//! exponential backoff (a `Retry-After` header is honoured) at most `max_retries` times; other
//! 4xx answers are final (`GenerateError::Rejected`). After `breaker_threshold` consecutive
//! failed attempts the circuit breaker pauses every new attempt for `breaker_cooldown` (doubling
//! while the server stays down), so a dead server is probed, not hammered. The API key is sent
//! as a bearer token and never logged or printed.

use super::chat::{ChatTemplate, Message};
use super::{ChatRequest, FinishReason, GenerateError, Generation, GenerationStats, Generator, OnDone};
use futures::StreamExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tracing::warn;

/// Which endpoint to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/chat/completions`: the server applies its chat template; a prefill is sent as a final
    /// assistant message (servers that support continuing it do; the parsers accept both).
    Chat,
    /// `/completions`: we render the prompt with `template` (e.g. the GGUF's) and send raw text.
    Completions,
}

/// Everything the client needs. `Debug` never shows the key.
#[derive(Clone)]
pub struct HttpConfig {
    /// Up to and including the version prefix, e.g. `http://127.0.0.1:8080/v1`.
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub api: Api,
    /// The chat template for [`Api::Completions`].
    pub template: Option<ChatTemplate>,
    pub timeout: Duration,
    pub max_in_flight: usize,
    pub max_retries: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub breaker_threshold: u32,
    pub breaker_cooldown: Duration,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("api", &self.api)
            .field("timeout", &self.timeout)
            .field("max_in_flight", &self.max_in_flight)
            .field("max_retries", &self.max_retries)
            .finish()
    }
}

impl HttpConfig {
    pub fn new(base_url: &str, model: &str) -> HttpConfig {
        HttpConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key: None,
            api: Api::Chat,
            template: None,
            timeout: Duration::from_secs(120),
            max_in_flight: 256,
            max_retries: 5,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            breaker_threshold: 8,
            breaker_cooldown: Duration::from_secs(5),
        }
    }
}

struct Breaker {
    consecutive: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
}

/// The OpenAI-compatible backend.
pub struct OpenAiClient {
    config: HttpConfig,
    client: reqwest::Client,
    /// Our own runtime: `generate` is called from blocking threads (`None` only while dropping).
    runtime: Option<tokio::runtime::Runtime>,
    breaker: Mutex<Breaker>,
    identity: String,
    stats: GenerationStats,
}

/// What one attempt came to.
enum Attempt {
    Done(Generation),
    /// Worth retrying, after at least the server's `Retry-After` if it gave one.
    Retry(String, Option<Duration>),
    Final(String),
}

impl OpenAiClient {
    pub fn new(config: HttpConfig) -> Result<OpenAiClient, String> {
        if config.api == Api::Completions && config.template.is_none() {
            return Err("the completions API needs a chat template to render prompts".into());
        }
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(30)))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("HTTP runtime: {e}"))?;
        let identity = format!("openai:{}@{}", config.model, config.base_url);
        let cooldown = config.breaker_cooldown;
        Ok(OpenAiClient {
            config,
            client,
            runtime: Some(runtime),
            breaker: Mutex::new(Breaker {
                consecutive: 0,
                open_until: None,
                cooldown,
            }),
            identity,
            stats: GenerationStats::default(),
        })
    }

    fn body(&self, request: &ChatRequest) -> Result<(String, serde_json::Value), String> {
        let p = &request.params;
        let mut body = serde_json::json!({
            "model": self.config.model,
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "seed": p.seed,
        });
        if !p.stop.is_empty() {
            body["stop"] = serde_json::json!(p.stop);
        }
        match self.config.api {
            Api::Chat => {
                let mut messages = request.messages.clone();
                if !request.prefill.is_empty() {
                    messages.push(Message::new("assistant", request.prefill.clone()));
                }
                body["messages"] = serde_json::json!(messages);
                Ok((format!("{}/chat/completions", self.config.base_url), body))
            }
            Api::Completions => {
                let template = self.config.template.as_ref().expect("checked at construction");
                let prompt = template.render(&request.messages, true)?;
                body["prompt"] = serde_json::json!(format!("{prompt}{}", request.prefill));
                Ok((format!("{}/completions", self.config.base_url), body))
            }
        }
    }

    async fn attempt(&self, url: &str, body: &serde_json::Value) -> Attempt {
        let mut builder = self.client.post(url).json_body(body);
        if let Some(key) = &self.config.api_key {
            builder = builder.bearer_auth(key);
        }
        let response = match builder.send().await {
            Ok(r) => r,
            Err(e) => return Attempt::Retry(transport_error(&e), None),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s.min(3600.0)));
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) => return Attempt::Retry(format!("reading the body: {}", transport_error(&e)), None),
        };
        if status.is_success() {
            return match parse_response(&text, self.config.api) {
                Ok(g) => Attempt::Done(g),
                Err(e) => Attempt::Retry(e, None),
            };
        }
        let detail = format!("HTTP {}: {}", status.as_u16(), snippet(&text));
        let code = status.as_u16();
        if code == 408 || code == 429 || status.is_server_error() {
            Attempt::Retry(detail, retry_after)
        } else {
            Attempt::Final(detail)
        }
    }

    /// Waits while the breaker is open.
    async fn breaker_wait(&self) {
        loop {
            let until = self.breaker.lock().expect("breaker").open_until;
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t.into()).await,
                _ => return,
            }
        }
    }

    fn record(&self, ok: bool) {
        let mut b = self.breaker.lock().expect("breaker");
        if ok {
            b.consecutive = 0;
            b.cooldown = self.config.breaker_cooldown;
            return;
        }
        b.consecutive += 1;
        let closed = b.open_until.is_none_or(|t| t <= Instant::now());
        if b.consecutive >= self.config.breaker_threshold && closed {
            warn!(
                server = %self.config.base_url,
                failures = b.consecutive,
                pause_s = b.cooldown.as_secs_f64(),
                "the server keeps failing; pausing requests"
            );
            b.open_until = Some(Instant::now() + b.cooldown);
            b.cooldown = (b.cooldown * 2).min(self.config.backoff_max.max(self.config.breaker_cooldown));
        }
    }

    async fn run_one(&self, request: &ChatRequest) -> Result<Generation, GenerateError> {
        let (url, body) = self.body(request).map_err(GenerateError::Rejected)?;
        let mut attempts = 0u32;
        loop {
            self.breaker_wait().await;
            attempts += 1;
            let outcome = self.attempt(&url, &body).await;
            let (last, retry_after) = match outcome {
                Attempt::Done(g) => {
                    self.record(true);
                    return Ok(g);
                }
                Attempt::Final(e) => {
                    self.record(true);
                    return Err(GenerateError::Rejected(e));
                }
                Attempt::Retry(e, after) => {
                    self.record(false);
                    (e, after)
                }
            };
            if attempts > self.config.max_retries {
                return Err(GenerateError::Exhausted { attempts, last });
            }
            GenerationStats::add(&self.stats.retries, 1);
            let exponential = self.config.backoff_base.as_secs_f64() * 2f64.powi(attempts as i32 - 1);
            let capped = exponential.min(self.config.backoff_max.as_secs_f64());
            // Full jitter in [capped/2, capped]: retries of many requests spread out.
            let jittered = capped * (0.5 + 0.5 * jitter());
            // The server's Retry-After wins when it gives one.
            let wait = retry_after.map_or(jittered, |r| r.as_secs_f64());
            tracing::debug!(attempt = attempts, wait_s = wait, error = %last, "retrying a request");
            tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        }
    }
}

/// A uniform draw in [0, 1) from the clock and a counter: jitter needs spread, not quality.
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    let mut z = nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "could not connect".into()
    } else {
        // reqwest's message names the URL, never the headers (so never the key).
        let mut message = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            message.push_str(&format!(": {s}"));
            source = s.source();
        }
        message
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
}

/// Reads a completion body (chat or text), tolerant of missing `usage`.
pub fn parse_response(text: &str, api: Api) -> Result<Generation, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("unparseable response body ({e}): {}", snippet(text)))?;
    let choice = value
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| format!("the response has no choices: {}", snippet(text)))?;
    let content = match api {
        Api::Chat => choice.get("message").and_then(|m| m.get("content")),
        Api::Completions => choice.get("text"),
    }
    .and_then(serde_json::Value::as_str)
    .ok_or_else(|| format!("the response's choice has no text: {}", snippet(text)))?;
    let finish_reason = match choice.get("finish_reason").and_then(serde_json::Value::as_str) {
        Some("length") => FinishReason::Length,
        _ => FinishReason::Stop,
    };
    let usage = |k: &str| {
        value
            .get("usage")
            .and_then(|u| u.get(k))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32
    };
    Ok(Generation {
        text: content.to_string(),
        finish_reason,
        prompt_tokens: usage("prompt_tokens"),
        completion_tokens: usage("completion_tokens"),
    })
}

/// `RequestBuilder::json` needs reqwest's `json` feature; one line does the same.
trait JsonBody {
    fn json_body(self, body: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &serde_json::Value) -> Self {
        self.header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }
}

impl Drop for OpenAiClient {
    /// The client may be dropped inside another runtime (the pipeline's): shut ours down without
    /// blocking.
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Generator for OpenAiClient {
    fn model_id(&self) -> &str {
        &self.identity
    }

    fn generate(&self, requests: &[ChatRequest], done: &OnDone<'_>) {
        let stats = &self.stats;
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        runtime.block_on(futures::stream::iter(requests.iter().enumerate()).for_each_concurrent(
            self.config.max_in_flight.max(1),
            |(i, request)| async move {
                GenerationStats::add(&stats.in_flight, 1);
                let result = self.run_one(request).await;
                stats.finished(&result, true);
                done(i, result);
            },
        ));
    }

    fn stats(&self) -> &GenerationStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_and_text_bodies_and_rejects_garbage() {
        let chat = r#"{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":1}}"#;
        let g = parse_response(chat, Api::Chat).unwrap();
        assert_eq!(
            (g.text.as_str(), g.finish_reason, g.prompt_tokens),
            ("hi", FinishReason::Length, 5)
        );
        let text = r#"{"choices":[{"text":"x","finish_reason":"stop"}]}"#;
        assert_eq!(parse_response(text, Api::Completions).unwrap().completion_tokens, 0);
        assert!(
            parse_response("{not json", Api::Chat)
                .unwrap_err()
                .contains("unparseable")
        );
        assert!(
            parse_response(r#"{"choices":[]}"#, Api::Chat)
                .unwrap_err()
                .contains("no choices")
        );
        let config = HttpConfig {
            api_key: Some("sk-secret".into()),
            ..HttpConfig::new("http://127.0.0.1:1/v1", "m")
        };
        assert!(!format!("{config:?}").contains("sk-secret"));
    }
}
