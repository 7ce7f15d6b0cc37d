//! Hostile and unusual inputs (issue 12, items 3 and 4), fed to the real binary: every record
//! ends as a document or a quarantine row with a reason, memory stays bounded, and no bad file
//! stops the others.
//!
//! Repros before the fix:
//! - a Parquet text column that is dictionary-encoded (pandas categoricals) or plain `Binary`
//!   (Spark) was quarantined whole as `schema_mismatch`;
//! - a few kilobytes of zstd Parquet holding a 300 MiB value were decoded whole;
//! - unmapped columns of any size went into `metadata.extra` (an .jsonl.zst of 2,048 records with
//!   600 KB metadata fields wrote 1.2 GB of `extra`);
//! - a footer claiming a negative row count overflowed the planner's row offsets, and a schema
//!   nesting 20,000 levels overflowed the parquet crate's stack (the whole process aborts).

mod common;

use arrow::array::{
    ArrayRef, BinaryArray, DictionaryArray, LargeStringArray, RecordBatch, StringArray, StringViewArray, StructArray,
};
use arrow::datatypes::{DataType, Field, Int32Type};
use common::*;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), Some(props)).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn texts(n: usize, tag: &str) -> Vec<String> {
    (0..n)
        .map(|i| format!("{tag} document {i}: an ordinary paragraph of web text about gardening."))
        .collect()
}

/// The peak memory `safepipe run` reports on its last line, in MiB.
fn peak_mib(stderr: &str) -> u64 {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("peak memory: "))
        .unwrap_or_else(|| panic!("no peak memory line in:\n{stderr}"));
    line["peak memory: ".len()..].trim_end_matches(" MiB").parse().unwrap()
}

#[test]
fn text_columns_in_every_encoding_writers_use_are_read() {
    let ws = Workspace::new();
    let dir = ws.path();
    let n = 50;
    let ids = |tag: &str| -> ArrayRef { Arc::new(StringArray::from_iter_values((0..n).map(|i| format!("{tag}{i}")))) };
    // pandas categoricals: a dictionary of strings.
    let dict: DictionaryArray<Int32Type> = texts(n, "dict").iter().map(String::as_str).collect();
    write_parquet(
        &dir.join("dict.parquet"),
        vec![("id", ids("d")), ("text", Arc::new(dict))],
    );
    // Spark and older writers: plain binary, one row not UTF-8; binary ids too.
    let mut raw: Vec<Vec<u8>> = texts(n, "binary").into_iter().map(String::into_bytes).collect();
    raw[7] = b"caf\xe9 cr\xe8me, in Latin-1".to_vec();
    let bin_ids: Vec<Vec<u8>> = (0..n).map(|i| format!("b{i}").into_bytes()).collect();
    write_parquet(
        &dir.join("binary.parquet"),
        vec![
            ("id", Arc::new(BinaryArray::from_iter_values(&bin_ids))),
            ("text", Arc::new(BinaryArray::from_iter_values(&raw))),
        ],
    );
    // Large strings, string views, and a nested metadata column.
    let nested = StructArray::from(vec![(
        Arc::new(Field::new("lang", DataType::Utf8, false)),
        Arc::new(StringArray::from_iter_values((0..n).map(|_| "en"))) as ArrayRef,
    )]);
    write_parquet(
        &dir.join("large.parquet"),
        vec![
            ("id", ids("l")),
            ("text", Arc::new(LargeStringArray::from_iter_values(texts(n, "large")))),
            ("info", Arc::new(nested)),
        ],
    );
    write_parquet(
        &dir.join("view.parquet"),
        vec![
            ("id", ids("v")),
            ("text", Arc::new(StringViewArray::from_iter_values(texts(n, "view")))),
        ],
    );
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"{}\"\n[[inputs]]\nname = \"encodings\"\npaths = [\"{}/*.parquet\"]\n",
            dir.join("run").display(),
            dir.display()
        ),
    );
    run_ok(&config, &[]);
    assert_eq!(sql_number(&config, "SELECT count(*) FROM documents"), 4 * n as i64 - 1);
    let bad = sql_rows(&config, "SELECT reason, id, raw FROM quarantine");
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("invalid_utf8") && bad[0].contains("\"b7\""), "{bad:?}");
    for tag in ["dict", "binary", "large", "view"] {
        let got = sql_number(
            &config,
            &format!("SELECT count(*) FROM documents WHERE text LIKE '{tag} document %'"),
        );
        assert_eq!(got, if tag == "binary" { n as i64 - 1 } else { n as i64 }, "{tag}");
    }
    let extra = sql_rows(&config, "SELECT metadata.extra AS e FROM documents WHERE id = 'l3'");
    assert!(extra[0].contains(r#"\"info\":{\"lang\":\"en\"}"#), "{extra:?}");
    assert_eq!(sql_number(&config, "SELECT count(*) FROM documents WHERE id = 'b3'"), 1);
}

/// A Parquet file whose footer says `rows` where the writer wrote 12345 rows: the row counts
/// are zigzag varints of the same length, so the footer stays well formed.
fn with_negative_row_count(path: &Path) {
    let texts = texts(12345, "negative");
    write_parquet(
        path,
        vec![("text", Arc::new(StringArray::from_iter_values(texts)) as ArrayRef)],
    );
    let mut bytes = std::fs::read(path).unwrap();
    // Field header "i64, id + 1" then zigzag(12345) = 24690 = 0xF2 0xC0 0x01; -12345 -> 24689.
    let needle = [0x16, 0xF2, 0xC0, 0x01];
    let mut patched = 0;
    for at in 0..bytes.len() - needle.len() {
        if bytes[at..at + needle.len()] == needle {
            bytes[at + 1] = 0xF1;
            patched += 1;
        }
    }
    assert!(patched >= 1, "row count not found in the footer");
    std::fs::write(path, bytes).unwrap();
}

/// A Parquet file (no rows) whose schema nests `depth` groups, written by the parquet crate (on
/// a thread with a large stack: the crate recurses once per level).
fn with_deep_schema(path: &Path, depth: usize) {
    let path = path.to_path_buf();
    let write = move || {
        let mut message = "required binary text (UTF8);".to_string();
        for level in 0..depth {
            message = format!("optional group g{level} {{ {message} }}");
        }
        let schema = parquet::schema::parser::parse_message_type(&format!("message m {{ {message} }}")).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let writer =
            parquet::file::writer::SerializedFileWriter::new(file, Arc::new(schema), Default::default()).unwrap();
        writer.close().unwrap();
    };
    std::thread::Builder::new()
        .stack_size(1 << 30)
        .spawn(write)
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn bombs_and_lying_footers_are_quarantined_in_bounded_memory() {
    let ws = Workspace::new();
    let dir = ws.path();
    // 1. A few kilobytes of zstd holding one 300 MiB text: its page is refused before decoding.
    write_parquet(
        &dir.join("bomb.parquet"),
        vec![
            ("id", Arc::new(StringArray::from(vec!["bomb", "small"])) as ArrayRef),
            (
                "text",
                Arc::new(StringArray::from(vec!["a".repeat(300 << 20), "a small text".into()])),
            ),
        ],
    );
    // 2. 1,500 rows with a 600 KB unmapped column each (900 MB decoded, one row group): read in
    // batches sized from the footer, the field dropped from `extra` and named there.
    let blob = "b".repeat(600 << 10);
    write_parquet(
        &dir.join("wide.parquet"),
        vec![
            (
                "text",
                Arc::new(StringArray::from_iter_values(texts(1500, "wide"))) as ArrayRef,
            ),
            (
                "blob",
                Arc::new(StringArray::from_iter_values((0..1500).map(|_| blob.as_str()))),
            ),
        ],
    );
    // 3. The issue's JSON Lines case: 2,048 records with 600 KB metadata fields, compressed.
    let mut jsonl = zstd::Encoder::new(std::fs::File::create(dir.join("meta.jsonl.zst")).unwrap(), 1).unwrap();
    for (i, text) in texts(2048, "meta").iter().enumerate() {
        writeln!(
            jsonl,
            r#"{{"id": "m{i}", "text": "{text}", "url": "https://example.com/{blob}", "blob": "{blob}"}}"#
        )
        .unwrap();
    }
    jsonl.finish().unwrap();
    // 4. Lying footers, beside a good file that must be unaffected.
    with_negative_row_count(&dir.join("negative.parquet"));
    with_deep_schema(&dir.join("deep.parquet"), 20_000);
    write_parquet(
        &dir.join("good.parquet"),
        vec![(
            "text",
            Arc::new(StringArray::from_iter_values(texts(100, "good"))) as ArrayRef,
        )],
    );
    let config = ws.config(
        "config.toml",
        &format!(
            "run_dir = \"{run}\"\n\
             [[inputs]]\nname = \"parquet\"\npaths = [\"{d}/*.parquet\"]\n\
             [[inputs]]\nname = \"jsonl\"\npaths = [\"{d}/meta.jsonl.zst\"]\n",
            run = dir.join("run").display(),
            d = dir.display()
        ),
    );
    let stderr = run_ok(&config, &[]);
    let peak = peak_mib(&stderr);
    eprintln!("peak memory of the run over every bomb: {peak} MiB");
    assert!(peak < 1024, "peak memory {peak} MiB:\n{stderr}");

    let reasons = sql_rows(
        &config,
        "SELECT reason, regexp_replace(file, '.*/', '') AS f, records FROM quarantine",
    );
    let has = |reason: &str, file: &str| reasons.iter().any(|r| r.contains(reason) && r.contains(file));
    assert!(has("too_large", "bomb.parquet"), "{reasons:?}");
    assert!(has("unreadable_file", "negative.parquet"), "{reasons:?}");
    assert!(has("unreadable_file", "deep.parquet"), "{reasons:?}");
    let details = sql_rows(&config, "SELECT detail FROM quarantine").join("\n");
    assert!(details.contains("inflates to"), "{details}");
    assert!(details.contains("nests deeper than 64 levels"), "{details}");
    assert!(details.contains("-12345"), "{details}");

    let count = |q: &str| sql_number(&config, q);
    assert_eq!(count("SELECT count(*) FROM documents WHERE text LIKE 'good %'"), 100);
    assert_eq!(count("SELECT count(*) FROM documents WHERE text LIKE 'wide %'"), 1500);
    assert_eq!(count("SELECT count(*) FROM documents WHERE text LIKE 'meta %'"), 2048);
    // Every dropped field is named with its size; nothing over the bound was written.
    assert_eq!(
        count("SELECT count(*) FROM documents WHERE metadata.extra LIKE '%\"dropped_metadata\":{\"extra\":%'"),
        1500 + 2048
    );
    assert_eq!(
        count("SELECT count(*) FROM documents WHERE metadata.url IS NULL AND metadata.extra LIKE '%\"url\":%'"),
        2048
    );
    let longest = count("SELECT max(length(metadata.extra)) FROM documents");
    assert!(longest < 200, "an extra of {longest} bytes");
    // The whole run accounts for every record (the bomb's second row goes with its row group).
    let stats = sql_rows(
        &config,
        "SELECT sum(rows_in) = sum(rows_out) + sum(rows_dropped) + sum(rows_quarantined) AS ok FROM stats WHERE stage = 'ingest'",
    );
    assert_eq!(stats, vec![r#"{"ok":true}"#]);
}
