//! `safepipe sql`: read-only over the committed tables, in every output format.

mod common;

use common::*;

#[test]
fn sql_is_read_only_and_speaks_every_format() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    run_ok(&config, &[]);
    let cfg = config.to_str().unwrap();
    for statement in [
        "CREATE TABLE t AS SELECT * FROM documents",
        "CREATE VIEW v AS SELECT 1",
        "INSERT INTO documents SELECT * FROM documents",
        "COPY documents TO '/tmp/x.parquet'",
        "DROP TABLE documents",
        "CREATE EXTERNAL TABLE e STORED AS PARQUET LOCATION '/tmp'",
        "SET datafusion.execution.batch_size = 1",
    ] {
        let out = safepipe(&["sql", cfg, statement]);
        assert_eq!(out.status.code(), Some(2), "{statement}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("read-only"),
            "{statement}: {}",
            text(&out.stderr)
        );
    }
    let bad = safepipe(&["sql", cfg, "SELECT nope FROM documents"]);
    assert_eq!(bad.status.code(), Some(2));

    let n = sql_number(&config, "SELECT count(*) AS n FROM documents");
    let table = text(&safepipe(&["sql", cfg, "SELECT count(*) AS n FROM documents"]).stdout);
    assert!(table.contains(&format!("| {n}")), "{table}");
    let json = text(
        &safepipe(&[
            "sql",
            cfg,
            "SELECT source, count(*) AS n FROM documents GROUP BY source ORDER BY source",
            "--format",
            "json",
        ])
        .stdout,
    );
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    let total: i64 = parsed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["n"].as_i64().unwrap())
        .sum();
    assert_eq!(total, n);
    let empty = text(&safepipe(&["sql", cfg, "SELECT id FROM documents WHERE false", "--format", "json"]).stdout);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&empty).unwrap(),
        serde_json::json!([])
    );
    let tables = text(&safepipe(&["sql", cfg, "SHOW TABLES"]).stdout);
    for t in ["documents", "quarantine", "routes", "stats"] {
        assert!(tables.contains(t), "{tables}");
    }
    // Nested metadata is queryable.
    assert!(
        sql_number(
            &config,
            "SELECT count(*) FROM documents WHERE metadata.dump IS NOT NULL"
        ) > 0
    );
}

#[test]
fn shell_runs_statements_and_survives_errors() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    run_ok(&config, &[]);
    let mut child = Command::new(bin())
        .args(["shell", config.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"SELECT count(*) AS n\n FROM stats;\nDROP TABLE stats;\nSELECT 41 + 1 AS answer;\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("42"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("read-only"), "{}", text(&out.stderr));
}

/// Queries run within limits: a memory pool (what cannot spill fails with the fix named), a
/// statement timeout, and results streamed. Repro before: no limit at all; one `array_agg` of
/// every text, or a triple self-join, held the machine until it was killed.
#[test]
fn queries_run_within_memory_and_time_limits_and_stream_their_rows() {
    let ws = Workspace::new();
    let config = ws.config("config.toml", &sample_config(""));
    run_ok(&config, &[]);
    let cfg = config.to_str().unwrap();
    // One group holding every text cannot spill: past 1 MiB it fails, naming the limit.
    let out = safepipe(&[
        "sql",
        cfg,
        "SELECT array_agg(text) FROM documents",
        "--memory-limit-mb",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("--memory-limit-mb"), "{}", text(&out.stderr));
    // Under a limit a query fits in, the answer is the unlimited one, streamed as CSV (a sort
    // of every text, 12 MB: its peak varies with batch timing, 40-50 MB here, so 256 MiB).
    let query = "SELECT id FROM documents ORDER BY text, id";
    let limited = safepipe(&["sql", cfg, query, "--format", "csv", "--memory-limit-mb", "256"]);
    assert!(limited.status.success(), "{}", text(&limited.stderr));
    let free = safepipe(&["sql", cfg, query, "--format", "csv", "--memory-limit-mb", "0"]);
    assert_eq!(limited.stdout, free.stdout);
    let rows = sql_number(&config, "SELECT count(*) FROM documents") as usize;
    assert_eq!(
        text(&limited.stdout).lines().count(),
        rows + 1,
        "a header and every row"
    );
    // A statement no machine finishes in a second is stopped at the timeout.
    let out = safepipe(&[
        "sql",
        cfg,
        "SELECT count(*) FROM documents a, documents b, documents c WHERE length(a.text) + length(b.text) = length(c.text) + 7",
        "--timeout",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("timeout"), "{}", text(&out.stderr));
}

/// Text shown in a table cannot drive the terminal: control characters are escaped. Repro
/// before: a document holding `ESC [2J` cleared the screen of whoever ran `shell` on it.
#[test]
fn tables_show_control_characters_escaped() {
    let ws = Workspace::new();
    std::fs::write(
        ws.path().join("ctl.jsonl"),
        "{\"id\": \"c\", \"text\": \"clear \\u001b[2J screen\\nand a bell \\u0007 here\"}\n",
    )
    .unwrap();
    let config = ws.config(
        "config.toml",
        "run_dir = \"run\"\n[[inputs]]\nname = \"ctl\"\npaths = [\"ctl.jsonl\"]\n",
    );
    run_ok(&config, &[]);
    let out = safepipe(&["sql", config.to_str().unwrap(), "SELECT id, text FROM documents"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(!shown.contains('\u{1b}') && !shown.contains('\u{7}'), "{shown:?}");
    assert!(
        shown.contains("clear \\u{1b}[2J screen\\nand a bell \\u{7} here"),
        "{shown}"
    );
    // Text inside lists, maps and dictionaries is escaped too.
    let nested = "SELECT make_array(text) AS l, map(['k'], [text]) AS m, arrow_cast(text, 'Dictionary(Int32, Utf8)') AS d \
                  FROM documents";
    let out = safepipe(&["sql", config.to_str().unwrap(), nested]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(!shown.contains('\u{1b}') && !shown.contains('\u{7}'), "{shown:?}");
    assert_eq!(shown.matches("clear \\u{1b}[2J").count(), 3, "{shown}");
    // Machine formats keep the text as it is (JSON escapes it its own way).
    let json = sql_rows(&config, "SELECT text FROM documents");
    let v: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
    assert_eq!(v["text"], "clear \u{1b}[2J screen\nand a bell \u{7} here");
}
