//! Engine 2 over the real binary: `status` predicts `run`, upstream redos reach the shards,
//! damaged records and missing files, one owner per unit (two processes, kill -9 of a lease
//! holder), inputs that change or grow after planning, copied run directories, and table folders
//! that other tools can read as they are.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The small samples (9 units), harmful prompts tagged, tokenized and packed.
fn token_config(run_dir: &str, extra: &str) -> String {
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
fn predicted(config: &Path) -> BTreeMap<String, usize> {
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

/// The work a run did, per stage, from its summary lines.
fn done(stderr: &str, stages: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    stages.map(|s| (s.clone(), units_done(stderr, &s))).collect()
}

/// Asserts that `status` predicts what the next `run` does, stage by stage; returns its stderr.
fn run_as_predicted(config: &Path) -> String {
    let expected = predicted(config);
    let stderr = run_ok(config, &[]);
    assert_eq!(done(&stderr, expected.keys().cloned()), expected, "{stderr}");
    stderr
}

/// Every file under `dir` with its bytes' hash, relative names.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    use sha2::{Digest, Sha256};
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let name = path.strip_prefix(dir).unwrap().display().to_string();
                out.insert(name, hex::encode(Sha256::digest(std::fs::read(&path).unwrap())));
            }
        }
    }
    out
}

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

fn some_record(run_dir: &Path, stage: &str) -> PathBuf {
    let mut records: Vec<PathBuf> = std::fs::read_dir(run_dir.join(stage).join("_done"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    records.sort();
    records.remove(records.len() / 2)
}

#[test]
fn status_predicts_run_and_every_upstream_redo_reaches_the_shards() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &token_config("run", ""));
    let run_dir = ws.path().join("run");
    // A fresh run, then a rerun with nothing to do.
    run_as_predicted(&config);
    assert!(predicted(&config).values().all(|&n| n == 0));
    run_as_predicted(&config);
    let before = snapshot(&config);
    let shards_before = sql_rows(&config, "SELECT input_ids FROM shards");

    // A routing change: route, tag, tokenize and pack redo; ingest does not.
    std::fs::write(&config, token_config("run", "").replace("< 20", "< 25")).unwrap();
    let stderr = run_as_predicted(&config);
    assert_eq!(units_done(&stderr, "ingest"), 0, "{stderr}");
    assert_eq!(units_done(&stderr, "pack"), 1, "{stderr}");

    // The stale-shard case: a redo upstream under the same fingerprints still repacks.
    let forced = run_ok(&config, &["--force", "tag"]);
    assert_eq!(units_done(&forced, "tokenize"), 9, "{forced}");
    assert!(
        summary_line(&forced, "pack").contains("1 unit(s) done"),
        "the shards must follow the new tokens: {forced}"
    );

    // An empty completion record (a crash on a file system without fsync) is reported and that
    // unit redone; SQL still answers, leaving it out.
    std::fs::write(&config, token_config("run", "")).unwrap();
    run_ok(&config, &[]);
    let record = some_record(&run_dir, "route");
    std::fs::write(&record, b"").unwrap();
    let status = text(&safepipe(&["status", config.to_str().unwrap()]).stdout);
    assert!(
        status.contains("damaged in route") && status.contains("empty"),
        "{status}"
    );
    assert!(sql_number(&config, "SELECT count(*) FROM documents") > 0);
    let stderr = run_as_predicted(&config);
    assert_eq!(units_done(&stderr, "route"), 1, "{stderr}");
    assert_eq!(units_done(&stderr, "tag"), 1, "{stderr}");
    assert_eq!(units_done(&stderr, "ingest"), 0, "{stderr}");

    // A committed file deleted by hand: `sql` names it, `status` shows the damage, `run` redoes
    // that unit (and what was made from it), and the tables come back as they were.
    let documents = run_dir.join("ingest/documents");
    let victim = std::fs::read_dir(&documents).unwrap().next().unwrap().unwrap().path();
    std::fs::remove_file(&victim).unwrap();
    let name = victim.file_name().unwrap().to_str().unwrap().to_string();
    let sql = safepipe(&["sql", config.to_str().unwrap(), "SELECT count(*) FROM documents"]);
    assert!(
        !sql.status.success() && text(&sql.stderr).contains(&name),
        "{}",
        text(&sql.stderr)
    );
    let status = text(&safepipe(&["status", config.to_str().unwrap()]).stdout);
    assert!(
        status.contains("damaged in ingest") && status.contains(&name),
        "{status}"
    );
    let stderr = run_as_predicted(&config);
    assert_eq!(units_done(&stderr, "ingest"), 1, "{stderr}");
    assert_eq!(snapshot(&config), before);
    assert_eq!(sql_rows(&config, "SELECT input_ids FROM shards"), shards_before);
    assert_eq!(sql_number(&config, "SELECT count(*) FROM stats WHERE NOT current"), 0);
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
        let racers: Vec<_> = (0..2)
            .map(|_| {
                Command::new(bin())
                    .args(["run", config.to_str().unwrap(), "--rank", "0", "--world-size", "1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for racer in racers {
            let out = racer.wait_with_output().unwrap();
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

/// Any lease file under the run directory (a unit being worked on).
fn lease_exists(run_dir: &Path) -> bool {
    ["ingest", "route", "tag"].iter().any(|stage| {
        std::fs::read_dir(run_dir.join(stage).join("_leases"))
            .map(|units| {
                units.flatten().any(|u| {
                    std::fs::read_dir(u.path()).is_ok_and(|mut g| {
                        g.any(|f| f.is_ok_and(|f| f.path().extension().is_some_and(|x| x == "json")))
                    })
                })
            })
            .unwrap_or(false)
    })
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

#[test]
fn inputs_that_change_or_grow_after_planning_are_reported_and_extended() {
    let ws = Workspace::new();
    let inputs = ws.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    let ham = std::fs::read_to_string(sample("spamassassin-ham.jsonl")).unwrap();
    let lines: Vec<&str> = ham.lines().collect();
    let first = inputs.join("a.jsonl");
    std::fs::write(&first, lines[..400].join("\n") + "\n").unwrap();
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"run\"\n[[inputs]]\nname = \"mail\"\npaths = [{:?}]\n[plan]\njsonl_unit_bytes = 262144\n",
            inputs.display().to_string()
        ),
    );
    let cfg = config.to_str().unwrap();
    run_ok(&config, &[]);
    let documents = sql_number(&config, "SELECT count(*) FROM documents");
    let records_before = tree(&ws.path().join("run/ingest/_done"));

    // Appending to a planned file is refused, naming the file; status names it too.
    let modified = std::fs::metadata(&first).unwrap().modified().unwrap();
    let original = std::fs::read(&first).unwrap();
    std::fs::write(
        &first,
        [original.clone(), (lines[400..500].join("\n") + "\n").into_bytes()].concat(),
    )
    .unwrap();
    let refused = safepipe(&["run", cfg]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(text(&refused.stderr).contains("a.jsonl") && text(&refused.stderr).contains("changed"));
    let status = text(&safepipe(&["status", cfg]).stdout);
    assert!(
        status.contains("changed since planning") && status.contains("a.jsonl"),
        "{status}"
    );
    // Restored (bytes and modification time), it is accepted again.
    std::fs::write(&first, &original).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&first)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    assert_eq!(units_done(&run_ok(&config, &[]), "ingest"), 0);

    // A new file is reported and not processed until the plan is extended.
    std::fs::write(inputs.join("b.jsonl"), lines[500..800].join("\n") + "\n").unwrap();
    let ignored = run_ok(&config, &[]);
    assert_eq!(units_done(&ignored, "ingest"), 0, "{ignored}");
    assert!(ignored.contains("plan --extend"), "{ignored}");
    let status = text(&safepipe(&["status", cfg]).stdout);
    assert!(
        status.contains("not in the plan") && status.contains("b.jsonl"),
        "{status}"
    );
    let extend = safepipe(&["plan", cfg, "--extend"]);
    assert!(extend.status.success(), "{}", text(&extend.stderr));
    assert!(text(&extend.stdout).contains("b.jsonl"), "{}", text(&extend.stdout));
    let extended = run_as_predicted(&config);
    assert!(units_done(&extended, "ingest") >= 1, "{extended}");
    // Existing units untouched; exactly the new file's records added.
    let records_after = tree(&ws.path().join("run/ingest/_done"));
    for (name, hash) in &records_before {
        assert_eq!(records_after.get(name), Some(hash), "{name} changed");
    }
    let added = sql_number(&config, "SELECT count(*) FROM documents") - documents;
    let quarantined = sql_number(
        &config,
        "SELECT coalesce(sum(records), 0) FROM quarantine WHERE file LIKE '%b.jsonl'",
    );
    assert_eq!(added + quarantined, 300);
}

#[test]
fn a_copied_run_directory_is_independent_and_tables_read_with_other_tools() {
    let ws = Workspace::new();
    let original = ws.config("original.toml", &token_config("original", ""));
    run_ok(&original, &[]);
    let before = tree(&ws.path().join("original"));
    let rows_before = snapshot(&original);
    let shards_before = sql_rows(&original, "SELECT input_ids FROM shards");
    // Copy the run directory as a user would, point a config at the copy, change one rule.
    let status = Command::new("cp")
        .args(["-a", "original", "copy"])
        .current_dir(ws.path())
        .status()
        .unwrap();
    assert!(status.success());
    let copy = ws.config("copy.toml", &token_config("copy", "").replace("< 20", "< 25"));
    let stderr = run_ok(&copy, &[]);
    assert_eq!(
        units_done(&stderr, "ingest"),
        0,
        "the copy reruns only what the change touches: {stderr}"
    );
    assert_eq!(units_done(&stderr, "route"), 9, "{stderr}");
    // The original is byte for byte as it was and still reads the same.
    assert_eq!(tree(&ws.path().join("original")), before);
    assert_eq!(snapshot(&original), rows_before);
    assert_eq!(sql_rows(&original, "SELECT input_ids FROM shards"), shards_before);
    assert_eq!(units_done(&run_ok(&original, &[]), "route"), 0);
    // The copy's tables are its own and read the same with pyarrow alone.
    let report = python_oracle(
        "read_tables.py",
        &[
            ws.path().join("copy").to_str().unwrap(),
            "ingest/documents",
            "ingest/quarantine",
            "route/routes",
            "tag/tagged",
            "tokenize/tokens",
            "pack/shards",
        ],
    );
    for (table, sql_table) in [
        ("ingest/documents", "documents"),
        ("ingest/quarantine", "quarantine"),
        ("route/routes", "routes"),
        ("tag/tagged", "tagged"),
        ("tokenize/tokens", "tokens"),
        ("pack/shards", "shards"),
    ] {
        assert_eq!(
            report[table]["rows"].as_i64().unwrap(),
            sql_number(&copy, &format!("SELECT count(*) FROM {sql_table}")),
            "{table}"
        );
    }
    let ids: Vec<String> = report["ingest/documents"]["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut from_sql: Vec<String> = sql_rows(&copy, "SELECT id FROM documents")
        .iter()
        .map(|row| {
            serde_json::from_str::<Value>(row).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    from_sql.sort();
    assert_eq!(ids, from_sql);
}

/// Hashes of the committed shards, in manifest order.
fn shard_hashes(run_dir: &Path) -> Vec<String> {
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

/// `world` concurrent ranks of `safepipe run CONFIG`; returns their stderr.
fn ranks(config: &Path, world: u32) -> Vec<String> {
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(bin())
                .args([
                    "run",
                    config.to_str().unwrap(),
                    "--rank",
                    &rank.to_string(),
                    "--world-size",
                    &world.to_string(),
                ])
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
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

/// Regression (issue 16): an 11 MB .jsonl.gz of 4,096 records with 600 KB metadata fields made
/// one Arrow string column pass 2 GiB in a batch, and the panic took the unit down with no
/// record. Batches are now cut by the bytes of every string column: the unit commits.
#[test]
fn huge_metadata_fields_commit_in_bounded_batches() {
    let ws = Workspace::new();
    let file = ws.path().join("wide.jsonl.gz");
    let script = "import gzip, json, sys\n\
                  pad = 'm' * 600_000\n\
                  with gzip.open(sys.argv[1], 'wt', compresslevel=6) as f:\n\
                  \x20   for i in range(4096):\n\
                  \x20       f.write(json.dumps({'id': f'w{i}', 'text': f'document {i} of the wide file', 'notes': pad}) + '\\n')\n";
    let status = Command::new(repo().join(".venv/bin/python"))
        .args(["-c", script, file.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::metadata(&file).unwrap().len() < 20 << 20);
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"run\"\n[[inputs]]\nname = \"wide\"\npaths = [{:?}]\n\n[[inputs]]\nname = \"strongreject\"\npaths = [{:?}]\n",
            file.display().to_string(),
            sample("strongreject.jsonl.zst").display().to_string()
        ),
    );
    run_ok(&config, &[]);
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'wide'"),
        4096
    );
    // Every record is in. (Its 600 KB field is not read back here: one SQL batch of 8192 such
    // rows would itself pass Arrow's 2 GiB; bounding what such fields cost is issue 12.)
    let files = std::fs::read_dir(ws.path().join("run/ingest/documents"))
        .unwrap()
        .count();
    assert!(files >= 1);
    assert_eq!(
        sql_number(
            &config,
            "SELECT sum(rows_out) FROM stats WHERE stage = 'ingest' AND rows_in = 4096"
        ),
        4096
    );
    assert!(sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'strongreject'") > 0);
}

#[test]
fn plan_sql_and_gc_need_no_model_files_and_run_names_the_missing_one() {
    let ws = Workspace::new();
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"run\"\n{}[score]\nmodel = \"gone/classifier.toml\"\n\n\
             [llm]\nbackend = \"in-process\"\nmodel = \"gone/model.gguf\"\n\n[synthesize]\n\n\
             [tokenize]\ntokenizer = \"gone/model.gguf\"\n\n[pack]\n",
            small_sample_inputs()
        ),
    );
    let cfg = config.to_str().unwrap();
    for args in [
        vec!["plan", cfg],
        vec!["sql", cfg, "SELECT count(*) FROM documents"],
        vec!["gc", cfg, "--dry-run"],
    ] {
        let out = safepipe(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    // `run` needs the models: it says which one is missing before doing any work.
    let run = safepipe(&["run", cfg]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert!(text(&run.stderr).contains("score.model") && text(&run.stderr).contains("does not exist"));
    assert!(!ws.path().join("run/ingest").exists(), "no work before the error");
    let status = safepipe(&["status", cfg]);
    assert_eq!(status.status.code(), Some(2), "{}", text(&status.stderr));
}
