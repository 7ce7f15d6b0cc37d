//! The Kubernetes templates, checked as far as a machine without a cluster allows (issue 13,
//! item 5): every manifest validates against the batch/v1 Job schema (the `kubernetes`
//! package's models of the API, tests/python/check_k8s.py), and the pods' commands, started as
//! Kubernetes starts them (the plan Job, then every index of the Indexed Job with its
//! `JOB_COMPLETION_INDEX` and the manifest's environment, twice as the README says for pack),
//! produce what one process produces.
//!
//! Not covered here: scheduling, the pod failure policy and `backoffLimitPerIndex` (they need a
//! cluster); a retried index is emulated by running it again.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

/// The pod's command line for `job` with the config mounted from `dir` instead of its volume.
fn pod_args(job: &Value, dir: &Path) -> Vec<String> {
    let mount = job["config_mount"].as_str().expect("a config volume");
    job["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().replace(mount, &dir.display().to_string()))
        .collect()
}

/// Starts the pod of `job` with Kubernetes' index variable (for an Indexed Job).
fn start_pod(job: &Value, dir: &Path, index: Option<u64>) -> std::process::Child {
    let mut command = Command::new(bin());
    command.args(pod_args(job, dir));
    for (k, v) in job["env"].as_object().unwrap() {
        command.env(k, v.as_str().unwrap());
    }
    if let Some(i) = index {
        command.env("JOB_COMPLETION_INDEX", i.to_string());
    }
    command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn succeed(child: std::process::Child, what: &str) -> String {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{what}: {}", text(&out.stderr));
    text(&out.stderr)
}

/// Every index of the Indexed Job, `parallelism` at a time.
fn run_indexed_job(job: &Value, dir: &Path) -> Vec<String> {
    let completions = job["completions"].as_u64().unwrap();
    let parallelism = job["parallelism"].as_u64().unwrap_or(completions).max(1);
    let mut logs = Vec::new();
    let indices: Vec<u64> = (0..completions).collect();
    for wave in indices.chunks(parallelism as usize) {
        let pods: Vec<_> = wave.iter().map(|&i| (i, start_pod(job, dir, Some(i)))).collect();
        for (i, pod) in pods {
            logs.push(succeed(pod, &format!("index {i}")));
        }
    }
    logs
}

#[test]
fn the_kubernetes_jobs_validate_and_their_indexed_pods_match_one_process() {
    let files = ["deploy/k8s/plan-job.yaml", "deploy/k8s/pipeline-indexed-job.yaml"].map(|f| repo().join(f));
    let report = python_oracle("check_k8s.py", &files);
    let job = |f: &Path| report[f.display().to_string().as_str()].clone();
    let (plan, indexed) = (job(&files[0]), job(&files[1]));
    assert_eq!(indexed["completion_mode"], "Indexed");
    assert_eq!(indexed["restart_policy"], "Never");
    // The world size the pods claim is the number of indices.
    assert_eq!(
        indexed["env"]["SAFEPIPE_WORLD_SIZE"].as_str().unwrap(),
        indexed["completions"].to_string()
    );

    // The ConfigMap: the pipeline config, mounted where the manifests expect it.
    let ws = Workspace::new();
    let dir = ws.path().join("configmap");
    std::fs::create_dir_all(&dir).unwrap();
    let run_dir = ws.path().join("run-k8s").display().to_string();
    std::fs::write(dir.join("pipeline.toml"), token_config(&run_dir, "")).unwrap();
    let one = ws.config(
        "one.toml",
        &token_config(&ws.path().join("run-one").display().to_string(), ""),
    );
    run_ok(&one, &[]);

    succeed(start_pod(&plan, &dir, None), "the plan Job");
    // First pass: every rank's units; then the Job again for pack (deploy/README.md).
    run_indexed_job(&indexed, &dir);
    run_indexed_job(&indexed, &dir);
    let k8s = dir.join("pipeline.toml");
    assert!(
        ws.path().join("run-k8s/pack/manifest.json").exists(),
        "the second pass did not pack"
    );
    let left: usize = predicted(&k8s).values().sum();
    assert_eq!(left, 0, "work left after both passes: {:?}", predicted(&k8s));
    // A retried index (backoffLimitPerIndex) finds nothing left to do and commits nothing new.
    let before = sql_rows(&k8s, "SELECT stage, unit, finished_at FROM stats");
    succeed(start_pod(&indexed, &dir, Some(3)), "a retried index");
    assert_eq!(sql_rows(&k8s, "SELECT stage, unit, finished_at FROM stats"), before);

    for query in [
        "SELECT id, text, source FROM documents",
        "SELECT id, route, rule FROM routes",
        "SELECT id, text, tag_offsets FROM tagged",
        "SELECT id, kind, input_ids FROM tokens",
        "SELECT input_ids, doc_offsets, sources, continues FROM shards",
    ] {
        let (a, b) = (sql_rows(&one, query), sql_rows(&k8s, query));
        assert!(!a.is_empty(), "{query}: no rows");
        assert!(a == b, "{query}: the Indexed Job's rows differ from one process's");
    }
    assert_eq!(
        shard_hashes(&ws.path().join("run-one")),
        shard_hashes(&ws.path().join("run-k8s"))
    );
    let units = sql_number(&k8s, "SELECT count(*) FROM stats WHERE stage = 'ingest'");
    let ranks = sql_number(&k8s, "SELECT count(DISTINCT rank) FROM stats WHERE stage = 'ingest'");
    assert!(ranks > 1 && units >= ranks, "{ranks} ranks did {units} ingest units");
}
