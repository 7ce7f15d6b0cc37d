//! The same pipeline against a real S3-compatible server (moto, installed by `make setup`) on
//! 127.0.0.1: inputs and the run directory both on S3, then SQL over the S3 run directory.

mod common;

use common::*;
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_moto() -> (Server, u16) {
    let moto = repo().join(".venv/bin/moto_server");
    assert!(moto.exists(), "{} is missing: run `make setup` first", moto.display());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(moto)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start on port {port}");
        std::thread::sleep(Duration::from_millis(200));
    }
    (server, port)
}

fn s3_env(port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID", "test".into()),
        ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("RUST_LOG", "info".into()),
    ]
}

fn safepipe_s3(port: u16, args: &[&str]) -> Output {
    Command::new(bin()).args(args).envs(s3_env(port)).output().unwrap()
}

/// Creates the bucket `corpus` and uploads sample files to `corpus/input/NAME` (boto3).
fn upload_samples(port: u16, files: &[&str]) {
    let upload = format!(
        "import boto3, sys\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
         s3.create_bucket(Bucket='corpus')\n\
         for path in sys.argv[1:]:\n    s3.upload_file(path, 'corpus', 'input/' + path.rsplit('/', 1)[1])\n"
    );
    let mut args = vec!["-c".to_string(), upload];
    args.extend(files.iter().map(|f| sample(f).display().to_string()));
    let status = Command::new(repo().join(".venv/bin/python"))
        .args(&args)
        .status()
        .unwrap();
    assert!(status.success(), "uploading the sample to moto failed");
}

const DOCUMENTS: &str = "SELECT id, source, md5(text) AS h, metadata FROM documents";
const QUARANTINE: &str = "SELECT source, unit, \"offset\", records, reason, id FROM quarantine";
const ROUTES: &str = "SELECT id, route, rule FROM routes";
const TOKENS: &str = "SELECT id, kind, n_tokens, md5(array_to_string(input_ids, ',')) AS h FROM tokens";
const SHARDS: &str = "SELECT md5(array_to_string(input_ids, ',')) AS h, doc_offsets, sources, continues FROM shards";

/// Tokenize and pack too, so the global stage reads and writes through S3.
fn token_sections() -> String {
    format!(
        "[tokenize]\ntokenizer = {:?}\n\n[pack]\nseq_len = 1023\nshard_sequences = 500\n",
        gguf()
    )
}

#[test]
fn pipeline_runs_with_inputs_and_run_dir_on_s3() {
    let (_server, port) = start_moto();
    let files = [
        "spamassassin-ham.jsonl",
        "spamassassin-spam.jsonl.gz",
        "harmbench.parquet",
        "strongreject.jsonl.zst",
    ];
    upload_samples(port, &files);

    let ws = Workspace::new();
    let local = ws.config("local.toml", &sample_config(&token_sections()));
    run_ok(&local, &[]);

    let remote_inputs = sample_inputs()
        .lines()
        .map(|l| match files.iter().find(|f| l.contains(*f)) {
            Some(f) => format!("paths = [\"s3://corpus/input/{f}\"]"),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let remote = ws.config(
        "remote.toml",
        &sample_config(&format!("{}\n[runner]\nsnapshot_records = 1\n", token_sections()))
            .replace("run_dir = \"run\"", "run_dir = \"s3://corpus/runs/demo\"")
            .replace(&sample_inputs(), &format!("{remote_inputs}\n")),
    );
    let remote = remote.to_str().unwrap();
    let first = safepipe_s3(port, &["run", remote]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let stderr = text(&first.stderr);
    assert!(units_done(&stderr, "ingest") > 4, "{stderr}");
    assert!(summary_line(&stderr, "pack").contains("1 unit(s) done"), "{stderr}");

    let remote_path = std::path::Path::new(remote);
    for query in [DOCUMENTS, QUARANTINE, ROUTES, TOKENS, SHARDS] {
        assert_eq!(
            sql_rows_with_env(remote_path, query, &s3_env(port)),
            sql_rows(&local, query),
            "{query}"
        );
    }
    let files = sql_rows_with_env(remote_path, "SELECT DISTINCT file FROM quarantine", &s3_env(port));
    assert!(files.iter().all(|f| f.contains("s3://corpus/input/")), "{files:?}");

    // Resuming against S3 does no work.
    let again = safepipe_s3(port, &["run", remote]);
    assert!(again.status.success());
    assert_eq!(units_done(&text(&again.stderr), "ingest"), 0);
    assert_eq!(units_done(&text(&again.stderr), "pack"), 0);
    let shards = sql_rows_with_env(remote_path, SHARDS, &s3_env(port)).len();
    assert!(shards > 1000, "{shards} shards rows");
    let status = text(&safepipe_s3(port, &["status", remote]).stdout);
    assert!(status.contains("s3://corpus/runs/demo"), "{status}");
    // The record snapshots written by the first run serve every record: the tags S3 gave the
    // records' PUTs are the ones its listings show.
    let traced = Command::new(bin())
        .args(["status", remote])
        .envs(s3_env(port))
        .env("RUST_LOG", "safepipe=debug")
        .output()
        .unwrap();
    let traced = text(&traced.stderr);
    for stage in ["ingest", "route", "tag", "tokenize"] {
        let line = traced
            .lines()
            .find(|l| l.contains("completion records") && l.contains(&format!("stage=\"{stage}\"")))
            .unwrap_or_else(|| panic!("no record line for {stage}:\n{traced}"));
        assert!(line.contains(" read=0") && !line.contains("from_snapshot=0"), "{line}");
    }

    // A local run directory moved to S3 as it is (every file uploaded) works there: nothing to
    // redo, the same tables.
    let copy = format!(
        "import boto3, os, sys\n\
         s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{port}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n\
         root = sys.argv[1]\n\
         for d, _, names in os.walk(root):\n    for n in names:\n        p = os.path.join(d, n)\n        s3.upload_file(p, 'corpus', 'runs/moved/' + os.path.relpath(p, root))\n"
    );
    let status = Command::new(repo().join(".venv/bin/python"))
        .args(["-c", &copy, ws.path().join("run").to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "uploading the run directory failed");
    let moved = ws.config(
        "moved.toml",
        &sample_config(&token_sections()).replace("run_dir = \"run\"", "run_dir = \"s3://corpus/runs/moved\""),
    );
    let resumed = safepipe_s3(port, &["run", moved.to_str().unwrap()]);
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    for stage in ["ingest", "route", "tag", "tokenize", "pack"] {
        assert_eq!(
            units_done(&text(&resumed.stderr), stage),
            0,
            "{}",
            text(&resumed.stderr)
        );
    }
    for query in [DOCUMENTS, QUARANTINE, ROUTES, TOKENS, SHARDS] {
        assert_eq!(
            sql_rows_with_env(&moved, query, &s3_env(port)),
            sql_rows(&local, query),
            "{query}"
        );
    }
}

/// The whole pipeline through a proxy that answers a fifth of the requests with 503 SlowDown or
/// 500, cuts answers in the middle of their bodies, or stalls them past the client's timeout
/// (tests/common/fault_proxy.rs, seeded). Every unit completes, the tables and shards equal a
/// fault-free run's, and the retries are bounded and counted. Repro before the fix: a body cut
/// mid-way (a listing, a record, a Parquet range) failed its unit (`object_store` retries 5xx
/// answers, not broken bodies), so the run ended with failed units.
#[test]
fn pipeline_completes_through_an_unreliable_object_store() {
    use common::fault_proxy::{FaultProxy, Rates};
    let (_server, port) = start_moto();
    let files = [
        "spamassassin-spam.jsonl.gz",
        "harmbench.parquet",
        "strongreject.jsonl.zst",
    ];
    upload_samples(port, &files);

    let ws = Workspace::new();
    let inputs: String = files
        .iter()
        .enumerate()
        .map(|(i, f)| format!("[[inputs]]\nname = \"s{i}\"\npaths = [\"s3://corpus/input/{f}\"]\n\n"))
        .collect();
    let body = |run: &str| format!("run_dir = \"s3://corpus/runs/{run}\"\n\n{inputs}{}", token_sections());
    let clean = ws.config("clean.toml", &body("clean"));
    let faulty = ws.config("faulty.toml", &body("faulty"));
    let out = safepipe_s3(port, &["run", clean.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    let rates = Rates {
        slow_down: 0.08,
        internal_error: 0.06,
        cut: 0.06,
        stall: 0.005,
        stall_for: Duration::from_secs(2),
    };
    let proxy = FaultProxy::start(port, rates, 12);
    let mut env = s3_env(proxy.port);
    // A stalled answer times out after 1 s and is retried.
    env.push(("AWS_TIMEOUT", "1s".into()));
    let out = Command::new(bin())
        .args(["run", faulty.to_str().unwrap()])
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    eprintln!("fault proxy: {}", proxy.summary());
    assert!(out.status.success(), "{stderr}");
    for stage in ["ingest", "route", "tag", "tokenize", "pack"] {
        assert!(summary_line(&stderr, stage).contains(" 0 failed"), "{stage}: {stderr}");
    }
    let faults = &proxy.faults;
    let injected = [&faults.slow_down, &faults.internal_error, &faults.cut, &faults.stalled]
        .map(|a| a.load(std::sync::atomic::Ordering::Relaxed));
    assert!(
        injected.iter().all(|&n| n > 0),
        "every kind of fault happened: {}",
        proxy.summary()
    );
    let storage_figure = |what: &str| -> u64 {
        stderr
            .lines()
            .filter(|l| l.contains(what))
            .find_map(|l| l.strip_prefix("storage: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {what:?} figure in:\n{stderr}"))
    };
    let retried = storage_figure("retried after transport errors");
    eprintln!("safepipe retried {retried} requests after transport errors");
    let requests = faults.requests.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        retried >= 1 && retried <= requests,
        "{retried} retries for {requests} requests"
    );
    // The requests safepipe counts are the ones that reached the server, retries included.
    assert_eq!(storage_figure("sent to object stores"), requests, "{stderr}");

    // Read back without faults: the same tables as the fault-free run, the same shards.
    for query in [DOCUMENTS, QUARANTINE, ROUTES, TOKENS, SHARDS] {
        assert_eq!(
            sql_rows_with_env(&faulty, query, &s3_env(port)),
            sql_rows_with_env(&clean, query, &s3_env(port)),
            "{query}"
        );
    }
}
