//! `safepipe classifier`: bootstrap a safety classifier (train a head on frozen encoder
//! embeddings of a labelled table) and score texts from the command line.
//!
//! `train` reads a labelled Parquet table ([`labels`]: train/test parts, training folds,
//! groups), embeds **every chunk** of every text ([`embeddings`], optionally cached per text),
//! and per fold fits a head on the other folds ([`fit`]: first each chunk carries its document's
//! label, since the score stage judges a document by its worst chunk and every chunk of a safe
//! document must look safe; then multiple-instance rounds keep only the most unsafe-looking
//! chunk of each unsafe document). On the out-of-fold judgements it chooses the decision
//! threshold ([`calibrate`]: the safe-label offset that flags the most unsafe documents while
//! each group's false-positive rate stays at or below its target), writes the fold heads'
//! average with the offset folded into its bias, and reports on the test part. The directory it
//! writes is what the score stage loads: `classifier.toml` (the encoder's manifest plus the
//! `[head]`, paths relative to it), `head.safetensors` and `metrics.json` (held-out metrics per
//! example on its first chunk, per document on its worst chunk as the score stage judges it, and
//! per group the false-positive rate on safe documents next to the recall of unsafe ones; also
//! printed).

mod calibrate;
mod embeddings;
mod labels;

pub use calibrate::{GroupRates, Targets};
pub use labels::{Division, LabelColumns};

use crate::error::{Error, Result};
use calibrate::Judged;
use labels::{Example, Part};
use safepipe_model::classifier::{
    Classifier, Head, HeadMetrics, HeadSpec, HeadTraining, Manifest, Precision, RunOptions, encoder_identity, evaluate,
    train_head,
};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What `safepipe classifier train` needs.
#[derive(Debug, Clone)]
pub struct TrainArgs {
    pub encoder: PathBuf,
    pub data: PathBuf,
    pub out: PathBuf,
    pub name: String,
    pub columns: LabelColumns,
    pub division: Division,
    /// The false-positive rates on each group's safe out-of-fold documents the threshold keeps.
    pub targets: Targets,
    /// Multiple-instance rounds after the first fit (see `train`).
    pub instance_rounds: usize,
    /// Where chunk embeddings are cached between runs (None: not cached).
    pub embeddings_cache: Option<PathBuf>,
    pub training: HeadTraining,
    pub options: RunOptions,
}

/// Everything `train` reports (written to `metrics.json`).
#[derive(Debug, Serialize)]
pub struct TrainReport {
    pub name: String,
    pub encoder: String,
    pub data: String,
    /// Training documents, and the chunks the fold heads were fitted on (summed over folds; after
    /// the multiple-instance rounds).
    pub train_examples: usize,
    pub train_chunks: usize,
    /// Folds of the out-of-fold threshold.
    pub folds: usize,
    pub test_examples: usize,
    /// Examples without tokens (empty texts), left out of every part.
    pub skipped_empty: usize,
    /// Chunks of the training documents per label.
    pub train_per_label: Vec<usize>,
    pub settings: HeadTraining,
    /// The targets of the threshold, and the offset it gave the safe label's logit.
    pub targets: Targets,
    pub safe_logit_offset: f32,
    /// Per held-out example, on its first chunk.
    pub metrics: HeadMetrics,
    /// Per held-out document, on its worst chunk (the score stage's max over chunks).
    pub document_metrics: HeadMetrics,
    /// Per group of held-out documents: false positives of safe ones, recall of unsafe ones.
    pub test_groups: Vec<GroupRates>,
    /// The same on the training documents out of fold (each judged by a head fitted without
    /// its fold), where the threshold was chosen.
    pub out_of_fold_groups: Vec<GroupRates>,
    pub embed_seconds: f64,
}

pub fn train(args: &TrainArgs) -> Result<TrainReport> {
    let config_err = |msg: String| Error::Config(msg);
    let exec = |e: safepipe_model::classifier::ClassifierError| Error::Execution(e.to_string());
    let fractions = [
        ("--max-fpr", args.targets.default),
        ("--test-fraction", args.division.test_fraction),
    ];
    let group_targets = args.targets.groups.values().map(|&t| ("--group-max-fpr", t));
    for (flag, value) in fractions.into_iter().chain(group_targets) {
        if !(0.0..=1.0).contains(&value) {
            return Err(config_err(format!("{flag} {value} is not a fraction in 0..1")));
        }
    }
    if args.division.folds < 2 {
        return Err(config_err(format!("--folds {} is below 2", args.division.folds)));
    }
    let examples = labels::read_examples(&args.data, &args.columns, args.division)?;
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
    let identity = encoder_identity(&args.encoder, &args.options).map_err(exec)?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let started = std::time::Instant::now();
    let chunks = embeddings::embed(&classifier, &identity, &texts, args.embeddings_cache.as_deref())?;
    let embed_seconds = started.elapsed().as_secs_f64();
    let skipped_empty = chunks.iter().filter(|c| c.is_empty()).count();
    let part = |p: Part| -> Vec<(&Example, &Vec<Vec<f32>>)> {
        examples
            .iter()
            .zip(&chunks)
            .filter(|(e, c)| e.part == p && !c.is_empty())
            .collect()
    };
    let (train_docs, test) = (part(Part::Train), part(Part::Test));
    let folds = args.division.folds;
    let fold_sizes: Vec<usize> = (0..folds)
        .map(|f| train_docs.iter().filter(|(e, _)| e.fold == f).count())
        .collect();
    if test.is_empty() || fold_sizes.contains(&0) {
        return Err(config_err(format!(
            "{}: {} held-out examples and training folds of {fold_sizes:?}; every part and fold needs examples",
            args.data.display(),
            test.len(),
        )));
    }
    // Out-of-fold judgements: each fold judged by a head fitted on the others. The head written
    // is the average of these fold heads (its logits are their mean), so the threshold is chosen
    // on judgements by the very heads it is applied to, each on texts it was not fitted on.
    let mut out_of_fold = Vec::with_capacity(train_docs.len());
    let (mut fold_heads, mut losses, mut fitted_chunks) = (Vec::new(), 0.0, 0);
    for f in 0..folds {
        eprintln!("fitting without fold {}/{folds}", f + 1);
        let (inside, outside): (Vec<_>, Vec<_>) = train_docs.iter().partition(|(e, _)| e.fold == f);
        let fitted = fit(&outside, &training, args.instance_rounds).map_err(exec)?;
        out_of_fold.extend(judge(&fitted.head, &training, &inside));
        losses += fitted.final_loss / folds as f64;
        fitted_chunks += fitted.chunks;
        fold_heads.push(fitted.head);
    }
    let final_loss = losses;
    let offset = calibrate::choose_offset(&out_of_fold, &args.targets);
    let mut head = Head::average(&fold_heads).ok_or_else(|| Error::Internal("fold heads differ in shape".into()))?;
    head.output.bias[0] += offset;
    // The test part, per example on its first chunk and per document on its worst chunk.
    let first: Vec<&[f32]> = test.iter().map(|(_, c)| c[0].as_slice()).collect();
    let test_y: Vec<usize> = test.iter().map(|(e, _)| e.label).collect();
    let metrics = evaluate(&head, training.normalize, &first, &test_y, final_loss);
    let worst: Vec<&[f32]> = test
        .iter()
        .map(|(_, c)| {
            let logits: Vec<Vec<f32>> = c.iter().map(|x| head.apply(x, training.normalize)).collect();
            c[classifier.worst_chunk(&logits).map_or(0, |(i, _)| i)].as_slice()
        })
        .collect();
    let document_metrics = evaluate(&head, training.normalize, &worst, &test_y, final_loss);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Config(format!("cannot create {}: {e}", args.out.display())))?;
    head.save(&args.out.join("head.safetensors")).map_err(exec)?;
    write_manifest(classifier.manifest(), args)?;
    let mut train_per_label = vec![0; labels];
    train_docs.iter().for_each(|(e, c)| train_per_label[e.label] += c.len());
    let report = TrainReport {
        name: args.name.clone(),
        encoder: classifier.model_id(),
        data: args
            .data
            .file_name()
            .map(|f| f.to_string_lossy().to_string())
            .unwrap_or_default(),
        train_examples: train_docs.len(),
        train_chunks: fitted_chunks,
        folds,
        test_examples: test.len(),
        skipped_empty,
        train_per_label,
        settings: training.clone(),
        targets: args.targets.clone(),
        safe_logit_offset: offset,
        metrics,
        document_metrics,
        // The written head holds the offset, so its own decision (margin > 0) is the flag.
        test_groups: calibrate::group_rates(&judge(&head, &training, &test), 0.0),
        out_of_fold_groups: calibrate::group_rates(&out_of_fold, offset),
        embed_seconds,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
    std::fs::write(args.out.join("metrics.json"), json + "\n")
        .map_err(|e| Error::Config(format!("cannot write metrics.json: {e}")))?;
    Ok(report)
}

/// A fitted head, its last epoch's loss and the number of chunks it was fitted on.
struct Fitted {
    head: Head,
    final_loss: f64,
    chunks: usize,
}

/// Fits a head on `docs`: first every chunk carries its document's label; then each of
/// `instance_rounds` multiple-instance rounds refits with each unsafe document reduced to the
/// chunk the current head finds most unsafe (an unsafe document holds unsafe text somewhere, not
/// necessarily in every chunk: a spam mail's quoted reply, a long mail's signature), while safe
/// documents keep every chunk.
fn fit(
    docs: &[(&Example, &Vec<Vec<f32>>)],
    training: &HeadTraining,
    instance_rounds: usize,
) -> safepipe_model::classifier::Result<Fitted> {
    let (mut xs, mut ys): (Vec<&Vec<f32>>, Vec<usize>) =
        docs.iter().flat_map(|(e, c)| c.iter().map(|x| (x, e.label))).unzip();
    let (mut head, mut final_loss) = train_head(&xs, &ys, training)?;
    for _ in 0..instance_rounds {
        (xs, ys) = docs
            .iter()
            .flat_map(|(e, c)| {
                let keep: Vec<&Vec<f32>> = if e.label == 0 || c.len() == 1 {
                    c.iter().collect()
                } else {
                    let margins = c
                        .iter()
                        .map(|x| calibrate::chunk_margin(&head.apply(x, training.normalize)));
                    let best = margins
                        .enumerate()
                        .fold((0, f32::NEG_INFINITY), |b, (i, m)| if m > b.1 { (i, m) } else { b });
                    vec![&c[best.0]]
                };
                keep.into_iter().map(|x| (x, e.label))
            })
            .unzip();
        (head, final_loss) = train_head(&xs, &ys, training)?;
    }
    Ok(Fitted {
        head,
        final_loss,
        chunks: ys.len(),
    })
}

/// Each document's label, group and margin under `head`.
fn judge<'a>(head: &Head, training: &HeadTraining, docs: &[(&'a Example, &Vec<Vec<f32>>)]) -> Vec<Judged<'a>> {
    docs.iter()
        .map(|(e, c)| {
            let logits: Vec<Vec<f32>> = c.iter().map(|x| head.apply(x, training.normalize)).collect();
            Judged {
                label: e.label,
                group: &e.group,
                margin: calibrate::margin(&logits),
            }
        })
        .collect()
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

/// Prints a report as a table (per-label precision/recall/support, then the summary).
pub fn print_report(r: &TrainReport) {
    println!(
        "trained {} on {} chunks of {} examples (threshold out of {} folds, {} held out, {} empty skipped) in {:.1}s of embedding",
        r.name, r.train_chunks, r.train_examples, r.folds, r.test_examples, r.skipped_empty, r.embed_seconds
    );
    let overrides: String = r.targets.groups.iter().map(|(g, t)| format!(", {g} {t}")).collect();
    println!(
        "threshold: safe-label logit offset {:.3}: the most unsafe out-of-fold documents flagged with each group's false-positive rate <= its target (every group {}{overrides})",
        r.safe_logit_offset, r.targets.default
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
    for (what, groups) in [("held out", &r.test_groups), ("out of fold", &r.out_of_fold_groups)] {
        println!("{what}, per group (a document is flagged at score >= 1):");
        println!("group       safe  false positives  FPR     unsafe  caught  recall");
        for g in groups {
            println!(
                "{:<10} {:>5}  {:>15}  {:.3}  {:>6}  {:>6}  {:.3}",
                g.group,
                g.safe_documents,
                g.false_positives,
                g.false_positive_rate,
                g.unsafe_documents,
                g.caught,
                g.unsafe_recall
            );
        }
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
