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
