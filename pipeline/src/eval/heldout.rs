//! The evaluation set: the evaluation part of every input `[eval]` names, read from the same
//! planned files as ingest (the same reader, columns and checks) keeping only the documents
//! ingest leaves out; and the contamination check that refuses a run whose `documents` hold an
//! evaluation id or an evaluation text.

use super::EvalConfig;
use crate::config::Config;
use crate::engine::plan::Plan;
use crate::engine::run_dir::RunDir;
use crate::error::{Error, Result};
use crate::stages::ingest::unit_input;
use arrow::array::{AsArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::display::array_value_to_string;
use datafusion::datasource::MemTable;
use futures::TryStreamExt;
use safepipe_operators::holdout::Part;
use safepipe_operators::ingest::ingest;
use std::sync::Arc;

/// Harmful requests or safe text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Harmful,
    Benign,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Harmful => "harmful",
            Kind::Benign => "benign",
        }
    }
}

/// One held-out document.
#[derive(Debug, Clone)]
pub struct EvalDoc {
    pub id: String,
    pub text: String,
    pub source: String,
    pub kind: Kind,
}

/// Reads the evaluation part of every input `[eval]` names, in plan order. Quarantined records
/// stay out (they never reach training either).
pub async fn read(config: &Config, run_dir: &RunDir, plan: &Plan, eval: &EvalConfig) -> Result<Vec<EvalDoc>> {
    let mut docs = Vec::new();
    let named = eval
        .harmful
        .iter()
        .map(|n| (n, Kind::Harmful))
        .chain(eval.benign.iter().map(|n| (n, Kind::Benign)));
    for (name, kind) in named {
        // cannot fail: `EvalConfig::check` made sure every named input exists with a holdout.
        let input = config.input(name).expect("checked input");
        let holdout = input.holdout.expect("checked holdout");
        let options = Arc::new(safepipe_operators::ingest::IngestOptions {
            holdout: Some((holdout, Part::Evaluation)),
            ..config.ingest.options(input)
        });
        for unit in plan.units.iter().filter(|u| &u.input == name) {
            let batches: Vec<_> = ingest(unit_input(run_dir, unit)?, options.clone())
                .try_collect()
                .await?;
            for b in batches {
                let ids = b.documents.column_by_name("id").map(|c| c.as_string::<i32>().clone());
                let texts = b.documents.column_by_name("text").map(|c| c.as_string::<i32>().clone());
                let (Some(ids), Some(texts)) = (ids, texts) else {
                    return Err(Error::Internal("documents batch without id or text".into()));
                };
                for (id, text) in ids.iter().zip(texts.iter()) {
                    if let (Some(id), Some(text)) = (id, text) {
                        docs.push(EvalDoc {
                            id: id.to_string(),
                            text: text.to_string(),
                            source: name.clone(),
                            kind,
                        });
                    }
                }
            }
        }
    }
    Ok(docs)
}

/// Fails when any evaluation id, or any evaluation text exactly, is in the run's `documents`
/// (an input without its holdout, a copy of a prompt in another input, a changed seed).
pub async fn check_contamination(config: &Config, docs: &[EvalDoc]) -> Result<()> {
    let ctx = crate::catalog::session(config).await?;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from_iter_values(docs.iter().map(|d| d.id.as_str()))),
            Arc::new(StringArray::from_iter_values(docs.iter().map(|d| d.text.as_str()))),
        ],
    )?;
    ctx.register_table("eval_set", Arc::new(MemTable::try_new(schema, vec![vec![batch]])?))?;
    let mut found = Vec::new();
    for (what, on) in [("id", "d.id = e.id"), ("text", "d.text = e.text")] {
        let sql = format!("SELECT e.id, d.id, d.source FROM eval_set e JOIN documents d ON {on} ORDER BY e.id LIMIT 5");
        let batches = ctx.sql(&sql).await?.collect().await?;
        for b in batches {
            for row in 0..b.num_rows() {
                let col = |i: usize| array_value_to_string(b.column(i), row).unwrap_or_default();
                found.push(format!("{} (same {what} as document {} of {})", col(0), col(1), col(2)));
            }
        }
    }
    if !found.is_empty() {
        return Err(Error::Execution(format!(
            "the run is contaminated: evaluation documents reached its `documents` table, e.g. {}; \
             give each evaluated input its `holdout` before the run ingests it (docs/evaluation.md)",
            found.join("; ")
        )));
    }
    Ok(())
}
