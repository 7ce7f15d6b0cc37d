//! Engine 2 over the real binary: `status` predicts `run`, upstream redos reach the shards,
//! damaged records and missing files, inputs that change or grow after planning, copied run
//! directories whose table folders other tools read as they are, model files read only when
//! needed, and wide records in bounded batches. (Ownership and concurrency: tests/concurrency.rs.)

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

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
    files_under(dir)
        .into_iter()
        .map(|path| {
            let name = path.strip_prefix(dir).unwrap().display().to_string();
            (name, hex::encode(Sha256::digest(std::fs::read(&path).unwrap())))
        })
        .collect()
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

#[test]
fn status_and_sql_judge_a_stage_whose_model_is_gone_by_its_last_result() {
    let ws = Workspace::new();
    let tokenizer = ws.path().join("tokenizer.gguf");
    std::os::unix::fs::symlink(gguf(), &tokenizer).unwrap();
    let config = ws.config(
        "config.toml",
        &token_config("run", "").replace(&format!("{:?}", gguf()), "\"tokenizer.gguf\""),
    );
    let cfg = config.to_str().unwrap();
    let run = safepipe(&["run", cfg]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let records = sql_number(&config, "SELECT count(*) FROM stats");
    std::fs::remove_file(&tokenizer).unwrap();

    // `status` still answers: nothing to do, and a note says which stage was judged how.
    let status = safepipe(&["status", cfg]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let shown = text(&status.stdout);
    assert!(!shown.contains("next run redoes"), "{shown}");
    assert!(
        shown.contains("note: tokenize:")
            && shown.contains("tokenize.tokenizer")
            && shown.contains("last committed result"),
        "{shown}"
    );
    assert!(predicted(&config).values().all(|&n| n == 0));
    // `sql` marks every committed result current instead of null.
    assert_eq!(sql_number(&config, "SELECT count(*) FROM stats WHERE current"), records);
    // `run` never guesses: it names the missing tokenizer.
    let run = safepipe(&["run", cfg]);
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("tokenize.tokenizer"),
        "{}",
        text(&run.stderr)
    );
}

#[test]
fn a_stage_whose_upstream_is_not_configured_is_refused_at_load() {
    let ws = Workspace::new();
    let config = ws.config(
        "config.toml",
        &format!("run_dir = \"run\"\n{}[pack]\n", small_sample_inputs()),
    );
    for command in ["plan", "status", "run"] {
        let out = safepipe(&[command, config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{command}: {}", text(&out.stderr));
        let said = text(&out.stderr);
        assert!(
            said.contains("the pack stage reads the output of tokenize") && said.contains("add [tokenize]"),
            "{command}: {said}"
        );
    }
}

/// The entries of a stage's record snapshot (`<stage>/_snapshot/records.jsonl.zst`), header first.
fn snapshot_lines(run_dir: &Path, stage: &str) -> Vec<Value> {
    let bytes = std::fs::read(run_dir.join(stage).join("_snapshot/records.jsonl.zst")).unwrap();
    let plain = zstd::stream::decode_all(&bytes[..]).unwrap();
    text(&plain).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn write_snapshot_lines(run_dir: &Path, stage: &str, lines: &[Value]) {
    let plain: String = lines.iter().map(|l| format!("{l}\n")).collect();
    let bytes = zstd::stream::encode_all(plain.as_bytes(), 3).unwrap();
    std::fs::write(run_dir.join(stage).join("_snapshot/records.jsonl.zst"), bytes).unwrap();
}

/// Issue 13, item 3: readers take a record from its stage's snapshot only while the listing shows
/// the very file the entry was taken from, so a stale, doctored or corrupt snapshot never changes
/// an answer; runs write snapshots once enough records are missing from them.
#[test]
fn record_snapshots_serve_only_the_files_they_were_taken_from() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config("[runner]\nsnapshot_records = 1\n"));
    let run_dir = ws.path().join("run");
    run_ok(&config, &[]);
    let stages = ["ingest", "route", "tag"];
    let units = sql_number(&config, "SELECT count(*) FROM stats WHERE stage = 'ingest'") as usize;
    assert!(units > 3, "the sample needs several units: {units}");
    for stage in stages {
        let lines = snapshot_lines(&run_dir, stage);
        assert_eq!(lines[0]["stage"], stage);
        assert_eq!(lines.len(), units + 1, "{stage}: one entry per committed unit");
    }
    let tables = snapshot(&config);
    let stats_query =
        "SELECT stage, unit, rows_in, rows_out, rows_dropped, rows_quarantined, fingerprint, current FROM stats";
    let stats = sql_rows(&config, stats_query);
    assert!(predicted(&config).values().all(|&n| n == 0));

    // A doctored entry whose file tag still matches is believed: proof that readers use it.
    let mut lines = snapshot_lines(&run_dir, "ingest");
    let unit = lines[2]["record"]["unit"].as_u64().unwrap();
    let real = lines[2]["record"]["counts"]["rows_out"].clone();
    lines[2]["record"]["counts"]["rows_out"] = 999_999.into();
    write_snapshot_lines(&run_dir, "ingest", &lines);
    let query = format!("SELECT rows_out FROM stats WHERE stage = 'ingest' AND unit = {unit}");
    assert_eq!(sql_number(&config, &query), 999_999);

    // Rewriting the record file with the same bytes gives it a new tag: the entry no longer
    // serves it, and the record itself is read.
    let record = run_dir.join(format!("ingest/_done/unit-{unit:06}.json"));
    let bytes = std::fs::read(&record).unwrap();
    let staged = record.with_extension("rewrite");
    std::fs::write(&staged, &bytes).unwrap();
    std::fs::rename(&staged, &record).unwrap();
    assert_eq!(sql_number(&config, &query), real.as_i64().unwrap());
    assert_eq!(sql_rows(&config, stats_query), stats);
    assert_eq!(snapshot(&config), tables);

    // A corrupt snapshot is ignored with a warning: every record is read.
    std::fs::write(run_dir.join("route/_snapshot/records.jsonl.zst"), b"not a snapshot").unwrap();
    let out = safepipe(&["sql", config.to_str().unwrap(), stats_query, "--format", "jsonl"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("ignoring the record snapshot"),
        "{}",
        text(&out.stderr)
    );
    let mut rows: Vec<String> = text(&out.stdout).lines().map(str::to_string).collect();
    rows.sort();
    assert_eq!(rows, stats);
    assert!(predicted(&config).values().all(|&n| n == 0));

    // A no-op run finds the records its snapshots lacked and writes whole ones again.
    run_ok(&config, &[]);
    for stage in stages {
        let lines = snapshot_lines(&run_dir, stage);
        assert_eq!(lines.len(), units + 1, "{stage}");
        assert!(lines.iter().all(|l| l["record"]["counts"]["rows_out"] != 999_999));
    }

    // A redone stage makes its snapshot stale; with snapshots off, readers still see exactly the
    // new records.
    std::fs::write(
        &config,
        sample_config("[runner]\nsnapshot_records = 0\n").replace("< 20", "< 25"),
    )
    .unwrap();
    let stale = snapshot_lines(&run_dir, "route");
    run_ok(&config, &[]);
    assert_eq!(snapshot_lines(&run_dir, "route"), stale, "snapshots off: none written");
    let fresh = sql_rows(
        &config,
        "SELECT stage, unit, fingerprint FROM stats WHERE stage = 'route'",
    );
    let old: Vec<String> = stale[1..]
        .iter()
        .map(|l| l["record"]["fingerprint"].to_string())
        .collect();
    assert!(
        fresh
            .iter()
            .all(|row| !old.iter().any(|f| row.contains(f.trim_matches('"')))),
        "{fresh:?}"
    );
    assert!(predicted(&config).values().all(|&n| n == 0));
    // gc leaves snapshots alone.
    let gc = safepipe(&["gc", config.to_str().unwrap(), "--min-age-secs", "0"]);
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    for stage in stages {
        assert!(run_dir.join(stage).join("_snapshot/records.jsonl.zst").exists());
    }
}
