//! One owner per unit, over the real binary: two processes racing for the same units, a lease
//! holder killed and taken over, pack on 1, 2 and 3 concurrent ranks, and `kill -9` at 20
//! instants across every stage (synthesis and pack included).

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

fn parquet_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "parquet"))
                .count()
        })
        .unwrap_or(0)
}

/// Outputs named by the committed records of `stage` for `table`.
fn named_outputs(run_dir: &Path, stage: &str, table: &str) -> usize {
    std::fs::read_dir(run_dir.join(stage).join("_done"))
        .unwrap()
        .filter(|e| {
            let record: Value = serde_json::from_slice(&std::fs::read(e.as_ref().unwrap().path()).unwrap()).unwrap();
            !record["outputs"][table].is_null()
        })
        .count()
}

#[test]
fn two_processes_given_the_same_units_commit_each_unit_once() {
    let ws = Workspace::new();
    let body = |dir: &str| sample_config("").replace("run_dir = \"run\"", &format!("run_dir = {dir:?}"));
    let reference = ws.config("reference.toml", &body("reference"));
    run_ok(&reference, &[]);
    let expected = snapshot(&reference);
    for round in 0..20 {
        let dir = format!("race-{round}");
        let config = ws.config(&format!("{dir}.toml"), &body(&dir));
        // Two processes that both believe they are the only rank (a zombie after a requeue).
        for out in run_at_once(&config, &[(0, 1), (0, 1)]) {
            // 0, or 3 when it left units another process held.
            assert!(matches!(out.status.code(), Some(0 | 3)), "{}", text(&out.stderr));
        }
        // Between them they did everything, once: nothing is left and nothing is doubled.
        let rerun = run_ok(&config, &[]);
        for stage in ["ingest", "route", "tag"] {
            assert_eq!(units_done(&rerun, stage), 0, "round {round}: {rerun}");
        }
        let run_dir = ws.path().join(&dir);
        for (stage, table) in [("ingest", "documents"), ("route", "routes"), ("tag", "tagged")] {
            assert_eq!(
                parquet_files(&run_dir.join(stage).join(table)),
                named_outputs(&run_dir, stage, table),
                "round {round}: {stage}/{table} holds a file no record names"
            );
        }
        assert_eq!(snapshot(&config), expected, "round {round}");
    }
}

/// Any lease held under the run directory (a unit being worked on, or its holder killed).
fn lease_exists(run_dir: &Path) -> bool {
    ["ingest", "route", "tag"].iter().any(|stage| {
        std::fs::read_dir(run_dir.join(stage).join("_leases"))
            .map(|units| {
                units
                    .flatten()
                    .any(|u| std::fs::read_dir(u.path()).is_ok_and(|mut g| g.any(|f| f.is_ok_and(|f| held(&f.path())))))
            })
            .unwrap_or(false)
    })
}

/// A lease file of a holder that has not released it (a released one keeps its generation as a
/// tombstone with expiry 0).
fn held(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "json")
        && std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| v["expires_at"].as_u64().is_some_and(|t| t > 0))
}

#[test]
fn a_killed_lease_holder_is_taken_over_after_expiry() {
    let ws = Workspace::new();
    let body = |dir: &str| {
        sample_config("[runner]\nlease_seconds = 3\njobs = 1\n")
            .replace("run_dir = \"run\"", &format!("run_dir = {dir:?}"))
    };
    let reference = ws.config("reference.toml", &body("reference"));
    run_ok(&reference, &[]);
    let config = ws.config("config.toml", &body("run"));
    let run_dir = ws.path().join("run");
    // The holder runs on "node-a" and is killed while it holds a lease.
    let mut holder = Command::new(bin())
        .args(["run", config.to_str().unwrap()])
        .env("HOSTNAME", "node-a")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !lease_exists(&run_dir) && holder.try_wait().unwrap().is_none() {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let killed = holder.try_wait().unwrap().is_none();
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert!(
        killed && lease_exists(&run_dir),
        "the holder finished before it could be killed"
    );
    // Another node cannot tell that process is gone: it leaves the unit alone until the lease
    // expires (exit 3, "held by another process"), then takes it over.
    let mut takeover = None;
    for _ in 0..60 {
        let out = Command::new(bin())
            .args(["run", config.to_str().unwrap()])
            .env("HOSTNAME", "node-b")
            .env("RUST_LOG", "info")
            .output()
            .unwrap();
        match out.status.code() {
            Some(0) => {
                takeover = Some(text(&out.stderr));
                break;
            }
            Some(3) => {
                assert!(
                    text(&out.stderr).contains("held by another process"),
                    "{}",
                    text(&out.stderr)
                );
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            _ => panic!("{}", text(&out.stderr)),
        }
    }
    let stderr = takeover.expect("the unit was never taken over");
    assert!(stderr.contains("taking over"), "{stderr}");
    assert!(!lease_exists(&run_dir), "leases are released after commit");
    assert_eq!(snapshot(&config), snapshot(&reference));
}

/// `world` concurrent ranks of `safepipe run CONFIG`; returns their stderr.
fn ranks(config: &Path, world: u32) -> Vec<String> {
    let all: Vec<(u32, u32)> = (0..world).map(|rank| (rank, world)).collect();
    run_at_once(config, &all)
        .into_iter()
        .map(|out| {
            assert!(out.status.success(), "{}", text(&out.stderr));
            text(&out.stderr)
        })
        .collect()
}

#[test]
fn pack_on_every_rank_writes_the_shards_of_one_process() {
    let ws = Workspace::new();
    let body = |dir: &str| {
        token_config(dir, "").replace(
            "shard_sequences = 100\n",
            "shard_sequences = 20\nbucket_bytes = 1048576\n",
        )
    };
    let one = ws.config("one.toml", &body("one"));
    run_ok(&one, &[]);
    let expected = shard_hashes(&ws.path().join("one"));
    assert!(expected.len() > 20, "{} shards", expected.len());
    for world in [2u32, 3] {
        let dir = format!("w{world}");
        let config = ws.config(&format!("{dir}.toml"), &body(&dir));
        assert!(safepipe(&["plan", config.to_str().unwrap()]).status.success());
        // An array that tokenizes (the last rank to finish may pack), then the same array again:
        // every rank finds all units tokenized and packs its part; the last writes the manifest.
        ranks(&config, world);
        let second = ranks(&config, world);
        let run_dir = ws.path().join(&dir);
        assert!(run_dir.join("pack/manifest.json").exists(), "{second:?}");
        assert_eq!(shard_hashes(&run_dir), expected, "{world} ranks");
        assert_eq!(
            std::fs::read_dir(run_dir.join("pack/shards")).unwrap().count(),
            expected.len(),
            "only the manifest's shards are left"
        );
        assert!(
            std::fs::read_dir(run_dir.join("pack/_parts")).map_or(true, |mut d| d.next().is_none()),
            "part records are gone once the manifest is written"
        );
        assert_eq!(
            sql_rows(&config, "SELECT input_ids, doc_offsets, sources, continues FROM shards"),
            sql_rows(&one, "SELECT input_ids, doc_offsets, sources, continues FROM shards")
        );
    }
    // Ranks started one after the other (a throttled array): the first packs its own part and
    // then every part nobody holds, and writes the manifest; the later ones find it current.
    let config = ws.config("seq.toml", &body("seq"));
    assert!(safepipe(&["plan", config.to_str().unwrap()]).status.success());
    ranks(&config, 1);
    std::fs::remove_dir_all(ws.path().join("seq/pack")).unwrap();
    for rank in [2, 0, 1] {
        let out = safepipe(&[
            "run",
            config.to_str().unwrap(),
            "--rank",
            &rank.to_string(),
            "--world-size",
            "3",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let done = if rank == 2 {
            "1 unit(s) done, 0 already"
        } else {
            "0 unit(s) done, 1 already"
        };
        assert!(
            summary_line(&text(&out.stderr), "pack").contains(done),
            "{}",
            text(&out.stderr)
        );
    }
    assert_eq!(shard_hashes(&ws.path().join("seq")), expected);
}

/// Every stage: ingest, score (the demo classifier), annotate and synthesize (the in-process
/// SmolLM2 on a small seeded sample, greedy), route, tag, tokenize, pack.
fn every_stage_config(ws: &Workspace, run_dir: &str) -> String {
    let ham = ws.path().join("ham.jsonl");
    if !ham.exists() {
        let lines: Vec<String> = std::fs::read_to_string(sample("spamassassin-ham.jsonl"))
            .unwrap()
            .lines()
            .take(120)
            .map(str::to_string)
            .collect();
        std::fs::write(&ham, lines.join("\n") + "\n").unwrap();
    }
    format!(
        "run_dir = {run_dir:?}\n\n\
         [[inputs]]\nname = \"ham\"\npaths = [{:?}]\n\n\
         [[inputs]]\nname = \"harmbench\"\npaths = [{:?}]\n\n\
         [plan]\njsonl_unit_bytes = 65536\n\n\
         [score]\nmodel = {:?}\nprecision = \"int8\"\n\n\
         [llm]\nbackend = \"in-process\"\nmodel = {:?}\nmax_batch = 4\n\n\
         [annotate]\nsample = 0.01\nmax_input_chars = 200\nmax_tokens = 6\n\n\
         [synthesize]\nsample = 0.02\nmax_input_chars = 200\n\
         [synthesize.rephrase]\nmax_tokens = 8\ntemperature = 0.0\n\
         [synthesize.refuse]\nmax_tokens = 8\ntemperature = 0.0\n\
         [synthesize.moral]\nmax_tokens = 8\ntemperature = 0.0\n\n\
         [route]\ndefault = \"keep\"\n\n\
         [[route.rules]]\nname = \"unsafe\"\nwhen = \"ensemble >= 4\"\nroute = \"refuse\"\nalso_tag = true\n\n\
         [[route.rules]]\nname = \"borderline\"\nwhen = \"ensemble >= 1\"\nroute = \"rephrase\"\nalso_tag = true\n\n\
         [tokenize]\ntokenizer = {:?}\n\n\
         [pack]\nseq_len = 127\nshard_sequences = 50\n\n\
         [runner]\njobs = 2\n",
        ham.display().to_string(),
        sample("harmbench.parquet").display().to_string(),
        demo_classifier().display().to_string(),
        gguf(),
        gguf()
    )
}

/// Every table as sorted multisets (texts hashed), and the shards' bytes.
fn everything(config: &Path, run_dir: &Path) -> Vec<Vec<String>> {
    let mut all = snapshot(config);
    for query in [
        "SELECT id, score, probs, expected, chunks, tokens, model FROM scores",
        "SELECT id, classifier_score, llm_score, ensemble, status, reason, answer FROM llm_scores",
        "SELECT id, parent_id, kind, style, md5(text) AS t, finish_reason, completion_tokens, gates, keep, error FROM synthetic",
        "SELECT id, source, kind, n_tokens, tag_tokens, input_ids FROM tokens",
    ] {
        all.push(sql_rows(config, query));
    }
    all.push(shard_hashes(run_dir));
    all
}

/// Completion records of every stage written so far, the pack manifest counting as one.
fn commits(run_dir: &Path) -> usize {
    let stages = ["ingest", "score", "annotate", "route", "synthesize", "tag", "tokenize"];
    let records: usize = stages
        .iter()
        .filter_map(|stage| std::fs::read_dir(run_dir.join(stage).join("_done")).ok())
        .map(|entries| entries.count())
        .sum();
    records + usize::from(run_dir.join("pack/manifest.json").exists())
}

#[test]
fn kill_9_at_20_instants_across_every_stage_then_rerun_gives_the_same_tables_and_shards() {
    let ws = Workspace::new();
    let reference = ws.config("reference.toml", &every_stage_config(&ws, "reference"));
    let stderr = run_ok(&reference, &[]);
    assert!(stderr.contains("generation done"), "{stderr}");
    let expected = everything(&reference, &ws.path().join("reference"));
    let total = commits(&ws.path().join("reference"));
    assert!(
        sql_number(&reference, "SELECT count(*) FROM synthetic") > 0
            && sql_number(
                &reference,
                "SELECT count(*) FROM llm_scores WHERE status <> 'not_sampled'"
            ) > 0,
        "the sample must reach the LLM stages"
    );

    // Kill k of 20 (from 0) lands once about k/21 of all commits are done, plus a seeded delay
    // of up to 20 ms: the kills spread over every stage whatever this machine's speed.
    let config = ws.config("killed.toml", &every_stage_config(&ws, "killed"));
    let run_dir = ws.path().join("killed");
    let kills = kill_at_progress(&config, 20, total, || commits(&run_dir), 20_000, 0x6b11_2026);
    assert!(kills >= 15, "only {kills} of 20 runs were still going when killed");
    run_ok(&config, &[]);
    assert_eq!(everything(&config, &run_dir), expected);
    assert!(predicted(&config).values().all(|&n| n == 0));
}
