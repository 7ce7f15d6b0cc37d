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

/// Two `safepipe train` processes (torchrun-style RANK / WORLD_SIZE, rendezvous on 127.0.0.1)
/// with micro-batch b reach the weights of one process with micro-batch 2b.
#[test]
fn two_processes_match_one_process_with_twice_the_batch() {
    use safepipe_model::train::{OptimConfig, Trainer};
    let ws = Workspace::new();
    let one = config(&ws, "one", 3);
    run_ok(&one, &[]);
    let body = std::fs::read_to_string(&one).unwrap();
    train(&one, &[]);
    let two = ws.config(
        "two.toml",
        // A run directory of its own, training on the first config's shards (`train.shards`).
        &body
            .replace("run_dir = \"run\"", "run_dir = \"elsewhere\"")
            .replace("[train]\n", "[train]\nshards = \"run\"\n")
            .replace("ckpt-one", "ckpt-two")
            .replace("micro_batch = 4", "micro_batch = 2"),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..2)
        .map(|rank| {
            std::process::Command::new(bin())
                .args(["train", two.to_str().unwrap()])
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", "2")
                .env("MASTER_PORT", port.to_string())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
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
}
