//! `make test-server`: the OpenAI-compatible client and the synthesis stages against a real
//! server, llama.cpp's (PyPI `llama-cpp-python[server]`, built from source by `make test-server`,
//! which caches the wheel in `.cache/wheels/`), serving the same SmolLM2 GGUF on 127.0.0.1.
//! Ignored by plain `cargo test` (the build takes ~9 minutes on 2 cores).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
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
