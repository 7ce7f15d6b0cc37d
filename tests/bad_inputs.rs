//! A corpus of broken inputs: every record ends as a document or a quarantine row with a reason,
//! every unreadable file gets a clear error, and no bad file stops the others.

mod common;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::*;
use std::io::Write;
use std::sync::Arc;

fn write_corpus(dir: &std::path::Path) -> usize {
    // Real mail text for the good lines, broken records between them.
    let ham = std::fs::read_to_string(sample("spamassassin-ham.jsonl")).unwrap();
    let good: Vec<&str> = ham.lines().filter(|l| l.len() > 200).take(40).collect();
    let mut f = std::fs::File::create(dir.join("mixed.jsonl")).unwrap();
    let mut records = 0;
    let mut line = |f: &mut std::fs::File, bytes: &[u8], end: &[u8]| {
        f.write_all(bytes).unwrap();
        f.write_all(end).unwrap();
        records += 1;
    };
    for (i, g) in good.iter().enumerate() {
        line(&mut f, g.as_bytes(), if i % 3 == 0 { b"\r\n" } else { b"\n" });
        match i {
            2 => line(&mut f, br#"{"id": "broken", "text": "unterminated"#, b"\n"),
            4 => line(&mut f, b"{\"id\": \"latin1\", \"text\": \"caf\xe9 cr\xe8me\"}", b"\n"),
            6 => line(&mut f, br#"{"id": "null", "text": null}"#, b"\n"),
            8 => line(&mut f, br#"{"id": "blank", "text": "  \n\t "}"#, b"\n"),
            10 => line(&mut f, br#"{"id": "notext", "body": "the text is elsewhere"}"#, b"\n"),
            12 => line(&mut f, b"[1, 2, 3]", b"\n"),
            14 => line(
                &mut f,
                br#"{"id": {"nested": 1}, "text": "an id that is an object"}"#,
                b"\n",
            ),
            16 => line(&mut f, br#"{"id": "number", "text": 42}"#, b"\n"),
            18 => {
                // 20 MB in one record: read only up to the cap, then skipped and quarantined.
                let huge = format!("{{\"id\": \"huge\", \"text\": \"{}\"}}", "spam ".repeat(4 << 20));
                line(&mut f, huge.as_bytes(), b"\n");
            }
            20 => {
                let long = format!("{{\"id\": \"long\", \"text\": \"{}\"}}", "word ".repeat(1 << 20));
                line(&mut f, long.as_bytes(), b"\n");
            }
            22 => line(
                &mut f,
                br#"{"text": "a record without an id gets one derived from its text"}"#,
                b"\n",
            ),
            24 => line(
                &mut f,
                br#"{"id": 7, "text": "a numeric id is kept as its decimal string"}"#,
                b"\n",
            ),
            26 => {
                f.write_all(b"\n   \n").unwrap(); // blank lines are not records
            }
            _ => {}
        }
    }
    // The last record has no trailing newline.
    line(
        &mut f,
        br#"{"id": "last", "text": "the final line of the file has no newline"}"#,
        b"",
    );

    // A Parquet file cut in half: its footer is gone.
    let parquet = std::fs::read(sample("harmbench.parquet")).unwrap();
    std::fs::write(dir.join("truncated.parquet"), &parquet[..parquet.len() / 2]).unwrap();

    // A Parquet file with the wrong schema (no text column).
    let schema = Arc::new(Schema::new(vec![
        Field::new("body", DataType::Utf8, true),
        Field::new("n", DataType::Int64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values((0..10).map(|i| format!("row {i}")))),
            Arc::new(Int64Array::from_iter_values(0..10)),
        ],
    )
    .unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(dir.join("wrong_schema.parquet")).unwrap(),
        schema,
        None,
    )
    .unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();

    // A gzip file cut short and followed by garbage.
    let gz = std::fs::read(sample("spamassassin-spam.jsonl.gz")).unwrap();
    let mut corrupt = gz[..gz.len() / 2].to_vec();
    corrupt.extend(std::iter::repeat_n(0xAB, 4096));
    std::fs::write(dir.join("corrupt.jsonl.gz"), corrupt).unwrap();
    records
}

#[test]
fn every_bad_record_is_accounted_for_and_no_bad_file_stops_the_others() {
    let ws = Workspace::new();
    let records = write_corpus(ws.path());
    let config = ws.config(
        "config.toml",
        "run_dir = \"run\"\n\
         [[inputs]]\nname = \"mixed\"\npaths = [\"mixed.jsonl\"]\n\
         [[inputs]]\nname = \"parquet\"\npaths = [\"*.parquet\"]\n\
         [[inputs]]\nname = \"gz\"\npaths = [\"corrupt.jsonl.gz\"]\n\
         [plan]\njsonl_unit_bytes = 8192\n",
    );
    let stderr = run_ok(&config, &[]);
    assert!(units_done(&stderr, "ingest") > 5, "{stderr}");

    let reason = |id: &str| {
        sql_rows(&config, &format!("SELECT reason FROM quarantine WHERE id = '{id}'"))
            .first()
            .cloned()
            .unwrap_or_else(|| panic!("{id} not quarantined"))
    };
    assert!(reason("latin1").contains("invalid_utf8"));
    assert!(reason("null").contains("missing_text"));
    assert!(reason("blank").contains("empty_text"));
    assert!(reason("notext").contains("missing_text"));
    assert!(reason("number").contains("text_not_string"));
    assert!(reason("long").contains("text_too_long"));
    let by_reason = sql_rows(
        &config,
        "SELECT reason, sum(records) AS n FROM quarantine WHERE source = 'mixed' GROUP BY reason",
    );
    for expected in ["invalid_json", "not_an_object", "invalid_id", "record_too_long"] {
        assert!(
            by_reason.iter().any(|r| r.contains(expected)),
            "{expected} missing from {by_reason:?}"
        );
    }
    // The 20 MB record was not read whole: its raw prefix is short.
    assert!(
        sql_number(
            &config,
            "SELECT max(length(raw)) FROM quarantine WHERE reason = 'record_too_long'"
        ) <= 1024
    );

    // Every record of the JSONL file is accounted for, across all its units.
    let documents = sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'mixed'");
    let quarantined = sql_number(&config, "SELECT sum(records) FROM quarantine WHERE source = 'mixed'");
    assert_eq!(documents + quarantined, records as i64);
    assert_eq!(sql_number(&config, "SELECT count(*) FROM documents WHERE id = '7'"), 1);
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM documents WHERE id LIKE 'sha256:%'"),
        1
    );
    assert_eq!(
        sql_number(&config, "SELECT count(*) FROM documents WHERE id = 'last'"),
        1
    );

    // Unreadable files: one clear row each, the rest of the run went on.
    let parquet = sql_rows(
        &config,
        "SELECT file, reason, records, detail FROM quarantine WHERE source = 'parquet'",
    );
    assert_eq!(parquet.len(), 2, "{parquet:?}");
    let truncated = parquet.iter().find(|r| r.contains("truncated.parquet")).unwrap();
    assert!(
        truncated.contains("unreadable_file") && truncated.contains("Parquet"),
        "{truncated}"
    );
    let wrong = parquet.iter().find(|r| r.contains("wrong_schema.parquet")).unwrap();
    assert!(
        wrong.contains("schema_mismatch") && wrong.contains("\"records\":10") && wrong.contains("no column 'text'"),
        "{wrong}"
    );
    let gz = sql_rows(&config, "SELECT reason, detail FROM quarantine WHERE source = 'gz'");
    assert_eq!(gz.len(), 1, "{gz:?}");
    assert!(
        gz[0].contains("corrupt_stream") && gz[0].contains("unreadable"),
        "{gz:?}"
    );
    assert!(sql_number(&config, "SELECT count(*) FROM documents WHERE source = 'gz'") > 10);

    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM stats WHERE rows_in <> rows_out + rows_dropped + rows_quarantined"
        ),
        0
    );
    let status = text(&safepipe(&["status", config.to_str().unwrap()]).stdout);
    assert!(!status.contains("last error"), "{status}");
}

/// A UTF-8 byte-order mark before the first record (as Windows tools write), and one mid-file
/// (two such files concatenated), costs no record; compressed the same. Repro before the fix:
/// the first record was quarantined as `invalid_json` ("expected value at line 1 column 1").
#[test]
fn byte_order_marks_cost_no_record() {
    let ws = Workspace::new();
    let body = "\u{feff}{\"id\": \"a\", \"text\": \"first record after a byte-order mark\"}\n\
                {\"id\": \"b\", \"text\": \"second record\"}\n\
                \u{feff}{\"id\": \"c\", \"text\": \"a second file's first record\"}\r\n";
    std::fs::write(ws.path().join("bom.jsonl"), body).unwrap();
    let gz = std::process::Command::new("gzip")
        .args(["-c", ws.path().join("bom.jsonl").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(gz.status.success());
    std::fs::write(ws.path().join("bom2.jsonl.gz"), gz.stdout).unwrap();
    let config = ws.config(
        "config.toml",
        "run_dir = \"run\"\n[[inputs]]\nname = \"plain\"\npaths = [\"bom.jsonl\"]\n\
         [[inputs]]\nname = \"gz\"\npaths = [\"bom2.jsonl.gz\"]\n",
    );
    run_ok(&config, &[]);
    assert_eq!(sql_number(&config, "SELECT count(*) FROM quarantine"), 0);
    assert_eq!(sql_number(&config, "SELECT count(*) FROM documents"), 6);
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM documents WHERE starts_with(text, 'first record')"
        ),
        2
    );
    assert_eq!(
        sql_number(
            &config,
            "SELECT count(*) FROM documents WHERE strpos(text, chr(65279)) > 0 OR strpos(id, chr(65279)) > 0"
        ),
        0
    );
}
