//! End-to-end behaviour of the engine over the real binary and the real sample corpus:
//! resumability, ranks, fingerprints, accounting, `kill -9` safety and output schemas.

mod common;

use common::*;

#[test]
fn rerun_after_completion_does_no_work() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    let first = run_ok(&config, &[]);
    assert!(units_done(&first, "ingest") > 4, "{first}");
    let before = snapshot(&config);
    let records_before = sql_rows(&config, "SELECT stage, unit, finished_at FROM stats");

    let second = run_ok(&config, &[]);
    assert_eq!(units_done(&second, "ingest"), 0, "{second}");
    assert_eq!(units_done(&second, "route"), 0, "{second}");
    assert_eq!(
        sql_rows(&config, "SELECT stage, unit, finished_at FROM stats"),
        records_before
    );
    assert_eq!(snapshot(&config), before);
    assert!(sql_number(&config, "SELECT count(*) FROM documents") > 5000);
}

#[test]
fn two_ranks_equal_one_rank() {
    let ws = Workspace::new();
    let single = ws.config(
        "single.toml",
        &sample_config("").replace("run_dir = \"run\"", "run_dir = \"single\""),
    );
    run_ok(&single, &[]);

    let multi = ws.config(
        "multi.toml",
        &sample_config("").replace("run_dir = \"run\"", "run_dir = \"multi\""),
    );
    // Several ranks need the plan made once first.
    let refused = safepipe(&["run", multi.to_str().unwrap(), "--rank", "0", "--world-size", "2"]);
    assert_eq!(refused.status.code(), Some(2), "{}", text(&refused.stderr));
    assert!(
        text(&refused.stderr).contains("safepipe plan"),
        "{}",
        text(&refused.stderr)
    );
    assert!(safepipe(&["plan", multi.to_str().unwrap()]).status.success());
    // Both ranks at once, like an array job.
    for out in run_at_once(&multi, &[(0, 2), (1, 2)]) {
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    assert_eq!(sql_number(&multi, "SELECT count(DISTINCT rank) FROM stats"), 2);
    assert_eq!(snapshot(&multi), snapshot(&single));
}

#[test]
fn config_change_reruns_only_the_affected_stage() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    let first = run_ok(&config, &[]);
    let units = units_done(&first, "ingest");
    let ingest_files = sql_rows(&config, "SELECT unit, fingerprint FROM stats WHERE stage = 'ingest'");

    // A routing change: route reruns, ingest does not.
    let changed = sample_config("").replace("length(trim(text)) < 20", "length(trim(text)) < 200");
    std::fs::write(&config, changed).unwrap();
    let second = run_ok(&config, &[]);
    assert_eq!(units_done(&second, "ingest"), 0, "{second}");
    assert_eq!(units_done(&second, "route"), units, "{second}");
    assert!(summary_line(&second, "route").contains(&format!("{units} unit(s) done")));
    assert!(second.contains("settings changed"), "{second}");
    assert_eq!(
        sql_rows(&config, "SELECT unit, fingerprint FROM stats WHERE stage = 'ingest'"),
        ingest_files
    );
    let dropped: i64 = sql_number(&config, "SELECT count(*) FROM routes WHERE route = 'drop'");
    assert!(dropped > 0);

    // An ingest change: ingest reruns, and route with it because its upstream changed.
    let changed = sample_config("[ingest]\nmax_text_bytes = 20000\n")
        .replace("length(trim(text)) < 20", "length(trim(text)) < 200");
    std::fs::write(&config, changed).unwrap();
    let third = run_ok(&config, &[]);
    assert_eq!(units_done(&third, "ingest"), units, "{third}");
    assert_eq!(units_done(&third, "route"), units, "{third}");
    assert!(third.contains("upstream changed"), "{third}");
    assert!(
        sql_number(
            &config,
            "SELECT count(*) FROM quarantine WHERE reason = 'text_too_long'"
        ) > 0
    );
    // Replaced outputs are gone: exactly one file per committed (stage, table, unit) is left.
    for (stage, table) in [("ingest", "documents"), ("route", "routes")] {
        let dir = ws.path().join("run").join(stage).join(table);
        let files = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "parquet"))
            .count();
        let units_with_rows = sql_number(
            &config,
            &format!("SELECT count(*) FROM stats WHERE stage = '{stage}' AND rows_out + rows_dropped > 0"),
        );
        assert_eq!(files as i64, units_with_rows, "{}", dir.display());
    }
}

#[test]
fn force_redoes_a_stage_and_what_is_downstream() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    let first = run_ok(&config, &[]);
    let units = units_done(&first, "ingest");
    let before = snapshot(&config);
    let forced = run_ok(&config, &["--force", "ingest"]);
    assert_eq!(units_done(&forced, "ingest"), units);
    assert_eq!(units_done(&forced, "route"), units);
    let route_only = run_ok(&config, &["--force", "route"]);
    assert_eq!(units_done(&route_only, "ingest"), 0);
    assert_eq!(units_done(&route_only, "route"), units);
    assert_eq!(snapshot(&config), before);
    let bad = safepipe(&["run", config.to_str().unwrap(), "--force", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("no such stage"), "{}", text(&bad.stderr));
}

#[test]
fn accounting_invariant_holds_per_stage_per_unit() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    run_ok(&config, &[]);
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM stats WHERE rows_in <> rows_out + rows_dropped + rows_quarantined"
        ),
        0
    );
    // The tables agree with the counts, unit by unit.
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM documents"),
        sql_number(&config, "SELECT sum(rows_out) FROM stats WHERE stage = 'ingest'")
    );
    assert_eq!(
        sql_number(&config, "SELECT coalesce(sum(records), 0) FROM quarantine"),
        sql_number(
            &config,
            "SELECT sum(rows_quarantined) FROM stats WHERE stage = 'ingest'"
        )
    );
    // Route sees exactly what ingest let through, per unit.
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM stats i JOIN stats r ON i.unit = r.unit \
             WHERE i.stage = 'ingest' AND r.stage = 'route' AND i.rows_out <> r.rows_in"
        ),
        0
    );
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM routes WHERE route = 'drop'"),
        sql_number(&config, "SELECT sum(rows_dropped) FROM stats WHERE stage = 'route'")
    );
    // Every non-blank line of the sample JSONL is a document or a quarantine record.
    let lines = std::fs::read_to_string(sample("spamassassin-ham.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as i64;
    let accounted = sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'ham'")
        + sql_number(
            &config,
            "SELECT coalesce(sum(records), 0) FROM quarantine WHERE source = 'ham'",
        );
    assert_eq!(accounted, lines);
}

/// Completion records written so far under a run directory, all stages.
fn committed_records(run_dir: &std::path::Path) -> usize {
    ["ingest", "route", "tag"]
        .iter()
        .filter_map(|stage| std::fs::read_dir(run_dir.join(stage).join("_done")).ok())
        .map(|entries| entries.count())
        .sum()
}

#[test]
fn kill_9_at_random_instants_then_rerun_gives_the_same_rows() {
    let ws = Workspace::new();
    // Four copies of the real mail corpus in small units, so that kills land in the middle of
    // planning, writing and committing many units.
    for copy in 0..4 {
        std::fs::copy(
            sample("spamassassin-ham.jsonl"),
            ws.path().join(format!("ham-{copy}.jsonl")),
        )
        .unwrap();
    }
    let config_for = |dir: &str| {
        sample_config("[runner]\njobs = 2\n")
            .replace("run_dir = \"run\"", &format!("run_dir = \"{dir}\""))
            .replace("jsonl_unit_bytes = 1048576", "jsonl_unit_bytes = 131072")
            .replace(
                "[plan]",
                "[[inputs]]\nname = \"copies\"\npaths = [\"ham-*.jsonl\"]\n\n[plan]",
            )
    };
    let reference = ws.config("reference.toml", &config_for("reference"));
    run_ok(&reference, &[]);
    let total = committed_records(&ws.path().join("reference"));
    assert!(total > 300, "{total} records");

    // Kill k of 12 lands once about k/13 of all commits are done, plus a random delay of up to
    // 3 ms, so the kills spread over planning, writing and committing whatever the machine's
    // speed. A fixed seed keeps failures reproducible.
    let config = ws.config("killed.toml", &config_for("killed"));
    let run_dir = ws.path().join("killed");
    let kills = kill_at_progress(&config, 12, total, || committed_records(&run_dir), 3000, 0x5eed_2026);
    assert!(kills >= 10, "only {kills} of 12 runs were still going when killed");
    let finish = run_ok(&config, &[]);
    assert!(
        units_done(&finish, "tag") > 0,
        "the kills left no work to resume: {finish}"
    );
    assert_eq!(snapshot(&config), snapshot(&reference));
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM stats WHERE rows_in <> rows_out + rows_dropped + rows_quarantined"
        ),
        0
    );
}

#[test]
fn status_reports_units_rows_and_staleness() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    let before = safepipe(&["status", config.to_str().unwrap()]);
    assert!(before.status.success());
    assert!(
        text(&before.stdout).contains("no work plan"),
        "{}",
        text(&before.stdout)
    );
    run_ok(&config, &[]);
    let units = sql_number(&config, "SELECT count(*) FROM stats WHERE stage = 'ingest'");
    let status = text(&safepipe(&["status", config.to_str().unwrap()]).stdout);
    let ingest = status.lines().find(|l| l.starts_with("ingest")).unwrap().to_string();
    assert!(ingest.contains(&format!("{units}/{units}")), "{status}");
    let docs = sql_number(&config, "SELECT count(*) FROM documents");
    assert!(ingest.contains(&docs.to_string()), "{status}");
    let json: serde_json::Value =
        serde_json::from_slice(&safepipe(&["status", config.to_str().unwrap(), "--format", "json"]).stdout).unwrap();
    assert_eq!(json[0]["stage"], "ingest");
    assert_eq!(json[0]["committed"], units);
    assert_eq!(json[0]["counts"]["rows_out"], docs);
    std::fs::write(&config, sample_config("").replace("< 20", "< 30")).unwrap();
    let status = text(&safepipe(&["status", config.to_str().unwrap()]).stdout);
    let route: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with("route"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(route[1], format!("0/{units}"), "{status}");
    assert_eq!(route[2], "0", "running: {status}");
    assert_eq!(route[3], units.to_string(), "stale count: {status}");
}

#[test]
fn committed_files_have_the_documented_schemas() {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let ws = Workspace::new();
    // One broken record beside the sample, so that quarantine has a file too.
    std::fs::write(ws.path().join("broken.jsonl"), "{\"id\": \"x\", \"text\": \n").unwrap();
    let config = sample_config("").replace(
        "[plan]",
        "[[inputs]]\nname = \"broken\"\npaths = [\"broken.jsonl\"]\n\n[plan]",
    );
    let config = ws.config("config.toml", &config);
    run_ok(&config, &[]);
    for (stage, table, schema) in [
        ("ingest", "documents", safepipe_operators::schema::DOCUMENTS.clone()),
        ("ingest", "quarantine", safepipe_operators::schema::QUARANTINE.clone()),
        ("route", "routes", safepipe_operators::schema::ROUTES.clone()),
        ("tag", "tagged", safepipe_operators::schema::TAGGED.clone()),
    ] {
        let dir = ws.path().join("run").join(stage).join(table);
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let file = std::fs::File::open(entry.unwrap().path()).unwrap();
            let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
            assert_eq!(reader.schema().fields(), schema.fields(), "{stage}/{table}");
            seen += 1;
        }
        assert!(seen > 0, "no {table} files");
    }
}

#[test]
fn bad_config_errors_name_the_key_and_exit_2() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config("[ingest]\nbatch_rowz = 3\n"));
    let out = safepipe(&["run", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("batch_rowz"), "{}", text(&out.stderr));
    let config = ws.config(
        "missing.toml",
        "run_dir = \"r\"\n[[inputs]]\nname = \"x\"\npaths = [\"nowhere/*.jsonl\"]\n",
    );
    let out = safepipe(&["run", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("matches no file"), "{}", text(&out.stderr));
}

#[test]
fn tag_stage_tags_exactly_the_documents_routed_tag() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    let first = run_ok(&config, &[]);
    let routed = sql_number(&config, "SELECT count(*) FROM routes WHERE route = 'tag'");
    assert_eq!(
        routed,
        sql_number(
            &config,
            "SELECT count(*) FROM documents WHERE source IN ('harmbench', 'strongreject')"
        )
    );
    assert_eq!(sql_number(&config, "SELECT count(*) FROM tagged"), routed);
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM tagged WHERE source NOT IN ('harmbench', 'strongreject')"
        ),
        0
    );
    // Removing the tags gives back each document's text exactly.
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM tagged t JOIN documents d ON t.id = d.id \
             WHERE replace(t.text, '<potentially unsafe content>', '') <> d.text"
        ),
        0
    );
    // The counted tags are the tags in the text, and the rate is near the default 5%.
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM tagged WHERE tags_inserted <> \
             (length(text) - length(replace(text, '<potentially unsafe content>', ''))) / 28"
        ),
        0
    );
    let tags = sql_number(&config, "SELECT sum(tags_inserted) FROM tagged");
    let boundaries = sql_number(&config, "SELECT sum(words) - count(*) FROM tagged WHERE words > 0");
    let rate = tags as f64 / boundaries as f64;
    assert!(
        (0.04..0.06).contains(&rate),
        "tag rate {rate} over {boundaries} word boundaries"
    );
    assert!(units_done(&first, "tag") > 0);

    // Changing the tag probability reruns the tag stage only.
    std::fs::write(&config, sample_config("[tag]\nprobability = 0.10\n")).unwrap();
    let second = run_ok(&config, &[]);
    assert_eq!(units_done(&second, "ingest"), 0);
    assert_eq!(units_done(&second, "route"), 0);
    assert!(units_done(&second, "tag") > 0);
    let more = sql_number(&config, "SELECT sum(tags_inserted) FROM tagged");
    assert!(more as f64 > 1.6 * tags as f64, "{more} vs {tags}");
}

#[test]
fn failed_units_are_recorded_retried_and_block_only_their_downstream() {
    let ws = Workspace::new();
    // An input that disappears after planning: its unit fails with a storage error.
    let moved = ws.path().join("extra.jsonl");
    std::fs::copy(sample("spamassassin-ham.jsonl"), &moved).unwrap();
    let body = sample_config("").replace(
        "[plan]",
        "[[inputs]]\nname = \"extra\"\npaths = [\"extra.jsonl\"]\n\n[plan]",
    );
    // A route predicate that plans fine but fails on real rows (text is not a number).
    let failing = body.replace("length(trim(text)) < 20", "CAST(text AS BIGINT) > 0");
    let config = ws.config("config.toml", &failing);
    let cfg = config.to_str().unwrap();
    assert!(safepipe(&["plan", cfg]).status.success());
    std::fs::rename(&moved, ws.path().join("away.jsonl")).unwrap();

    let out = safepipe(&["run", cfg]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let extra_units = {
        let plan: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ws.path().join("run/plan.json")).unwrap()).unwrap();
        plan["units"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|u| u["input"] == "extra")
            .count()
    };
    assert!(extra_units > 1);
    assert!(
        summary_line(&stderr, "ingest").contains(&format!("{extra_units} failed")),
        "{stderr}"
    );
    assert!(!summary_line(&stderr, "route").contains(" 0 failed"), "{stderr}");
    assert!(!summary_line(&stderr, "tag").contains(" 0 waiting"), "{stderr}");
    let status = text(&safepipe(&["status", cfg]).stdout);
    assert!(
        status.contains("last error in ingest") && status.contains("extra.jsonl"),
        "{status}"
    );
    assert!(
        status.contains("last error in route") && status.contains("Cast error"),
        "{status}"
    );
    let committed = sql_number(&config, "SELECT count(*) FROM stats WHERE stage = 'ingest'");
    assert!(committed > 0, "the other units still committed");

    // Fix both; the rerun redoes only what failed or waited.
    std::fs::rename(ws.path().join("away.jsonl"), &moved).unwrap();
    std::fs::write(&config, &body).unwrap();
    let rerun = run_ok(&config, &[]);
    assert_eq!(units_done(&rerun, "ingest"), extra_units, "{rerun}");
    let status = text(&safepipe(&["status", cfg]).stdout);
    assert!(!status.contains("last error"), "{status}");
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'extra'"),
        sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'ham'")
    );
}

#[test]
fn gc_removes_only_files_no_record_names() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    run_ok(&config, &[]);
    let before = snapshot(&config);
    // Leftovers like those of a killed attempt: an output of an old fingerprint and a stray file.
    let documents = ws.path().join("run/ingest/documents");
    let committed = std::fs::read_dir(&documents).unwrap().next().unwrap().unwrap().path();
    let orphan = documents.join("unit-000000-0123456789abcdef.parquet");
    std::fs::copy(&committed, &orphan).unwrap();
    std::fs::write(ws.path().join("run/route/routes/stray.tmp"), b"partial").unwrap();
    let cfg = config.to_str().unwrap();

    let young = text(&safepipe(&["gc", cfg]).stdout);
    assert!(
        young.contains("0 unreferenced file(s)") && young.contains("2 unreferenced file(s) younger"),
        "{young}"
    );
    let dry = text(&safepipe(&["gc", cfg, "--min-age-secs", "0", "--dry-run"]).stdout);
    assert!(dry.contains("would delete") && orphan.exists(), "{dry}");
    let real = safepipe(&["gc", cfg, "--min-age-secs", "0"]);
    assert!(real.status.success());
    assert!(
        text(&real.stdout).contains("2 unreferenced file(s)"),
        "{}",
        text(&real.stdout)
    );
    assert!(!orphan.exists() && committed.exists());
    assert_eq!(snapshot(&config), before);
    assert_eq!(units_done(&run_ok(&config, &[]), "ingest"), 0);
}
