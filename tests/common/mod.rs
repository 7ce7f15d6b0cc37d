//! Helpers shared by the end-to-end tests: the real `safepipe` binary over real files in a
//! temporary run directory, with the sample corpus that `make setup` fetched.
#![allow(dead_code)]

pub mod fake_llm;
pub mod fault_proxy;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_safepipe")
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A file of the sample corpus; fails with the fix if `make setup` has not run.
pub fn sample(name: &str) -> PathBuf {
    let path = repo().join("data/sample").join(name);
    assert!(path.exists(), "{} is missing: run `make setup` first", path.display());
    path
}

/// The four sample inputs, as `[[inputs]]` TOML blocks with absolute paths.
pub fn sample_inputs() -> String {
    let mut s = String::new();
    for (name, file) in [
        ("ham", "spamassassin-ham.jsonl"),
        ("spam", "spamassassin-spam.jsonl.gz"),
        ("harmbench", "harmbench.parquet"),
        ("strongreject", "strongreject.jsonl.zst"),
    ] {
        s.push_str(&format!(
            "[[inputs]]\nname = \"{name}\"\npaths = [{:?}]\n\n",
            sample(file).display().to_string()
        ));
    }
    s
}

/// The three smaller samples (spam, HarmBench, StrongREJECT: 9 units, a whole .gz, 7 row groups
/// and a .zst) as `[[inputs]]` blocks: enough for the token path without the big ham file.
pub fn small_sample_inputs() -> String {
    let mut s = String::new();
    for (name, file) in [
        ("spam", "spamassassin-spam.jsonl.gz"),
        ("harmbench", "harmbench.parquet"),
        ("strongreject", "strongreject.jsonl.zst"),
    ] {
        s.push_str(&format!(
            "[[inputs]]\nname = \"{name}\"\npaths = [{:?}]\n\n",
            sample(file).display().to_string()
        ));
    }
    s
}

/// The SmolLM2 GGUF (its tokenizer) that `make setup` fetches, as a string for configs.
pub fn gguf() -> String {
    let path = repo().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run `make setup` first", path.display());
    path.display().to_string()
}

/// The committed demo classifier (its encoder comes from `make setup`).
pub fn demo_classifier() -> PathBuf {
    let path = repo().join("classifiers/minilm-l6-safety/classifier.toml");
    let encoder = repo().join("models/minilm-l6/encoder.onnx");
    assert!(
        encoder.exists(),
        "{} is missing: run `make setup` first",
        encoder.display()
    );
    path
}

/// The demo-like config over the sample corpus with small JSONL units.
pub fn sample_config(extra: &str) -> String {
    format!(
        "run_dir = \"run\"\n\n{}[plan]\njsonl_unit_bytes = 1048576\n\n{extra}\n\n\
         [[route.rules]]\nname = \"too_short\"\nwhen = \"length(trim(text)) < 20\"\nroute = \"drop\"\n\n\
         [[route.rules]]\nname = \"harmful_prompts\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n",
        sample_inputs()
    )
}

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        Workspace {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `config.toml` (or another name) into the workspace and returns its path.
    pub fn config(&self, name: &str, body: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    }
}

/// Runs `tests/python/SCRIPT ARGS..` with the project's `.venv` Python, asserting success; returns
/// the one JSON report it prints on stdout.
pub fn python_oracle<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> serde_json::Value {
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("run the Python oracle (make setup makes .venv)");
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_str(text(&out.stdout).trim()).unwrap()
}

pub fn safepipe(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run safepipe")
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Starts `safepipe run CONFIG` in the background with its output discarded (to kill it).
pub fn spawn_run(config: &Path) -> std::process::Child {
    Command::new(bin())
        .args(["run", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start safepipe run")
}

/// Runs `safepipe run CONFIG --rank R --world-size W` for every `(R, W)` at once, like an array
/// job (or processes that think they are the same rank); returns their outputs in that order.
pub fn run_at_once(config: &Path, ranks: &[(u32, u32)]) -> Vec<Output> {
    let children: Vec<_> = ranks
        .iter()
        .map(|(rank, world)| {
            Command::new(bin())
                .args(["run", config.to_str().unwrap()])
                .args(["--rank", &rank.to_string(), "--world-size", &world.to_string()])
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start safepipe run")
        })
        .collect();
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

/// Runs `safepipe run CONFIG EXTRA..`, asserting success; returns stderr.
pub fn run_ok(config: &Path, extra: &[&str]) -> String {
    let mut args = vec!["run", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = safepipe(&args);
    assert!(out.status.success(), "safepipe {args:?} failed:\n{}", text(&out.stderr));
    text(&out.stderr)
}

/// Runs a query; returns the JSON lines of its rows, sorted (a multiset to compare).
pub fn sql_rows(config: &Path, query: &str) -> Vec<String> {
    sql_rows_with_env(config, query, &[])
}

/// [`sql_rows`] with extra environment variables (e.g. object-store credentials).
pub fn sql_rows_with_env(config: &Path, query: &str, env: &[(&str, String)]) -> Vec<String> {
    let out = Command::new(bin())
        .args(["sql", config.to_str().unwrap(), query, "--format", "jsonl"])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .expect("run safepipe");
    assert!(out.status.success(), "sql {query:?} failed:\n{}", text(&out.stderr));
    let mut rows: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    rows.sort();
    rows
}

/// A single number from a query such as `SELECT count(*) AS n FROM ...`.
pub fn sql_number(config: &Path, query: &str) -> i64 {
    let out = safepipe(&["sql", config.to_str().unwrap(), query, "--format", "csv"]);
    assert!(out.status.success(), "sql {query:?} failed:\n{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let value = stdout
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("no row from {query:?}: {stdout}"));
    value
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not a number from {query:?}: {value}"))
}

/// Everything a run produced, as sorted multisets: documents (text hashed), quarantine, routes,
/// tagged.
pub fn snapshot(config: &Path) -> Vec<Vec<String>> {
    vec![
        sql_rows(
            config,
            "SELECT id, source, md5(text) AS text_md5, length(text) AS chars, metadata FROM documents",
        ),
        sql_rows(
            config,
            "SELECT source, file, unit, \"offset\", records, reason, detail, id, raw FROM quarantine",
        ),
        sql_rows(config, "SELECT id, route, rule FROM routes"),
        sql_rows(
            config,
            "SELECT id, source, md5(text) AS text_md5, words, tags_inserted FROM tagged",
        ),
    ]
}

/// The summary line the runner prints for a stage, e.g. `ingest: 3 unit(s) done, ...`.
pub fn summary_line<'a>(stderr: &'a str, stage: &str) -> &'a str {
    stderr
        .lines()
        .find(|l| l.starts_with(&format!("{stage}: ")) && l.contains("unit(s) done"))
        .unwrap_or_else(|| panic!("no summary for {stage} in:\n{stderr}"))
}

/// Units done in this run for a stage, from its summary line.
pub fn units_done(stderr: &str, stage: &str) -> usize {
    let line = summary_line(stderr, stage);
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Starts `safepipe run CONFIG` `rounds` times and `kill -9`s round k (0-based, of n) once
/// `progress()` reaches `total * k / (n + 1)`, plus a seeded delay of up to `jitter_us`: the
/// kills spread over the run (the first one during planning) whatever this machine's speed. Returns how many runs were still going when
/// killed (the others finished first).
pub fn kill_at_progress(
    config: &Path,
    rounds: usize,
    total: usize,
    progress: impl Fn() -> usize,
    jitter_us: u64,
    seed: u64,
) -> usize {
    let mut state = seed;
    let mut kills = 0;
    for k in 0..rounds {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let target = total * k / (rounds + 1);
        let mut child = spawn_run(config);
        while progress() < target && child.try_wait().unwrap().is_none() {
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        std::thread::sleep(std::time::Duration::from_micros(state % jitter_us.max(1)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
    }
    kills
}

/// The small samples (9 units), harmful prompts tagged, tokenized and packed.
pub fn token_config(run_dir: &str, extra: &str) -> String {
    format!(
        "run_dir = {run_dir:?}\n\n{}{extra}\n\n\
         [[route.rules]]\nname = \"too_short\"\nwhen = \"length(trim(text)) < 20\"\nroute = \"drop\"\n\n\
         [[route.rules]]\nname = \"harmful_prompts\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n\n\
         [tag]\nprobability = 0.2\n\n\
         [tokenize]\ntokenizer = {:?}\n\n\
         [pack]\nseq_len = 255\nshard_sequences = 100\n",
        small_sample_inputs(),
        gguf()
    )
}

/// The work `status` says the next run does, per stage (units).
pub fn predicted(config: &Path) -> BTreeMap<String, usize> {
    let out = safepipe(&["status", config.to_str().unwrap(), "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stages: Value = serde_json::from_slice(&out.stdout).unwrap();
    stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let todo: u64 = s["to_do"]
                .as_object()
                .unwrap()
                .values()
                .map(|n| n.as_u64().unwrap())
                .sum();
            (s["stage"].as_str().unwrap().to_string(), todo as usize)
        })
        .collect()
}

/// Hashes of the committed shards, in manifest order.
pub fn shard_hashes(run_dir: &Path) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let manifest: Value = serde_json::from_slice(&std::fs::read(run_dir.join("pack/manifest.json")).unwrap()).unwrap();
    manifest["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            hex::encode(Sha256::digest(
                std::fs::read(run_dir.join(s["file"].as_str().unwrap())).unwrap(),
            ))
        })
        .collect()
}

/// Every file under `dir` (recursively), in no particular order.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}
