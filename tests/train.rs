//! End-to-end training over the real binary: the sample corpus tokenized and packed, then
//! `safepipe train` on the shards with the CPU reference backend.

mod common;

use common::*;
use std::path::Path;

/// Spam, HarmBench and StrongREJECT packed into short rows, and a tiny model trained on them.
fn config(ws: &Workspace, name: &str, steps: u64) -> std::path::PathBuf {
    let mut s = format!("run_dir = \"run\"\n\n");
    for (input, file) in [
        ("spam", "spamassassin-spam.jsonl.gz"),
        ("harmbench", "harmbench.parquet"),
        ("strongreject", "strongreject.jsonl.zst"),
    ] {
        s.push_str(&format!(
            "[[inputs]]\nname = {input:?}\npaths = [{:?}]\n\n",
            sample(file).display().to_string()
        ));
    }
    let gguf = repo().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    s.push_str(&format!(
        "[[route.rules]]\nname = \"harmful\"\nwhen = \"source IN ('harmbench', 'strongreject')\"\nroute = \"tag\"\n\n\
         [tokenize]\ntokenizer = {:?}\n\n[pack]\nseq_len = 63\n\n\
         [train]\nmodel = \"tiny\"\ncheckpoint_dir = \"ckpt-{name}\"\nsteps = {steps}\nmicro_batch = 4\n\
         lr = 0.01\nwarmup_steps = 2\nweight_decay = 0.1\nseed = 1\n",
        gguf.display().to_string()
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
}
