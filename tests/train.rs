//! End-to-end training over the real binary: the sample corpus tokenized and packed, then
//! `safepipe train` on the shards with the CPU reference backend.

mod common;

use common::*;
use std::path::Path;

/// Spam, HarmBench and StrongREJECT packed into short rows, and a tiny model trained on them.
fn config(ws: &Workspace, name: &str, steps: u64) -> std::path::PathBuf {
    let mut s = format!("run_dir = \"run\"\n\n{}", small_sample_inputs());
    s.push_str(&format!(
        "[[route.rules]]\nname = \"harmful\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n\n\
         [tokenize]\ntokenizer = {:?}\n\n[pack]\nseq_len = 63\n\n\
         [train]\nmodel = \"tiny\"\ncheckpoint_dir = \"ckpt-{name}\"\nsteps = {steps}\nmicro_batch = 4\n\
         lr = 0.01\nwarmup_steps = 2\nweight_decay = 0.1\nseed = 1\n",
        gguf()
    ));
    ws.config(&format!("{name}.toml"), &s)
}

fn train(config: &Path, extra: &[&str]) -> String {
    let mut args = vec!["train", config.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = safepipe(&args);
    assert!(out.status.success(), "train failed:\n{}", text(&out.stderr));
    text(&out.stderr)
}

/// `train: steps 1..N, loss A -> B, ...`
fn losses(stderr: &str) -> (f64, f64) {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("train: steps"))
        .unwrap_or_else(|| panic!("{stderr}"));
    let part = line.split("loss ").nth(1).unwrap();
    let mut numbers = part.split([' ', ',']).filter_map(|w| w.parse::<f64>().ok());
    (numbers.next().unwrap(), numbers.next().unwrap())
}

#[test]
fn loss_falls_and_a_stopped_run_resumes_bit_exactly() {
    let ws = Workspace::new();
    let straight = config(&ws, "straight", 24);
    run_ok(&straight, &[]);
    // Before training there is no checkpoint: --resume says so (exit 2).
    let early = safepipe(&["train", straight.to_str().unwrap(), "--resume"]);
    assert_eq!(early.status.code(), Some(2), "{}", text(&early.stderr));

    let stderr = train(&straight, &[]);
    let (first, last) = losses(&stderr);
    // ln(49153) = 10.8 at the start; 24 steps on real text must bring it down clearly.
    assert!(first > 10.0 && last < first - 1.5, "loss {first} -> {last}\n{stderr}");
    let ckpt = ws.path().join("ckpt-straight/step-00000024");
    for file in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ckpt.join(file).exists(), "{file} missing");
    }
    let config_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config_json["model_type"], "llama");
    assert_eq!(config_json["vocab_size"], 49153);

    // Stop at step 5 (as a time limit would), then resume to 24: the same weights, bit for bit.
    let stopped = config(&ws, "stopped", 24);
    train(&stopped, &["--until", "5"]);
    assert_eq!(
        std::fs::read_to_string(ws.path().join("ckpt-stopped/latest")).unwrap(),
        "step-00000005"
    );
    let resumed = train(&stopped, &["--resume"]);
    assert!(resumed.contains("train: steps 6..24"), "{resumed}");
    assert_eq!(
        std::fs::read(ws.path().join("ckpt-stopped/step-00000024/model.safetensors")).unwrap(),
        std::fs::read(ckpt.join("model.safetensors")).unwrap()
    );
    // metrics.jsonl: one line per step across the stop and the resume, the same losses as the
    // straight run's.
    let steps = |dir: &str| -> Vec<(u64, f64)> {
        std::fs::read_to_string(ws.path().join(dir).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
            })
            .collect()
    };
    let straight_steps = steps("ckpt-straight");
    assert_eq!(
        straight_steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=24).collect::<Vec<_>>()
    );
    assert_eq!(steps("ckpt-stopped"), straight_steps);
}

/// `safepipe generate --checkpoint` decodes what `safepipe train` wrote, with every decoder; the
/// tag never appears in a safe-beam continuation; a model without the tag refuses safe-beam.
#[test]
fn generate_decodes_a_trained_checkpoint_with_every_decoder() {
    let ws = Workspace::new();
    let config = config(&ws, "gen", 6);
    run_ok(&config, &[]);
    train(&config, &[]);
    let ckpt = ws.path().join("ckpt-gen/step-00000006");
    let ckpt = ckpt.to_str().unwrap();
    let prompts = ["How do I", "Dear friend, I write to"];
    for (decoder, extra) in [
        ("greedy", vec![]),
        ("sample", vec!["--temperature", "0.8", "--seed", "3"]),
        ("beam", vec!["--beams", "3"]),
        ("safe-beam", vec!["--beams", "2", "--candidates", "4"]),
    ] {
        let mut args = vec![
            "generate",
            "--checkpoint",
            ckpt,
            "--max-tokens",
            "8",
            "--decoder",
            decoder,
        ];
        args.extend(extra.iter().copied());
        args.extend(prompts);
        let out = safepipe(&args);
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{decoder}: {stderr}");
        let named = if decoder == "greedy" { "sample" } else { decoder };
        assert!(stderr.contains(&format!("decoder {named}")), "{stderr}");
        let lines: Vec<serde_json::Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{decoder}: {lines:?}");
        for (i, line) in lines.iter().enumerate() {
            assert_eq!(line["prompt"], i);
            let tokens = line["completion_tokens"].as_u64().unwrap();
            assert!((1..=8).contains(&tokens) || line["finish_reason"] == "stop", "{line}");
            if decoder == "safe-beam" {
                assert!(
                    !line["text"].as_str().unwrap().contains("<potentially unsafe content>"),
                    "{line}"
                );
            }
        }
    }
    // The tiny preset's feed-forward width (172) has no whole Q8_0 blocks: a clear error.
    let out = safepipe(&["generate", "--checkpoint", ckpt, "--precision", "q8_0", "x"]);
    assert!(text(&out.stderr).contains("multiple of 32"), "{}", text(&out.stderr));
    // The SmolLM2 GGUF has no tag token: safe-beam is refused per prompt, naming the tag.
    let out = safepipe(&[
        "generate",
        "--model",
        &gguf(),
        "--decoder",
        "safe-beam",
        "--max-tokens",
        "2",
        "hi",
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stdout).contains("tag token"), "{}", text(&out.stdout));
    // Bad decoder settings are configuration errors.
    let out = safepipe(&[
        "generate",
        "--checkpoint",
        ckpt,
        "--decoder",
        "safe-beam",
        "--candidates",
        "1",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

/// Our logits on a checkpoint equal an independent numpy implementation of Hugging Face's Llama
/// forward, and `transformers`' own where PyTorch is installed (skipped cleanly otherwise).
#[test]
fn logits_match_an_independent_llama_forward() {
    use safepipe_model::llama::{Batch, CpuModel, LlamaConfig, Params};
    use safepipe_model::train::{OptimConfig, Trainer};
    let ws = Workspace::new();
    let cfg = LlamaConfig::preset("micro").unwrap();
    let params = Params::<f32>::init(&cfg, 7);
    let optim = OptimConfig {
        weight_decay: 0.0,
        clip: 0.0,
        ..OptimConfig::default()
    };
    let trainer = Trainer::new(cfg.clone(), params.clone(), optim).unwrap();
    let dir = ws.path().join("ckpt");
    trainer.save(&dir, 1, 0, serde_json::Value::Null).unwrap();
    let (rows, seq_len) = (2, 11);
    let tokens: Vec<u32> = (0..rows * (seq_len + 1))
        .map(|i| ((i * 37 + 5) % cfg.vocab_size) as u32)
        .collect();
    let batch = Batch {
        rows,
        seq_len,
        tokens: tokens.clone(),
        segments: None,
        loss_mask: None,
    };
    let logits = CpuModel::new(cfg.clone()).unwrap().logits(&params, &batch);
    let case = ws.path().join("case.json");
    std::fs::write(
        &case,
        serde_json::json!({"rows": rows, "seq_len": seq_len, "tokens": tokens, "logits": logits}).to_string(),
    )
    .unwrap();
    let report = python_oracle(
        "check_llama_parity.py",
        &[dir.to_str().unwrap(), case.to_str().unwrap()],
    );
    assert!(report["numpy_max_abs_diff"].as_f64().unwrap() < 1e-4, "{report}");
}

/// A free loopback port for rank 0 (bound, read, released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

const SECRET: &str = "a test secret, the same on every rank";

/// `safepipe train CONFIG` as rank `rank` of `world`, rendezvous on 127.0.0.1:`port`, with the job
/// secret and `env` (a value of None removes the variable).
fn rank(config: &Path, rank: usize, world: usize, port: u16, env: &[(&str, Option<&str>)]) -> std::process::Child {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["train", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", world.to_string())
        .env("MASTER_PORT", port.to_string())
        .env("SAFEPIPE_JOB_SECRET", SECRET)
        .env("SAFEPIPE_RENDEZVOUS_TIMEOUT", "120")
        .env_remove("SLURM_JOB_ID")
        .env_remove("TORCHELASTIC_RUN_ID")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.spawn().unwrap()
}

/// Waits for a rank; returns (exit code, stderr), asserting it did not panic.
fn finish(child: std::process::Child) -> (Option<i32>, String) {
    let out = child.wait_with_output().unwrap();
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code(), stderr)
}

/// The config of `two_processes_match_one_process_with_twice_the_batch`'s second run: the first
/// config's shards, micro-batch 2, checkpoints in `ckpt-NAME`.
fn ranks_config(ws: &Workspace, one: &Path, name: &str, steps: u64) -> std::path::PathBuf {
    let body = std::fs::read_to_string(one).unwrap();
    ws.config(
        &format!("{name}.toml"),
        // A run directory of its own, training on the first config's shards (`train.shards`).
        &body
            .replace("run_dir = \"run\"", &format!("run_dir = \"elsewhere-{name}\""))
            .replace("[train]\n", "[train]\nshards = \"run\"\n")
            .replace("ckpt-one", &format!("ckpt-{name}"))
            .replace("micro_batch = 4", "micro_batch = 2")
            .replace("steps = 3\n", &format!("steps = {steps}\n")),
    )
}

/// Two `safepipe train` processes (torchrun-style RANK / WORLD_SIZE, rendezvous on 127.0.0.1,
/// authenticated with SAFEPIPE_JOB_SECRET) with micro-batch b reach the weights of one process
/// with micro-batch 2b.
#[test]
fn two_processes_match_one_process_with_twice_the_batch() {
    use safepipe_model::train::{OptimConfig, Trainer};
    let ws = Workspace::new();
    let one = config(&ws, "one", 3);
    run_ok(&one, &[]);
    train(&one, &[]);
    let two = ranks_config(&ws, &one, "two", 3);
    let port = free_port();
    let children: Vec<_> = (0..2).map(|r| rank(&two, r, 2, port, &[])).collect();
    for child in children {
        let (code, stderr) = finish(child);
        assert_eq!(code, Some(0), "{stderr}");
    }
    let optim = OptimConfig::default();
    let load = |dir: &str| {
        Trainer::load(&ws.path().join(dir).join("step-00000003"), optim.clone())
            .unwrap()
            .0
    };
    let (a, b) = (load("ckpt-one"), load("ckpt-two"));
    let mut worst = 0f32;
    for ((_, x, _), (_, y, _)) in a.params.tensors().into_iter().zip(b.params.tensors()) {
        for (x, y) in x.iter().zip(y) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst < 1e-5, "max weight difference {worst}");

    // The same two ranks started by `--nproc-per-node 2` (issue 14): bit-identical weights, and
    // every line of theirs comes out under its rank.
    let launched = ranks_config(&ws, &one, "launched", 3);
    let out = launch_ranks(&launched, 2).output().unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("[rank 0] train: steps 1..3"), "{stderr}");
    assert!(stderr.contains("[rank 1]"), "{stderr}");
    let launched = load("ckpt-launched");
    for ((name, x, _), (_, y, _)) in b.params.tensors().into_iter().zip(launched.params.tensors()) {
        assert!(x == y, "{name} differs between hand-started and launched ranks");
    }
}

/// Issue 14: under `--nproc-per-node`, a rank that dies stops the others at once (rank 0 would
/// otherwise wait for it until the collective timeout, 30 minutes by default), and the launcher
/// fails naming it.
#[cfg(unix)]
#[test]
fn a_dead_rank_stops_the_others_under_the_launcher() {
    use std::io::BufRead;
    let ws = Workspace::new();
    let one = config(&ws, "one", 3);
    run_ok(&one, &[]);
    let long = ranks_config(&ws, &one, "long", 100_000);
    let mut launcher = launch_ranks(&long, 2)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufReader::new(launcher.stderr.take().unwrap());
    let mut stderr = String::new();
    let mut killed = None;
    for line in lines.lines() {
        let line = line.unwrap();
        if killed.is_none() && line.starts_with("[rank 0]") && line.contains("rank 1 joined") {
            // Rank 1 is the launcher's child whose environment says RANK=1.
            let pid = children_of(launcher.id())
                .into_iter()
                .find(|pid| environ(*pid).iter().any(|v| v == "RANK=1"))
                .expect("rank 1 runs under the launcher");
            assert!(
                std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status()
                    .unwrap()
                    .success()
            );
            killed = Some(pid);
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = launcher.wait().unwrap();
    assert!(killed.is_some(), "rank 1 never joined:\n{stderr}");
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("rank 1 was killed by signal 9; stopped rank(s) 0"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // Rank 0 is gone too: no child of the launcher outlives it.
    assert!(children_of(launcher.id()).is_empty());
}

/// `safepipe train CONFIG --nproc-per-node N`, outside any other launcher's rank variables.
fn launch_ranks(config: &Path, nproc: usize) -> std::process::Command {
    let mut cmd = std::process::Command::new(bin());
    cmd.args([
        "train",
        config.to_str().unwrap(),
        "--nproc-per-node",
        &nproc.to_string(),
    ])
    .env("RUST_LOG", "info");
    for var in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"] {
        cmd.env_remove(var);
    }
    cmd
}

/// The pids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its closing parenthesis.
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            pids.push(pid);
        }
    }
    pids
}

/// A process's environment as `KEY=value` strings.
fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|&c| c == 0)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The rendezvous preamble of protocol 1 (model/src/collective/tcp.rs).
fn preamble() -> Vec<u8> {
    let mut p = b"SAFEPIPE".to_vec();
    p.extend_from_slice(&1u32.to_le_bytes());
    p
}

/// Connects to rank 0 once it listens.
fn dial(port: u16) -> std::net::TcpStream {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
                return s;
            }
            Err(e) if std::time::Instant::now() > deadline => panic!("rank 0 never listened: {e}"),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// Issue 12, item 7. Before, the rendezvous took any connection that wrote a free rank as 4 bytes,
/// sent it the model's weights and then waited on it without a timeout:
///
/// ```text
/// RANK=0 WORLD_SIZE=2 safepipe train c.toml &
/// printf '\x01\x00\x00\x00' | nc 127.0.0.1 29500 | wc -c     # the weights, to anyone
/// ```
///
/// and a peer that went away made every `send` / `receive` panic. Now rank 0 refuses (and logs)
/// an oversized frame, a client that cannot prove the job secret (it gets an ERROR frame and no
/// weights) and a real `safepipe` with the wrong secret (which exits 2 saying why), then trains with
/// the real rank 1.
#[test]
fn issue_12_hostile_peers_are_refused_and_the_real_rank_still_joins() {
    use std::io::{Read, Write};
    let ws = Workspace::new();
    let one = config(&ws, "one", 3);
    run_ok(&one, &[]);
    let two = ranks_config(&ws, &one, "hostile", 2);
    let port = free_port();
    let zero = rank(&two, 0, 2, port, &[]);

    // A HELLO header announcing 2^62 bytes: refused unread, no huge allocation.
    let mut s = dial(port);
    let mut huge = preamble();
    huge.push(1);
    huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
    s.write_all(&huge).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert_eq!(got, preamble(), "only the preamble, then the connection closes");

    // A client that claims rank 1 (the old attack) with a made-up proof.
    let mut s = dial(port);
    let mut hello = preamble();
    hello.push(1);
    hello.extend_from_slice(&40u64.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&[7u8; 32]);
    s.write_all(&hello).unwrap();
    let mut challenge = [0u8; 12 + 9 + 32];
    s.read_exact(&mut challenge).unwrap();
    let mut proof = vec![3u8];
    proof.extend_from_slice(&32u64.to_le_bytes());
    proof.extend_from_slice(&[0u8; 32]);
    s.write_all(&proof).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest[0], 5, "an ERROR frame, not weights: {rest:?}");
    let message = String::from_utf8_lossy(&rest[9..]).into_owned();
    assert!(message.contains("authentication failed"), "{message}");
    assert_eq!(rest.len(), 9 + message.len(), "nothing after the error");

    // A real rank with the wrong secret: a clear config error (exit 2).
    let (code, stderr) = finish(rank(&two, 1, 2, port, &[("SAFEPIPE_JOB_SECRET", Some("a guess"))]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("refused rank 1: authentication failed"), "{stderr}");

    // The real rank 1 joins and the run completes.
    let worker = rank(&two, 1, 2, port, &[]);
    let (code, stderr) = finish(zero);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("above the limit of 40"), "{stderr}");
    assert_eq!(stderr.matches("failed authentication").count(), 2, "{stderr}");
    let (code, worker_err) = finish(worker);
    assert_eq!(code, Some(0), "{worker_err}");
    assert!(ws.path().join("ckpt-hostile/step-00000002/model.safetensors").exists());
}

/// Ranks that disagree with rank 0 (world size, config) stop at the rendezvous, both naming both
/// values; a group without a secret is a config error.
#[test]
fn issue_12_ranks_that_disagree_fail_naming_both_values() {
    let ws = Workspace::new();
    let one = config(&ws, "one", 3);
    run_ok(&one, &[]);
    let two = ranks_config(&ws, &one, "disagree", 2);

    let (code, stderr) = finish(rank(&two, 1, 2, free_port(), &[("SAFEPIPE_JOB_SECRET", None)]));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("set SAFEPIPE_JOB_SECRET"), "{stderr}");

    let port = free_port();
    let zero = rank(&two, 0, 2, port, &[]);
    let (code, stderr) = finish(rank(&two, 1, 3, port, &[]));
    let want = "rank 1 has world size 3, rank 0 has 2";
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
    let (code, stderr) = finish(zero);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");

    let other = ws.config(
        "other.toml",
        &std::fs::read_to_string(&two)
            .unwrap()
            .replace("micro_batch = 2", "micro_batch = 1"),
    );
    let port = free_port();
    let zero = rank(&two, 0, 2, port, &[]);
    let (code, stderr) = finish(rank(&other, 1, 2, port, &[]));
    let want = "micro_batch = 1 on rank 1, 2 on rank 0";
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
    let (code, stderr) = finish(zero);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(want), "{stderr}");
}

/// A rank that joins and then goes silent (stopped with SIGSTOP) makes rank 0 fail (exit 3) with
/// an error naming it after SAFEPIPE_COLLECTIVE_TIMEOUT; before, rank 0 waited forever.
#[cfg(unix)]
#[test]
fn issue_12_a_silent_rank_fails_rank_0_naming_it() {
    use std::io::BufRead;
    let ws = Workspace::new();
    let one = config(&ws, "one", 3);
    run_ok(&one, &[]);
    let two = ranks_config(&ws, &one, "silent", 100_000);
    let port = free_port();
    let mut zero = rank(&two, 0, 2, port, &[("SAFEPIPE_COLLECTIVE_TIMEOUT", Some("2"))]);
    let mut worker = rank(&two, 1, 2, port, &[("SAFEPIPE_COLLECTIVE_TIMEOUT", Some("600"))]);
    let lines = std::io::BufReader::new(zero.stderr.take().unwrap());
    let mut stderr = String::new();
    let mut stopped = false;
    for line in lines.lines() {
        let line = line.unwrap();
        if !stopped && line.contains("rank 1 joined") {
            let pid = worker.id().to_string();
            assert!(
                std::process::Command::new("kill")
                    .args(["-STOP", &pid])
                    .status()
                    .unwrap()
                    .success()
            );
            stopped = true;
        }
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let code = zero.wait().unwrap().code();
    let _ = worker.kill();
    let _ = worker.wait();
    assert!(stopped, "rank 1 never joined:\n{stderr}");
    assert_eq!(code, Some(3), "{stderr}");
    // Silent while rank 0 waits for its gradient, or while rank 0 sends it the weights or the mean.
    assert!(
        stderr.contains("rank 1 sent nothing for 2 s") || stderr.contains("rank 1 took nothing for 2 s"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Issue 14 on a machine without a GPU (CI, this one): the CUDA backend is built in, says where
/// it found each library, and every GPU command fails with exit 2 naming what is missing, never
/// a panic. (On a machine with a GPU this test only checks `gpu info`.)
#[test]
fn without_a_gpu_the_cuda_backend_fails_clearly_naming_the_driver() {
    let info = safepipe(&["gpu", "info"]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    let stdout = text(&info.stdout);
    assert!(
        stdout.contains("NVRTC (libnvrtc.so.13)") && stdout.contains("NVRTC version"),
        "{stdout}"
    );
    if !stdout.contains("none usable") {
        return;
    }
    let check = safepipe(&["gpu", "check"]);
    assert_eq!(check.status.code(), Some(2), "{}", text(&check.stderr));
    assert!(text(&check.stderr).contains("libcuda.so.1"), "{}", text(&check.stderr));

    let ws = Workspace::new();
    let cuda = config(&ws, "cuda", 2);
    run_ok(&cuda, &[]);
    let body = std::fs::read_to_string(&cuda)
        .unwrap()
        .replace("[train]\n", "[train]\nbackend = \"cuda\"\n");
    std::fs::write(&cuda, body).unwrap();
    let out = safepipe(&["train", cuda.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("the CUDA driver (libcuda.so.1) is not available"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    let bad = std::fs::read_to_string(&cuda)
        .unwrap()
        .replace("backend = \"cuda\"", "backend = \"tpu\"");
    std::fs::write(&cuda, bad).unwrap();
    let out = safepipe(&["train", cuda.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("train.backend = \"tpu\": use \"cpu\" or \"cuda\""),
        "{}",
        text(&out.stderr)
    );
}
