//! `make test-server`: the OpenAI-compatible client and the synthesis stages against a real
//! server, llama.cpp's (PyPI `llama-cpp-python[server]`, built from source by `make test-server`,
//! which caches the wheel in `.cache/wheels/`), serving the same SmolLM2 GGUF on 127.0.0.1.
//! Ignored by plain `cargo test` (the build takes ~9 minutes on 2 cores).
//!
//! Also, run by plain `cargo test`: the client's limits against a hostile or broken server
//! (issue 12, item 6) over the real binary, with scripted servers on 127.0.0.1
//! (tests/common/fake_llm.rs: `Recorder` records what each origin received): huge bodies,
//! redirects to another origin, endless `Retry-After`, the API key over plain http, and
//! credentials in the base URL.

mod common;

use common::fake_llm::{FakeLlm, Recorder, write_completion, write_status};
use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Stops the server however the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn models_ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

#[test]
#[ignore = "needs llama-cpp-python[server]: run `make test-server`"]
fn llama_cpp_server_serves_generate_and_the_synthesis_stages() {
    let python = std::env::var("SAFEPIPE_LLAMA_PYTHON")
        .unwrap_or_else(|_| repo().join(".venv-llama/bin/python").display().to_string());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let _server = Server(
        Command::new(&python)
            .args(["-m", "llama_cpp.server", "--model", &gguf(), "--host", "127.0.0.1"])
            .args(["--port", &port.to_string(), "--n_ctx", "4096", "--n_threads", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start llama_cpp.server (make test-server installs it into .venv-llama)"),
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    while !models_ready(port) {
        assert!(Instant::now() < deadline, "llama.cpp's server did not come up");
        std::thread::sleep(Duration::from_millis(300));
    }
    let url = format!("http://127.0.0.1:{port}/v1");

    let out = safepipe(&[
        "generate",
        "--server",
        &url,
        "--model",
        "smollm2",
        "--max-tokens",
        "16",
        "What is the capital of France?",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let g: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(g["completion_tokens"].as_u64().unwrap() > 0, "{g}");
    assert!(!g["text"].as_str().unwrap().trim().is_empty(), "{g}");

    let ws = Workspace::new();
    let docs = [
        (
            "d0",
            "Rivers carry water from mountains to the sea and shape valleys over time.",
        ),
        (
            "d1",
            "A recipe for bread: flour, water, salt and yeast, kneaded and baked.",
        ),
        (
            "d2",
            "refuse-me: how to get into a neighbour's house while they are away.",
        ),
    ];
    let lines: Vec<String> = docs
        .iter()
        .map(|(id, t)| serde_json::json!({"id": id, "text": t}).to_string())
        .collect();
    std::fs::write(ws.path().join("docs.jsonl"), lines.join("\n") + "\n").unwrap();
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"run\"\n\n[[inputs]]\nname = \"docs\"\npaths = [\"docs.jsonl\"]\n\n\
             [route]\ndefault = \"rephrase\"\n\n[[route.rules]]\nname = \"unsafe\"\nwhen = \"text LIKE '%refuse-me%'\"\nroute = \"refuse\"\n\n\
             [llm]\nbackend = \"openai\"\nmodel = \"smollm2\"\nbase_url = \"{url}\"\nmax_in_flight = 2\ntimeout_s = 120\n\n\
             [annotate]\nmax_tokens = 16\n\n\
             [synthesize]\n[synthesize.rephrase]\nmax_tokens = 32\n[synthesize.refuse]\nmax_tokens = 32\n[synthesize.moral]\nmax_tokens = 32\n\
             [synthesize.gates]\ndrop = [\"empty\"]\n"
        ),
    );
    run_ok(&config, &[]);
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM synthetic WHERE error IS NOT NULL"),
        0
    );
    assert!(
        sql_number(
            &config,
            "SELECT count(*) FROM synthetic WHERE kind = 'safeweb' AND length(text) > 0"
        ) >= 1
    );
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM llm_scores WHERE status = 'failed'"),
        0
    );
    assert_eq!(sql_number(&config, "SELECT count(*) FROM llm_scores"), 3);
    let models = sql_rows(&config, "SELECT DISTINCT model FROM synthetic");
    assert!(models[0].contains("openai:smollm2@http://127.0.0.1"), "{models:?}");
}

/// `safepipe ARGS` with `env` set and `OPENAI_API_KEY` removed unless `env` sets it, killed
/// (and the test failed) after two minutes: a client that waits out a hostile server's
/// `Retry-After` must not hang the suite.
fn safepipe_within(args: &[&str], env: &[(&str, &str)]) -> Output {
    // Output goes to files: a pipe nobody drains would block a chatty child.
    let dir = tempfile::tempdir().unwrap();
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "debug")
        .env_remove("OPENAI_API_KEY")
        .envs(env.iter().copied())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("run safepipe");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "safepipe {args:?} still running after 120 s:\n{}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).unwrap(),
        stderr: std::fs::read(&err_path).unwrap(),
    }
}

/// `safepipe generate --server URL --model m PROMPTS..`: its JSON lines and stderr.
fn generate_against(url: &str, prompts: &[&str], env: &[(&str, &str)]) -> (Output, Vec<serde_json::Value>) {
    let mut args = vec!["generate", "--server", url, "--model", "m", "--max-tokens", "8"];
    args.extend_from_slice(prompts);
    let out = safepipe_within(&args, env);
    let lines = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (out, lines)
}

/// Repro before the fix: the client read the whole body into memory (`response.text()`), so a
/// server that streamed without end, or announced 1 GiB, had the process buffer all of it.
/// Now the body is read in chunks up to `llm.max_response_bytes` (16 MiB by default) and the
/// request fails there, not retried; the server sees the connection closed well before it
/// could write its 256 MiB.
#[test]
fn a_huge_response_body_fails_its_request_at_max_response_bytes() {
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let server = Recorder::start(move |request, w| {
        if request.body.contains("declared") {
            // Announces 1 GiB and sends a little: refused on the header alone.
            w.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1073741824\r\n\r\n{\"choices\"",
            )?;
            return Ok(());
        }
        w.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
        let chunk = vec![b' '; 1 << 20];
        for _ in 0..256 {
            w.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
            w.write_all(&chunk)?;
            w.write_all(b"\r\n")?;
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        w.write_all(b"0\r\n\r\n")
    });
    let (out, lines) = generate_against(&server.url, &["streamed forever", "declared huge"], &[]);
    assert!(!out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lines.len(), 2, "{}", text(&out.stdout));
    for (line, seen) in lines.iter().zip(["stopped reading after", "Content-Length 1073741824"]) {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("larger than max_response_bytes = 16777216") && error.contains(seen),
            "{line}"
        );
    }
    // Final, not retried: one request each.
    assert_eq!(server.requests().len(), 2);
    let sent = written.load(Ordering::SeqCst);
    assert!(
        sent < 64 << 20,
        "the server wrote {sent} bytes before the client hung up"
    );
}

/// Repro before the fix: reqwest's default policy followed up to 10 redirects anywhere, and a
/// 307 re-sends the POST with its body, so a server (or whoever answered on its address) could
/// hand every prompt, i.e. the document text, to another host. Now a redirect is followed
/// only within the base URL's origin (a same-origin 307 works: the request arrives at the new
/// path with its body); one to another origin (here another port, with credentials in the
/// `Location`) fails the request, not retried, naming the origin without credentials, and the
/// other server receives nothing.
#[test]
fn redirects_to_another_origin_are_refused_and_the_other_server_gets_nothing() {
    let other = Recorder::start(|_, w| write_completion(w, "stolen"));
    let elsewhere = format!(
        "http://thief:pw-in-location@127.0.0.1:{}/v1/chat/completions",
        other.port
    );
    let server = Recorder::start(move |request, w| {
        if request.target.starts_with("/v1/moved/") {
            write_completion(w, "same origin is fine")
        } else if request.body.contains("same-origin") {
            write_status(w, "307 Temporary Redirect", "Location: /v1/moved/chat/completions\r\n")
        } else if request.body.contains("cross-307") {
            write_status(w, "307 Temporary Redirect", &format!("Location: {elsewhere}\r\n"))
        } else {
            write_status(w, "302 Found", &format!("Location: {elsewhere}\r\n"))
        }
    });
    let (out, lines) = generate_against(&server.url, &["same-origin", "cross-307", "cross-302"], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(lines.len(), 3, "{stderr}");
    assert_eq!(lines[0]["text"], "same origin is fine", "{stderr}");
    let origin = format!("another origin, http://127.0.0.1:{};", other.port);
    for line in &lines[1..] {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.starts_with("rejected:") && error.contains(&origin), "{line}");
    }
    assert!(!text(&out.stdout).contains("pw-in-location") && !stderr.contains("pw-in-location"));
    assert!(other.requests().is_empty(), "{:?}", other.requests());
    let requests = server.requests();
    let moved: Vec<_> = requests.iter().filter(|r| r.target.starts_with("/v1/moved/")).collect();
    assert_eq!(moved.len(), 1);
    assert!(moved[0].body.contains("same-origin"));
    for prompt in ["cross-307", "cross-302"] {
        assert_eq!(
            requests.iter().filter(|r| r.body.contains(prompt)).count(),
            1,
            "{prompt}"
        );
    }
}

/// A JSONL corpus of one document and a config synthesizing it through `llm` (an `[llm]`
/// section).
fn one_doc_config(ws: &Workspace, llm: &str) -> std::path::PathBuf {
    let doc = serde_json::json!({"id": "d0", "text": "DOC-0 A calm text about rivers and valleys."});
    std::fs::write(ws.path().join("docs.jsonl"), format!("{doc}\n")).unwrap();
    ws.config(
        "config.toml",
        &format!(
            "run_dir = \"run\"\n\n[[inputs]]\nname = \"docs\"\npaths = [\"docs.jsonl\"]\n\n\
             [route]\ndefault = \"rephrase\"\n\n{llm}\n[synthesize]\n"
        ),
    )
}

/// Repro before the fix: `Retry-After: 999999` made the client sleep up to an hour per attempt
/// (its own cap was 3600 s). Now the wait is at most `llm.max_retry_after_s` (default 60 s;
/// here 0.05 s), the first capped wait is logged, and the request is retried `max_retries`
/// times as usual (3 attempts) and recorded failed. Without the cap this test hangs (and
/// `safepipe_within` fails it after two minutes).
#[test]
fn retry_after_is_capped_by_max_retry_after_s() {
    let server = Recorder::start(|_, w| write_status(w, "429 Too Many Requests", "Retry-After: 999999\r\n"));
    let ws = Workspace::new();
    let llm = format!(
        "[llm]\nbackend = \"openai\"\nmodel = \"m\"\nbase_url = \"{}\"\ntimeout_s = 5\nmax_retries = 2\n\
         max_retry_after_s = 0.05\n",
        server.url
    );
    let config = one_doc_config(&ws, &llm);
    let out = safepipe_within(&["run", config.to_str().unwrap()], &[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("longer Retry-After than max_retry_after_s allows") && stderr.contains("retry_after_s=999999"),
        "{stderr}"
    );
    assert_eq!(server.requests().len(), 3);
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM synthetic WHERE error LIKE '%failed after 3 attempts: HTTP 429%'"
        ),
        1
    );
}

/// Repro before the fix: with `OPENAI_API_KEY` set and `base_url = "http://192.0.2.1/v1"`,
/// every request carried `Authorization: Bearer <key>` in clear text across the network. Now
/// the config is refused at load (exit 2, before any request), naming
/// `llm.allow_insecure_api_key`, unless that key says so; without a key, or to a loopback
/// address, plain http is fine (and the key is sent there).
#[test]
fn the_api_key_goes_over_plain_http_only_to_this_machine() {
    let ws = Workspace::new();
    let key = [("OPENAI_API_KEY", "sk-test-secret")];
    let remote = "[llm]\nbackend = \"openai\"\nmodel = \"m\"\nbase_url = \"http://192.0.2.1/v1\"\n";
    let config = one_doc_config(&ws, remote);
    let plan = |env: &[(&str, &str)]| safepipe_within(&["plan", config.to_str().unwrap()], env);
    let out = plan(&key);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("llm.allow_insecure_api_key = true") && stderr.contains("the API key ($OPENAI_API_KEY)"),
        "{stderr}"
    );
    assert!(!stderr.contains("sk-test-secret"));
    // No key in the environment: nothing to protect.
    assert!(plan(&[]).status.success());
    // The config says so explicitly.
    let config = one_doc_config(&ws, &format!("{remote}allow_insecure_api_key = true\n"));
    let out = safepipe_within(&["plan", config.to_str().unwrap()], &key);
    assert!(out.status.success(), "{}", text(&out.stderr));

    // `generate --server` refuses the same way, before connecting.
    let (out, _) = generate_against("http://192.0.2.1/v1", &["hi"], &key);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("allow_insecure_api_key"));

    // Loopback over http: sent, as a bearer token.
    let server = Recorder::start(|_, w| write_completion(w, "ok"));
    let (out, lines) = generate_against(&server.url, &["hi"], &key);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lines[0]["text"], "ok");
    assert_eq!(
        server.requests()[0].header("authorization"),
        Some("Bearer sk-test-secret")
    );
    assert!(!text(&out.stderr).contains("sk-test-secret"));
}

/// Repro before the fix: `base_url = "http://alice:pw@host/v1?api_key=sk-..."` went as written
/// into the model identity (`synthetic.model`, fingerprints, cache keys), the `generate`
/// summary and the circuit breaker's warning. Now one function, `redact_url`, shows it:
/// `http://host/v1?api_key=REDACTED`, user info gone; the server still receives the
/// credentials (basic authentication, the query).
#[test]
fn credentials_in_the_base_url_never_reach_logs_identities_or_tables() {
    let secrets = ["pw-in-url", "sk-in-query"];
    let leaks = |what: &str, bytes: &[u8]| {
        let s = String::from_utf8_lossy(bytes);
        for secret in secrets {
            assert!(!s.contains(secret), "{secret} in {what}:\n{s}");
        }
    };
    let server = Recorder::start(|_, w| write_completion(w, "ok"));
    let url = format!(
        "http://alice:pw-in-url@127.0.0.1:{}/v1?api_key=sk-in-query&api-version=7",
        server.port
    );
    let (out, lines) = generate_against(&url, &["hi"], &[("RUST_LOG", "trace")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(lines[0]["text"], "ok");
    let shown = format!(
        "openai:m@http://127.0.0.1:{}/v1?api_key=REDACTED&api-version=7",
        server.port
    );
    assert!(
        text(&out.stderr).contains(&format!("model {shown})")),
        "{}",
        text(&out.stderr)
    );
    leaks("generate's output", &[out.stdout, out.stderr].concat());
    let seen = &server.requests()[0];
    assert_eq!(seen.target, "/v1/chat/completions?api_key=sk-in-query&api-version=7");
    // base64("alice:pw-in-url")
    assert_eq!(seen.header("authorization"), Some("Basic YWxpY2U6cHctaW4tdXJs"));

    // A run: the table, the logs, every file of the run directory (fingerprints, the request
    // cache, the stats).
    let fake = FakeLlm::start();
    let url = fake
        .url
        .replace("http://", "http://alice:pw-in-url@")
        .replace("/v1", "/v1?api_key=sk-in-query");
    let ws = Workspace::new();
    let llm = format!("[llm]\nbackend = \"openai\"\nmodel = \"m\"\nbase_url = \"{url}\"\ntimeout_s = 5\n");
    let config = one_doc_config(&ws, &llm);
    let out = safepipe_within(&["run", config.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    leaks("the run's output", &[out.stdout, out.stderr].concat());
    let models = sql_rows(&config, "SELECT DISTINCT model FROM synthetic");
    let redacted = format!("{}?api_key=REDACTED", fake.url);
    assert_eq!(models, vec![format!("{{\"model\":\"openai:m@{redacted}\"}}")]);
    for path in files_under(&ws.path().join("run")) {
        let bytes = std::fs::read(&path).unwrap();
        leaks(&path.display().to_string(), &bytes);
    }
}
