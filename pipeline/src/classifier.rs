//! `safepipe classifier`: bootstrap a safety classifier (train a linear head on frozen encoder
//! embeddings of a labelled table) and score texts from the command line.
//!
//! `train` reads a Parquet file with a text column and an integer 0..5 score column (and an
//! optional `train`/`test` split column; without one `--test-fraction` of the texts, chosen by
//! the SHA-256 of the text, is held out), embeds each text's first chunk with the encoder, fits the head
//! ([`safepipe_model::classifier::train_head`]), and writes a directory the score stage loads:
//! `classifier.toml` (the encoder's manifest plus the `[head]`, paths relative to it),
//! `head.safetensors` and `metrics.json` (held-out metrics per example on its first chunk, and
//! per document on its worst chunk as the score stage judges it; also printed).

use crate::error::{Error, Result};
use crate::progress::step_bar;
use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use safepipe_model::classifier::{
    Classifier, HeadMetrics, HeadSpec, HeadTraining, Manifest, Precision, RunOptions, evaluate, train_head,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// What `safepipe classifier train` needs.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub encoder: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub name: String,
    pub text_column: String,
    pub score_column: String,
    pub split_column: String,
    pub test_fraction: f64,
    /// Use at most this many examples per label in each split (0 = all), for quick runs.
    pub limit: usize,
    pub training: HeadTraining,
    pub options: RunOptions,
}

/// One labelled example.
struct Example {
    text: String,
    label: usize,
    test: bool,
}

/// Everything `train` reports (written to `metrics.json`).
#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub name: String,
    pub encoder: String,
    pub data: String,
    pub train_examples: usize,
    pub test_examples: usize,
    /// Examples without tokens (empty texts), left out of both splits.
    pub skipped_empty: usize,
    pub train_per_label: Vec<usize>,
    pub settings: HeadTraining,
    /// Per held-out example, on its first chunk (what the head was trained on).
    pub metrics: HeadMetrics,
    /// Per held-out document, on its worst chunk (the score stage's max over chunks).
    pub document_metrics: HeadMetrics,
    pub embed_seconds: f64,
}

pub fn train(args: &TrainArgs) -> Result<TrainReport> {
    let config_err = |msg: String| Error::Config(msg);
    let examples = read_examples(args)?;
    let classifier = Classifier::load_encoder(&args.encoder, &args.options)
        .map_err(|e| config_err(format!("--encoder {}: {e}", args.encoder.display())))?;
    // One head row per label of the encoder's manifest (its `scores` list).
    let labels = classifier.manifest().labels();
    let training = HeadTraining {
        labels,
        ..args.training.clone()
    };
    if let Some(bad) = examples.iter().find(|e| e.label >= labels) {
        return Err(config_err(format!(
            "{}: score {} is outside 0..{labels} (the encoder manifest lists {labels} labels)",
            args.data.display(),
            bad.label
        )));
    }
    let started = std::time::Instant::now();
    let bar = step_bar(examples.len() as u64, "embed");
    let mut embedded: Vec<Option<Vec<f32>>> = Vec::with_capacity(examples.len());
    for window in examples.chunks(256) {
        let texts: Vec<&str> = window.iter().map(|e| e.text.as_str()).collect();
        embedded.extend(
            classifier
                .embed_first_chunks(&texts)
                .map_err(|e| Error::Execution(e.to_string()))?,
        );
        bar.inc(window.len() as u64);
    }
    bar.finish_and_clear();
    let embed_seconds = started.elapsed().as_secs_f64();
    let (mut train_x, mut train_y, mut test_x, mut test_y) = (vec![], vec![], vec![], vec![]);
    let mut skipped_empty = 0;
    for (e, x) in examples.iter().zip(embedded) {
        match x {
            None => skipped_empty += 1,
            Some(x) if e.test => {
                test_x.push(x);
                test_y.push(e.label);
            }
            Some(x) => {
                train_x.push(x);
                train_y.push(e.label);
            }
        }
    }
    if train_x.is_empty() || test_x.is_empty() {
        return Err(config_err(format!(
            "{}: {} training and {} held-out examples; both splits need examples",
            args.data.display(),
            train_x.len(),
            test_x.len()
        )));
    }
    let (head, metrics) =
        train_head(&train_x, &train_y, &test_x, &test_y, &training).map_err(|e| Error::Execution(e.to_string()))?;
    // The same hold-out judged as the score stage will judge it: every chunk, the worst one.
    let (test_texts, test_labels): (Vec<&str>, Vec<usize>) = examples
        .iter()
        .filter(|e| e.test)
        .map(|e| (e.text.as_str(), e.label))
        .unzip();
    let bar = step_bar(test_texts.len() as u64, "documents");
    let (mut doc_x, mut doc_y) = (Vec::new(), Vec::new());
    for (texts, labels) in test_texts.chunks(256).zip(test_labels.chunks(256)) {
        let worst = classifier
            .worst_chunk_embeddings(texts, &head, training.normalize)
            .map_err(|e| Error::Execution(e.to_string()))?;
        for (x, &y) in worst.into_iter().zip(labels) {
            if let Some(x) = x {
                doc_x.push(x);
                doc_y.push(y);
            }
        }
        bar.inc(texts.len() as u64);
    }
    bar.finish_and_clear();
    let document_metrics = evaluate(&head, training.normalize, &doc_x, &doc_y, metrics.final_loss);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", args.out.display())))?;
    head.save(&args.out.join("head.safetensors"))
        .map_err(|e| Error::Execution(e.to_string()))?;
    write_manifest(classifier.manifest(), args)?;
    let mut train_per_label = vec![0; labels];
    train_y.iter().for_each(|&y| train_per_label[y] += 1);
    let report = TrainReport {
        name: args.name.clone(),
        encoder: classifier.model_id(),
        data: args
            .data
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        train_examples: train_x.len(),
        test_examples: test_x.len(),
        skipped_empty,
        train_per_label,
        settings: training.clone(),
        metrics,
        document_metrics,
        embed_seconds,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(args.out.join("metrics.json"), json + "\n")
        .map_err(|e| Error::Config(format!("cannot write metrics.json: {e}")))?;
    Ok(report)
}

/// The encoder's manifest with the head added, its paths made relative to the output directory.
fn write_manifest(encoder: &Manifest, args: &TrainArgs) -> Result<()> {
    // Physical paths (symlinks resolved), so `..` in the relative paths means what the OS means.
    let real = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| absolute(p));
    let out = real(&args.out);
    let rel = |p: &Path| relative_to(&real(p), &out);
    let manifest = Manifest {
        name: args.name.clone(),
        onnx: rel(&encoder.onnx),
        onnx_int8: encoder.onnx_int8.as_deref().map(rel),
        tokenizer: rel(&encoder.tokenizer),
        head: Some(HeadSpec {
            path: PathBuf::from("head.safetensors"),
            normalize: args.training.normalize,
        }),
        ..encoder.clone()
    };
    let body = toml::to_string(&manifest).map_err(|e| Error::Internal(e.to_string()))?;
    let text = format!(
        "# Written by `safepipe classifier train` (docs/classifier.md): the encoder {} with a linear\n\
         # head trained on {}. Paths are relative to this file.\n{body}",
        args.encoder
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        args.data
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
    );
    std::fs::write(out.join("classifier.toml"), text)
        .map_err(|e| Error::Config(format!("cannot write classifier.toml: {e}")))
}

fn absolute(p: &Path) -> PathBuf {
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(p)
    };
    // Lexical normalisation (no symlink resolution): drop `.` and fold `..`.
    let mut out = PathBuf::new();
    for c in joined.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// `path` relative to the directory `base` (both absolute and normalised).
fn relative_to(path: &Path, base: &Path) -> PathBuf {
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let mut out = PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out
}

fn read_examples(args: &TrainArgs) -> Result<Vec<Example>> {
    let file =
        std::fs::File::open(&args.data).map_err(|e| Error::Config(format!("--data {}: {e}", args.data.display())))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| Error::Config(format!("--data {}: {e}", args.data.display())))?
        .build()
        .map_err(|e| Error::Config(format!("--data {}: {e}", args.data.display())))?;
    let mut out = Vec::new();
    let mut rows_read = 0usize;
    // Examples taken per (split, label), for --limit.
    let mut taken: std::collections::HashMap<(bool, i64), usize> = std::collections::HashMap::new();
    for batch in reader {
        let batch = batch.map_err(|e| Error::Config(format!("--data {}: {e}", args.data.display())))?;
        let column = |name: &str| {
            batch.column_by_name(name).cloned().ok_or_else(|| {
                Error::Config(format!(
                    "--data {} has no column {name:?} (columns: {})",
                    args.data.display(),
                    batch
                        .schema()
                        .fields()
                        .iter()
                        .map(|f| f.name().as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
        };
        let texts = cast(&column(&args.text_column)?, &DataType::Utf8)?;
        let scores = column(&args.score_column)?;
        if !scores.data_type().is_integer() {
            return Err(Error::Config(format!(
                "--data {}: column {:?} is {}, not an integer type (scores are labels 0..5)",
                args.data.display(),
                args.score_column,
                scores.data_type()
            )));
        }
        let scores = cast(&scores, &DataType::Int64)?;
        let splits = match batch.column_by_name(&args.split_column) {
            Some(c) => Some(cast(c, &DataType::Utf8)?),
            None => None,
        };
        let (texts, scores) = (
            texts.as_string::<i32>(),
            scores.as_primitive::<arrow::datatypes::Int64Type>(),
        );
        for row in 0..batch.num_rows() {
            if texts.is_null(row) || scores.is_null(row) {
                return Err(Error::Config(format!(
                    "--data {}: row {} has a null {} or {}",
                    args.data.display(),
                    rows_read + row,
                    args.text_column,
                    args.score_column
                )));
            }
            let text = texts.value(row);
            let score = scores.value(row);
            if score < 0 {
                return Err(Error::Config(format!(
                    "--data {}: negative score {score}",
                    args.data.display()
                )));
            }
            let test = match &splits {
                Some(s) => match s.as_string::<i32>().value(row) {
                    "test" => true,
                    "train" => false,
                    other => {
                        return Err(Error::Config(format!(
                            "--data {}: split {other:?} is neither \"train\" nor \"test\"",
                            args.data.display()
                        )));
                    }
                },
                None => {
                    let h = Sha256::digest(text.as_bytes());
                    let bucket = (u64::from_le_bytes(h[..8].try_into().expect("8 bytes")) % 10_000) as f64;
                    bucket < args.test_fraction * 10_000.0
                }
            };
            let count = taken.entry((test, score)).or_default();
            if args.limit > 0 && *count >= args.limit {
                continue;
            }
            *count += 1;
            out.push(Example {
                text: text.to_string(),
                label: score as usize,
                test,
            });
        }
        rows_read += batch.num_rows();
    }
    Ok(out)
}

/// Prints a report as a table (per-label precision/recall/support, then the summary).
pub fn print_report(r: &TrainReport) {
    println!(
        "trained {} on {} examples ({} held out, {} empty skipped) in {:.1}s of embedding",
        r.name, r.train_examples, r.test_examples, r.skipped_empty, r.embed_seconds
    );
    for (what, m) in [
        ("per example (first chunk)", &r.metrics),
        ("per document (worst chunk, as the score stage)", &r.document_metrics),
    ] {
        println!("held out, {what}:");
        println!("label  precision  recall  support");
        for (label, (p, rc, n)) in m.per_label.iter().enumerate() {
            println!("{label:>5}  {p:>9.3}  {rc:>6.3}  {n:>7}");
        }
        println!(
            "macro F1 {:.3}  top-1 accuracy {:.3}  top-3 accuracy {:.3}  unsafe (score > 0) precision {:.3} recall {:.3}",
            m.macro_f1, m.top1_accuracy, m.top3_accuracy, m.unsafe_precision, m.unsafe_recall
        );
        let recalls: Vec<String> = m
            .recall_at_k
            .iter()
            .enumerate()
            .map(|(i, r)| format!("R@{} {r:.3}", i + 1))
            .collect();
        println!(
            "recall of score >= k, predicted >= k (the paper's R@k): {}",
            recalls.join("  ")
        );
    }
}

/// `safepipe classifier score`: one JSON object per text; with `chunks`, each chunk's token ids,
/// logits and probabilities too (each chunk inferred on its own, for inspection and parity
/// checks against other runtimes).
pub fn score_texts(manifest: &Path, precision: Precision, texts: &[String], chunks: bool) -> Result<()> {
    let options = RunOptions {
        precision,
        ..Default::default()
    };
    let classifier =
        Classifier::load(manifest, &options).map_err(|e| Error::Config(format!("{}: {e}", manifest.display())))?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let exec = |e: safepipe_model::classifier::ClassifierError| Error::Execution(e.to_string());
    let prepared = classifier.prepare(&refs).map_err(exec)?;
    let scores = classifier.score_prepared(&prepared).map_err(exec)?;
    let mut detail: Vec<Vec<serde_json::Value>> = vec![Vec::new(); texts.len()];
    if chunks {
        for (doc, ids) in prepared.chunk_ids() {
            let logits = classifier.logits(&[ids]).map_err(exec)?.remove(0);
            let probs = safepipe_model::classifier::softmax(&logits);
            let (score, expected) = classifier.judge(&probs);
            detail[doc].push(serde_json::json!({
                "ids": ids, "logits": logits, "probs": probs, "score": score, "expected": expected,
            }));
        }
    }
    for (s, chunk_detail) in scores.into_iter().zip(detail) {
        let mut json = serde_json::json!({
            "score": s.score, "probs": s.probs, "expected": s.expected, "chunks": s.chunks,
            "tokens": s.tokens, "model": classifier.model_id(),
        });
        if chunks {
            json["chunk_detail"] = serde_json::Value::Array(chunk_detail);
        }
        println!("{json}");
    }
    Ok(())
}

/// Texts from the command line, where `-` stands for one JSON string per line of stdin (so
/// texts with newlines or of any length can be scored).
pub fn expand_stdin(texts: Vec<String>) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for t in texts {
        if t != "-" {
            out.push(t);
            continue;
        }
        for (i, line) in std::io::stdin().lines().enumerate() {
            let line = line.map_err(|e| Error::Config(format!("stdin: {e}")))?;
            if line.trim().is_empty() {
                continue;
            }
            let text: String = serde_json::from_str(&line)
                .map_err(|e| Error::Config(format!("stdin line {}: not a JSON string: {e}", i + 1)))?;
            out.push(text);
        }
    }
    Ok(out)
}
