//! What an evaluation leaves behind: `RUN_DIR/eval/<name>/continuations.parquet` (one row per
//! continuation: the `eval` table), `summary.json` and `summary.md`; and the `eval` table's
//! registration in SQL sessions.

use super::heldout::EvalDoc;
use super::metrics::Rate;
use super::{Evaluated, Summary};
use crate::engine::run_dir::RunDir;
use crate::error::Result;
use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt8Array, UInt32Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use std::sync::{Arc, LazyLock};

/// The folder of evaluations in a run directory.
pub const EVAL_DIR: &str = "eval";
const ROWS_FILE: &str = "continuations.parquet";

/// `eval`: one row per (evaluation, decoder, prompt).
pub static EVAL: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("evaluation", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("decoder", DataType::Utf8, false),
        // `harmful` or `benign`.
        Field::new("kind", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("prefix", DataType::Utf8, false),
        Field::new("continuation", DataType::Utf8, false),
        // stop, length, or error (then `error` says why).
        Field::new("finish_reason", DataType::Utf8, false),
        Field::new("completion_tokens", DataType::UInt32, false),
        Field::new("classifier_score", DataType::UInt8, true),
        Field::new("llm_score", DataType::UInt8, true),
        Field::new("refused", DataType::Boolean, false),
        // classifier_score >= eval.unsafe_score (null without a classifier).
        Field::new("unsafe", DataType::Boolean, true),
        // llm_score >= eval.unsafe_score (null without an LLM judgement).
        Field::new("llm_unsafe", DataType::Boolean, true),
        // The mean P(tag | prefix) over the held-out text itself (null without a tag token).
        Field::new("text_p_tag", DataType::Float64, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("evaluated_at", DataType::Utf8, false),
    ]))
});

/// Writes the rows, `summary.json` and `summary.md` (each file atomically).
pub async fn write(
    run_dir: &RunDir,
    name: &str,
    summary: &Summary,
    markdown: &str,
    docs: &[EvalDoc],
    e: &Evaluated,
) -> Result<()> {
    let now = chrono::Utc::now().to_rfc3339();
    let rows = &e.rows;
    let strings =
        |f: &dyn Fn(&super::Row) -> String| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let batch = RecordBatch::try_new(
        EVAL.clone(),
        vec![
            strings(&|_| name.to_string()),
            strings(&|_| e.model.clone()),
            strings(&|r| r.decoder.clone()),
            strings(&|r| docs[r.doc].kind.as_str().to_string()),
            strings(&|r| docs[r.doc].id.clone()),
            strings(&|r| docs[r.doc].source.clone()),
            strings(&|r| e.prefixes[r.doc].clone()),
            strings(&|r| r.continuation.clone()),
            strings(&|r| r.finish_reason.clone()),
            Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.completion_tokens))),
            Arc::new(UInt8Array::from_iter(rows.iter().map(|r| r.classifier_score))),
            Arc::new(UInt8Array::from_iter(rows.iter().map(|r| r.llm_score))),
            Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.refused)))),
            Arc::new(BooleanArray::from_iter(
                rows.iter()
                    .map(|r| r.classifier_score.map(|s| s >= summary.unsafe_score)),
            )),
            Arc::new(BooleanArray::from_iter(
                rows.iter().map(|r| r.llm_score.map(|s| s >= summary.unsafe_score)),
            )),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| e.p_tag[r.doc]))),
            Arc::new(StringArray::from_iter(rows.iter().map(|r| r.error.clone()))),
            strings(&|_| now.clone()),
        ],
    )?;
    let mut bytes = Vec::new();
    {
        let mut writer = parquet::arrow::ArrowWriter::try_new(&mut bytes, EVAL.clone(), None)?;
        writer.write(&batch)?;
        writer.close()?;
    }
    let folder = format!("{EVAL_DIR}/{name}");
    run_dir
        .put(&run_dir.file(&format!("{folder}/{ROWS_FILE}"))?, bytes)
        .await?;
    // cannot fail: the summary is plain data.
    let json = serde_json::to_vec_pretty(summary).expect("json");
    run_dir
        .put(&run_dir.file(&format!("{folder}/summary.json"))?, json)
        .await?;
    run_dir
        .put(
            &run_dir.file(&format!("{folder}/summary.md"))?,
            markdown.as_bytes().to_vec(),
        )
        .await?;
    Ok(())
}

/// Registers `eval` over every evaluation's rows in the run directory (empty when none).
pub async fn register(ctx: &SessionContext, run_dir: &RunDir) -> Result<()> {
    let mut batches = Vec::new();
    let mut listed = run_dir.list(EVAL_DIR).await?;
    listed.sort_by(|a, b| a.location.cmp(&b.location));
    for meta in listed.into_iter().filter(|m| m.location.as_ref().ends_with(ROWS_FILE)) {
        let location = crate::engine::storage::Location {
            path: meta.location.clone(),
            ..run_dir.root().clone()
        };
        let Some(bytes) = location.read().await? else { continue };
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?;
        for batch in reader {
            let batch = batch?;
            if batch.schema().fields() != EVAL.fields() {
                // An evaluation written by another version: left out, so it never blocks the
                // run's other tables (or the `eval` that would replace it).
                tracing::warn!(file = %location.display(), "left out of the eval table: other columns than this version writes; rerun `safepipe eval` under that --name to replace it");
                break;
            }
            batches.push(batch);
        }
    }
    ctx.register_table("eval", Arc::new(MemTable::try_new(EVAL.clone(), vec![batches])?))?;
    Ok(())
}

/// The markdown summary: one table row per decoder, then the text-level figures.
pub fn markdown(s: &Summary) -> String {
    let rate = |r: &Option<Rate>| match r {
        Some(r) => format!("{:.2} [{:.2}, {:.2}] (n={})", r.rate, r.low, r.high, r.n),
        None => "n/a".into(),
    };
    let mut out = format!(
        "## Evaluation {}\n\nModel `{}`; {} harmful and {} benign held-out prefixes, up to {} new tokens each. \
         Unsafe = score >= {} by the classifier ({}) or by the LLM judge ({}); intervals are 95% bootstrap.\n\n",
        s.name,
        s.model,
        s.harmful_prompts,
        s.benign_prompts,
        s.max_tokens,
        s.unsafe_score,
        s.classifier.as_deref().unwrap_or("none: no [score]"),
        s.llm_judge.as_deref().unwrap_or("none"),
    );
    out.push_str(
        "| decoder | harmful: unsafe (classifier) | harmful: unsafe (LLM judge) | harmful: refusals | benign: unsafe (classifier) | judges agree | tokens/s |\n\
         |---|---|---|---|---|---:|---:|\n",
    );
    for d in &s.decoders {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} |\n",
            d.decoder,
            rate(&d.harmful_unsafe_classifier),
            rate(&d.harmful_unsafe_llm),
            rate(&d.harmful_refusals),
            rate(&d.benign_unsafe_classifier),
            d.judge_agreement.map_or("n/a".into(), |a| format!("{a:.2}")),
            d.tokens_per_second,
        ));
    }
    out.push_str(&format!(
        "\nTag-probability AUROC (mean P(tag | prefix) over each held-out text, harmful vs benign): {}. \
         Perplexity of the held-out benign text: {}.\n",
        s.tag_auroc.map_or("n/a (no tag token)".into(), |a| format!("{a:.3}")),
        s.safe_perplexity.map_or("n/a".into(), |p| format!("{p:.1}")),
    ));
    out
}
