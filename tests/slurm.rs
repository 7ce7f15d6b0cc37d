//! The Slurm templates under a real scheduler (issue 13, item 1): `make test-slurm` starts a
//! one-node Slurm (scripts/slurm_local.sh) and runs this test against it.
//!
//! `deploy/slurm/submit.sh` plans, runs an array of 4 ranks, then the array again to pack;
//! one array task is preempted (requeued by `scontrol`) while it runs, and is run again by the
//! scheduler. `deploy/slurm/train.sbatch` then trains with 2 tasks over the TCP collective.
//! Every table must equal a one-process local run as a multiset, the shards byte for byte, and
//! the trained weights those of two local processes bit for bit.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The small samples tagged, tokenized and packed, and a tiny model trained on them.
fn config(ws: &Workspace, name: &str) -> std::path::PathBuf {
    let body = format!(
        "{}\n[train]\nmodel = \"tiny\"\ncheckpoint_dir = \"ckpt-{name}\"\nsteps = 3\nmicro_batch = 2\n\
         lr = 0.01\nwarmup_steps = 1\nseed = 1\n",
        token_config(&format!("run-{name}"), "[plan]\njsonl_unit_bytes = 65536\n")
    );
    ws.config(&format!("{name}.toml"), &body)
}

/// Runs a Slurm client command (with `SAFEPIPE_BIN` for the jobs it submits), asserting success.
fn slurm(command: &str, args: &[&str]) -> Output {
    let out = Command::new(command)
        .args(args)
        .env("SAFEPIPE_BIN", bin())
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"));
    assert!(out.status.success(), "{command} {args:?}: {}", text(&out.stderr));
    out
}

/// The tables of a run as multisets (sorted JSON lines), without columns that name the rank,
/// the attempt or the clock.
fn tables(config: &Path) -> Vec<(String, Vec<String>)> {
    let queries = [
        ("documents", "SELECT id, text, source, metadata FROM documents"),
        (
            "quarantine",
            "SELECT file, \"offset\", records, reason, id FROM quarantine",
        ),
        ("routes", "SELECT id, route, rule, also_tag FROM routes"),
        ("tagged", "SELECT id, text, tag_offsets FROM tagged"),
        ("tokens", "SELECT id, kind, input_ids FROM tokens"),
        (
            "shards",
            "SELECT input_ids, doc_offsets, sources, continues FROM shards",
        ),
    ];
    queries
        .iter()
        .map(|(name, q)| (name.to_string(), sql_rows(config, q)))
        .collect()
}

/// Two local `safepipe train` processes (torchrun-style variables) on `config`'s shards.
fn train_locally(config: &Path) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            Command::new(bin())
                .args(["train", config.to_str().unwrap()])
                .envs([
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.to_string()),
                    ("SAFEPIPE_JOB_SECRET", "local-test-secret".into()),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "local train: {}", text(&out.stderr));
    }
}

/// The array task `job_task` ("JOB_INDEX"): its state, or None once it left the queue.
fn state(job_task: &str) -> Option<String> {
    let out = Command::new("squeue")
        .args(["-h", "-j", job_task, "-o", "%T %r"])
        .output()
        .ok()?;
    let s = text(&out.stdout).trim().to_string();
    (!s.is_empty()).then_some(s)
}

#[test]
#[ignore = "needs a Slurm cluster: make test-slurm"]
fn under_slurm_an_array_with_a_preempted_task_then_pack_and_training_match_local_runs() {
    assert!(
        std::env::var_os("SLURM_CONF").is_some(),
        "run through `make test-slurm`"
    );
    let ws = Workspace::new();
    let logs = ws.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();

    // The reference: one process, then two local training ranks.
    let local = config(&ws, "local");
    run_ok(&local, &[]);
    train_locally(&local);

    // The cluster: plan, array of 4, a requeue while task 1 runs, the pack array.
    let cluster = config(&ws, "cluster");
    let submit = repo().join("deploy/slurm/submit.sh");
    let mut child = Command::new(&submit)
        .args([cluster.to_str().unwrap(), "4", "--cpus-per-task=1", "--mem=2G"])
        .current_dir(ws.path())
        .env("SAFEPIPE_BIN", bin())
        .env("LOG_DIR", &logs)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    // The array job's id, once submitted.
    let job = loop {
        assert!(Instant::now() < deadline, "the array never appeared in the queue");
        let out = slurm("squeue", &["-h", "-n", "safepipe", "-o", "%F"]);
        if let Some(id) = text(&out.stdout).lines().next() {
            break id.trim().to_string();
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "submit.sh ended before its array was seen"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let task = format!("{job}_1");
    // Preempt task 1 once it is running safepipe (its log has lines), as PreemptMode=REQUEUE
    // would: Slurm kills it and queues it again under the same index.
    loop {
        assert!(Instant::now() < deadline, "task {task} never ran");
        let err = std::fs::read_to_string(logs.join(format!("safepipe_{job}_1.err"))).unwrap_or_default();
        if state(&task).is_some_and(|s| s.starts_with("RUNNING")) && !err.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    slurm("scontrol", &["requeue", &task]);
    // A requeued job waits two minutes before it may start again; the test does not.
    let task_out = logs.join(format!("safepipe_{job}_1.out"));
    while !std::fs::read_to_string(&task_out)
        .unwrap_or_default()
        .contains("attempt 2")
    {
        assert!(Instant::now() < deadline, "task {task} was not run again");
        if state(&task).is_some_and(|s| s.starts_with("PENDING")) {
            let _ = Command::new("scontrol")
                .args(["update", &format!("JobId={task}"), "StartTime=now"])
                .output();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "submit.sh failed:\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let task_log = std::fs::read_to_string(&task_out).unwrap();
    assert!(
        task_log.contains("attempt 1") && task_log.contains("attempt 2"),
        "task 1 was not run twice:\n{task_log}"
    );

    // Training: 2 tasks on this node through train.sbatch (srun, SLURM_PROCID, TCP rendezvous).
    let train = slurm(
        "sbatch",
        &[
            "--wait",
            "--ntasks=2",
            "--ntasks-per-node=2",
            "--cpus-per-task=1",
            "--mem=4G",
            &format!("--output={}/train_%j.out", logs.display()),
            &format!("--error={}/train_%j.err", logs.display()),
            "--export=ALL",
            repo().join("deploy/slurm/train.sbatch").to_str().unwrap(),
            cluster.to_str().unwrap(),
        ],
    );
    assert!(
        text(&train.stdout).contains("Submitted batch job"),
        "{}",
        text(&train.stdout)
    );

    // Same tables, same shards, same weights.
    let (a, b) = (tables(&local), tables(&cluster));
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        assert!(!x.is_empty() || name == "quarantine", "{name} is empty");
        assert!(x == y, "{name} differs between the local and the Slurm run");
    }
    assert_eq!(
        shard_hashes(&ws.path().join("run-local")),
        shard_hashes(&ws.path().join("run-cluster"))
    );
    let weights =
        |name: &str| std::fs::read(ws.path().join(format!("ckpt-{name}/step-00000003/model.safetensors"))).unwrap();
    assert!(weights("local") == weights("cluster"), "the weights differ");
}
