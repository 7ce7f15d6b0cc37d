//! `safepipe report CONFIG`: one self-contained HTML page of a run, from its committed tables,
//! records, the pack manifest and the trainer's `metrics.jsonl`.
//!
//! ```text
//! mod.rs     the page: SQL over the run's tables (the same session `safepipe sql` opens)
//! data.rs    sections on what the data became: flow, scores, synthetic, tagging, mixture
//! run.rs     sections on how the run went: stage timings, quarantine, examples, training
//! charts.rs  inline SVG charts (plotters' SVG backend)
//! html.rs    escaping, tables with data-metric keys, examples, the page
//! ```
//!
//! Every number comes from a SQL query over the catalog (or the manifest / metrics file, which
//! `sql` also exposes as `shards`), and carries `data-metric="key"` with its exact value, so it
//! can be checked against `safepipe sql`. Text taken from documents is escaped; the page has no
//! scripts and no external resources (a Content-Security-Policy forbids them too).

mod charts;
mod data;
mod html;
mod run;

use crate::catalog;
use crate::config::Config;
use crate::engine::run_dir::RunDir;
use crate::error::{Error, Result};
use crate::pack::{self, ManifestState};
use crate::stages::StageGraph;
use datafusion::prelude::SessionContext;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

/// The file name of the report in the run directory.
pub const REPORT_FILE: &str = "report.html";

pub(super) type Row = Map<String, Value>;

/// The rows of `query` as JSON objects.
pub(super) async fn rows(ctx: &SessionContext, query: &str) -> Result<Vec<Row>> {
    let batches = ctx.sql(query).await?.collect().await?;
    let mut buf = Vec::new();
    {
        let mut writer = arrow::json::ArrayWriter::new(&mut buf);
        for b in &batches {
            writer.write(b)?;
        }
        writer.finish()?;
    }
    if buf.is_empty() {
        return Ok(Vec::new());
    }
    let parsed: Vec<Row> =
        serde_json::from_slice(&buf).map_err(|e| Error::Internal(format!("report query rows: {e}")))?;
    Ok(parsed)
}

pub(super) fn num(row: &Row, key: &str) -> f64 {
    match row.get(key) {
        Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
        Some(Value::String(s)) => s.parse().unwrap_or(0.0),
        Some(Value::Bool(b)) => f64::from(u8::from(*b)),
        _ => 0.0,
    }
}

pub(super) fn text(row: &Row, key: &str) -> String {
    match row.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Writes the report of `config`'s run: to `out` when given, else `report.html` in the run
/// directory (local or object store). Returns where it went.
pub async fn write(config: &Config, out: Option<&Path>) -> Result<String> {
    let page = render(config).await?;
    match out {
        Some(path) => {
            std::fs::write(path, page).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            Ok(path.display().to_string())
        }
        None => {
            let run_dir = RunDir::open(&config.run_dir)?;
            let at = run_dir.file(REPORT_FILE)?;
            run_dir.put(&at, page.into_bytes()).await?;
            Ok(at.display())
        }
    }
}

/// The report page of `config`'s run.
pub async fn render(config: &Config) -> Result<String> {
    let ctx = catalog::session(config).await?;
    let tables: BTreeSet<String> = rows(
        &ctx,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .await?
    .iter()
    .map(|r| text(r, "table_name"))
    .collect();
    let graph = StageGraph::new(&Arc::new(config.clone()))?;
    let run_dir = RunDir::open(&config.run_dir)?;
    let manifest = match pack::load_manifest(&run_dir).await? {
        ManifestState::Committed(m) => Some(*m),
        _ => None,
    };
    let mut sections = vec![data::flow(&ctx, &graph, manifest.as_ref(), tables.contains("tokens")).await?];
    if tables.contains("scores") {
        sections.push(data::scores(&ctx, tables.contains("llm_scores")).await?);
    }
    if tables.contains("synthetic") {
        sections.push(data::synthetic(&ctx).await?);
    }
    sections.push(data::tagging(&ctx, config, tables.contains("tokens")).await?);
    if let Some(m) = &manifest {
        sections.push(data::mixture(m));
    }
    sections.push(run::performance(&ctx, &graph, tables.contains("tokens")).await?);
    sections.push(run::quarantine(&ctx).await?);
    sections.push(run::examples(&ctx).await?);
    if let Some(t) = &config.train {
        sections.push(run::training(Path::new(&t.checkpoint_dir))?);
    }
    sections.push(run::evaluation(&ctx).await?);
    let subtitle = format!(
        "{} · run directory {} · written {}",
        config.path.display(),
        shown(&run_dir),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC")
    );
    Ok(html::page("safepipe run report", &subtitle, &sections))
}

/// The run directory as a reader knows it: relative to the working directory when under it.
fn shown(run_dir: &RunDir) -> String {
    let full = run_dir.display();
    match std::env::current_dir() {
        Ok(cwd) if run_dir.is_local() => Path::new(&full)
            .strip_prefix(&cwd)
            .map(|p| p.display().to_string())
            .unwrap_or(full),
        _ => full,
    }
}
