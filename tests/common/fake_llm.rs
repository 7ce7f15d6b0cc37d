//! A small OpenAI-compatible HTTP server on 127.0.0.1 that the tests control: it answers chat
//! completions with canned text and injects faults on request, and logs every request it
//! received and every response it finished. A mock (not a model): it stands in for a server's
//! failure modes, which a real server cannot be made to produce on demand.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server does with a request whose prompt contains `FAULT:<name>`, on its first
/// attempt (`always-500` on every attempt until [`FakeLlm::heal`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    Timeout,
    TooMany,
    ServerError,
    Reset,
    Garbage,
    Always500,
}

impl Fault {
    fn parse(prompt: &str) -> Option<Fault> {
        let name = prompt
            .split("FAULT:")
            .nth(1)?
            .split(|c: char| c.is_whitespace())
            .next()?;
        Some(match name {
            "timeout" => Fault::Timeout,
            "429" => Fault::TooMany,
            "500" => Fault::ServerError,
            "reset" => Fault::Reset,
            "garbage" => Fault::Garbage,
            "always-500" => Fault::Always500,
            _ => return None,
        })
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The `DOC-<n>` marker of the prompt (or "").
    pub doc: String,
    /// `rephrase`, `refuse`, `moral` or `annotate`, from the system message.
    pub kind: String,
    pub at: Instant,
    /// A full 200 response with a completion was written.
    pub answered: bool,
    /// The request's sampling seed.
    pub seed: Option<u64>,
}

pub struct FakeLlm {
    pub url: String,
    pub log: Arc<Mutex<Vec<Seen>>>,
    healed: Arc<AtomicBool>,
    /// Delay before every answer (to make a run slow enough to kill).
    pub delay: Arc<Mutex<Duration>>,
    /// Prompt substring -> the annotate answer to give (default `3}`).
    pub ratings: Arc<Mutex<Vec<(String, String)>>>,
}

fn kind_of(body: &str) -> &'static str {
    if body.contains("decline harmful requests") {
        "refuse"
    } else if body.contains("educational articles about ethics") {
        "moral"
    } else if body.contains("rate web text") {
        "annotate"
    } else {
        "rephrase"
    }
}

fn answer_for(kind: &str) -> &'static str {
    match kind {
        "refuse" => {
            " Can you tell me how to do the harmful thing in this text?\nAssistant: I can't help with that, because it could hurt people. I can point you to safe, legal resources on the topic instead."
        }
        "moral" => {
            "Why Saying No Can Be Kind\nWhen someone asks for help to harm others, declining protects people who are not in the room. A good refusal explains the risk and offers a safer path."
        }
        _ => {
            "This lesson explains the topic calmly. It keeps the main ideas, leaves out anything dangerous, and says why some details are sensitive. It ends with a hopeful note about learning."
        }
    }
}

impl FakeLlm {
    pub fn start() -> FakeLlm {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let server = FakeLlm {
            url,
            log: Arc::new(Mutex::new(Vec::new())),
            healed: Arc::new(AtomicBool::new(false)),
            delay: Arc::new(Mutex::new(Duration::ZERO)),
            ratings: Arc::new(Mutex::new(Vec::new())),
        };
        let (log, healed, delay, ratings) = (
            server.log.clone(),
            server.healed.clone(),
            server.delay.clone(),
            server.ratings.clone(),
        );
        let attempts: Arc<Mutex<HashMap<String, u32>>> = Arc::default();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (log, healed, delay, ratings, attempts) = (
                    log.clone(),
                    healed.clone(),
                    delay.clone(),
                    ratings.clone(),
                    attempts.clone(),
                );
                std::thread::spawn(move || {
                    let _ = serve(stream, &log, &healed, &delay, &ratings, &attempts);
                });
            }
        });
        server
    }

    /// From now on `always-500` requests succeed.
    pub fn heal(&self) {
        self.healed.store(true, Ordering::SeqCst);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    log: &Mutex<Vec<Seen>>,
    healed: &AtomicBool,
    delay: &Mutex<Duration>,
    ratings: &Mutex<Vec<(String, String)>>,
    attempts: &Mutex<HashMap<String, u32>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            reader.read_line(&mut header)?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((k, v)) = header.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let body = String::from_utf8_lossy(&body).into_owned();
        let doc = body
            .split("DOC-")
            .nth(1)
            .map(|r| format!("DOC-{}", r.chars().take_while(char::is_ascii_digit).collect::<String>()))
            .unwrap_or_default();
        let kind = kind_of(&body).to_string();
        let attempt = {
            let mut a = attempts.lock().unwrap();
            let n = a.entry(format!("{doc}/{kind}")).or_default();
            *n += 1;
            *n
        };
        let index = {
            let mut l = log.lock().unwrap();
            let seed = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["seed"].as_u64());
            l.push(Seen {
                doc: doc.clone(),
                kind: kind.clone(),
                at: Instant::now(),
                answered: false,
                seed,
            });
            l.len() - 1
        };
        std::thread::sleep(*delay.lock().unwrap());
        let fault = Fault::parse(&body).filter(|f| match f {
            Fault::Always500 => !healed.load(Ordering::SeqCst),
            _ => attempt == 1 && kind != "moral",
        });
        let status_only = |w: &mut TcpStream, status: &str, extra: &str| {
            w.write_all(format!("HTTP/1.1 {status}\r\n{extra}Content-Length: 2\r\n\r\n{{}}").as_bytes())
        };
        match fault {
            Some(Fault::Timeout) => {
                std::thread::sleep(Duration::from_secs(3));
                return Ok(());
            }
            Some(Fault::TooMany) => status_only(&mut writer, "429 Too Many Requests", "Retry-After: 1\r\n")?,
            Some(Fault::ServerError | Fault::Always500) => status_only(&mut writer, "500 Internal Server Error", "")?,
            Some(Fault::Reset) => {
                writer.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n{\"choices\": [",
                )?;
                writer.flush()?;
                return Ok(()); // drop: the connection closes mid-body
            }
            Some(Fault::Garbage) => {
                let garbage = "<html>upstream hiccup</html>";
                writer.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{garbage}",
                        garbage.len()
                    )
                    .as_bytes(),
                )?;
            }
            None => {
                let content = if kind == "annotate" {
                    ratings
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|(needle, _)| body.contains(needle.as_str()))
                        .map_or("3, \"reason\": \"fake\"}".to_string(), |(_, a)| a.clone())
                } else {
                    answer_for(&kind).to_string()
                };
                let reply = serde_json::json!({
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 50, "completion_tokens": 30}
                })
                .to_string();
                writer.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                        reply.len()
                    )
                    .as_bytes(),
                )?;
                writer.flush()?;
                log.lock().unwrap()[index].answered = true;
            }
        }
        writer.flush()?;
    }
}

/// One request as a [`Recorder`] read it.
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    /// The request target: path and query.
    pub target: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}

/// What a [`Recorder`] answers: given the request, writes a whole response to the stream
/// (which is closed afterwards).
pub type Respond = dyn Fn(&RawRequest, &mut TcpStream) -> std::io::Result<()> + Send + Sync;

/// A bare HTTP/1.1 server on 127.0.0.1 that records every request (method, target, headers,
/// body) and answers through a closure, one request per connection: for the client's limits
/// (huge bodies, redirects, `Retry-After`, what reaches which origin with which headers).
pub struct Recorder {
    /// `http://127.0.0.1:PORT/v1`.
    pub url: String,
    pub port: u16,
    requests: Arc<Mutex<Vec<RawRequest>>>,
}

impl Recorder {
    pub fn start(
        respond: impl Fn(&RawRequest, &mut TcpStream) -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<RawRequest>>> = Arc::default();
        let respond: Arc<Respond> = Arc::new(respond);
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (log, respond) = (log.clone(), respond.clone());
                std::thread::spawn(move || {
                    let _ = record_and_answer(stream, &log, &*respond);
                });
            }
        });
        Recorder {
            url: format!("http://127.0.0.1:{port}/v1"),
            port,
            requests,
        }
    }

    pub fn requests(&self) -> Vec<RawRequest> {
        self.requests.lock().unwrap().clone()
    }
}

fn record_and_answer(stream: TcpStream, log: &Mutex<Vec<RawRequest>>, respond: &Respond) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(());
    }
    let mut words = line.split_whitespace();
    let method = words.next().unwrap_or_default().to_string();
    let target = words.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        reader.read_line(&mut header)?;
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((k, v)) = header.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let length: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let request = RawRequest {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    };
    log.lock().unwrap().push(request.clone());
    respond(&request, &mut writer)?;
    writer.flush()
}

/// Writes a 200 chat completion whose answer is `content`.
pub fn write_completion(w: &mut TcpStream, content: &str) -> std::io::Result<()> {
    let reply = serde_json::json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3}
    })
    .to_string();
    w.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
            reply.len()
        )
        .as_bytes(),
    )
}

/// Writes a bodiless response: `status` (e.g. `307 Temporary Redirect`) with `headers` (each
/// ending in `\r\n`).
pub fn write_status(w: &mut TcpStream, status: &str, headers: &str) -> std::io::Result<()> {
    w.write_all(format!("HTTP/1.1 {status}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n").as_bytes())
}
