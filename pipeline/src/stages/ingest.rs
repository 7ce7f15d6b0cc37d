//! Adapter of the ingest operator: unit -> `documents` + `quarantine`.

use super::{OutputTable, Stage, StageBatch, UnitInput, UnitStage, Upstream};
use crate::config::Config;
use crate::config::{resolve, valid_name};
use crate::engine::plan::WorkUnit;
use crate::engine::run_dir::RunDir;
use crate::error::{Error, Result};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use safepipe_operators::holdout::{Holdout, Part};
use safepipe_operators::ingest::{ExtraColumns, IngestOptions};
use safepipe_operators::ingest::{IngestInput, ingest};
use safepipe_operators::schema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

pub struct IngestStage {
    config: Arc<Config>,
}

impl IngestStage {
    pub fn new(config: Arc<Config>) -> Self {
        IngestStage { config }
    }
}

impl Stage for IngestStage {
    fn name(&self) -> &'static str {
        "ingest"
    }

    fn reads(&self) -> &'static [Upstream] {
        &[]
    }

    fn outputs(&self) -> Vec<OutputTable> {
        vec![
            OutputTable {
                name: "documents",
                schema: schema::DOCUMENTS.clone(),
            },
            OutputTable {
                name: "quarantine",
                schema: schema::QUARANTINE.clone(),
            },
        ]
    }

    fn settings(&self) -> Result<serde_json::Value> {
        let per_input: Vec<_> = self
            .config
            .inputs
            .iter()
            .map(|i| self.config.ingest.options(i))
            .collect();
        Ok(serde_json::to_value(per_input).expect("serialisable"))
    }
}

impl UnitStage for IngestStage {
    fn run(&self, input: UnitInput) -> BoxStream<'static, Result<StageBatch>> {
        let config = self.config.clone();
        futures::stream::once(async move {
            let unit = input.unit;
            let source = config.input(&unit.input).ok_or_else(|| {
                Error::Config(format!(
                    "the plan names input '{}', which the config no longer has",
                    unit.input
                ))
            })?;
            let options = Arc::new(config.ingest.options(source));
            let batches = ingest(unit_input(&input.run_dir, &unit)?, options).map_ok(|b| StageBatch {
                tables: vec![("documents", b.documents), ("quarantine", b.quarantine)],
                counts: b.counts,
            });
            Ok::<_, Error>(batches.map_err(Error::from))
        })
        .try_flatten()
        .boxed()
    }
}

/// The ingest operator's input for a planned unit: its slice of its file, in the store the file
/// lives in (the ingest stage's, and `safepipe eval`'s reading of the evaluation part).
pub fn unit_input(run_dir: &RunDir, unit: &WorkUnit) -> Result<IngestInput> {
    let location = run_dir.stores().resolve(&unit.file)?;
    Ok(IngestInput {
        store: location.store,
        path: location.path,
        file: unit.file.clone(),
        size: unit.size,
        unit: unit.id,
        slice: unit.slice.clone(),
    })
}

// ---- `[[inputs]]` and `[ingest]`: the config sections of this stage.

/// One named input: files in one format and schema. The name becomes `documents.source`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    pub name: String,
    /// Paths or URLs (`file://`, `s3://`, `gs://`, `az://`); globs (`*`, `?`, `[..]`) and
    /// directories are expanded. Relative paths are relative to the config file.
    pub paths: Vec<String>,
    #[serde(default)]
    pub format: InputFormat,
    #[serde(default)]
    pub columns: ColumnConfig,
    /// A seeded share of the documents (by a seeded hash of the text) kept out of the run for
    /// `safepipe eval`.
    #[serde(default)]
    pub holdout: Option<Holdout>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    /// From the extension: `.parquet`; `.jsonl`/`.json`/`.ndjson`, optionally `.gz`/`.zst`.
    #[default]
    Auto,
    Parquet,
    Jsonl,
}

/// Input column (or JSON field) names; the defaults are FineWeb's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ColumnConfig {
    pub text: String,
    pub id: String,
    pub dump: String,
    pub url: String,
    pub date: String,
    pub file_path: String,
    pub language: String,
    pub language_score: String,
    pub token_count: String,
}

impl Default for ColumnConfig {
    fn default() -> Self {
        let s = |x: &str| x.to_string();
        ColumnConfig {
            text: s("text"),
            id: s("id"),
            dump: s("dump"),
            url: s("url"),
            date: s("date"),
            file_path: s("file_path"),
            language: s("language"),
            language_score: s("language_score"),
            token_count: s("token_count"),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Texts longer than this many bytes are quarantined (`text_too_long`).
    pub max_text_bytes: usize,
    /// Rows per record batch.
    pub batch_rows: usize,
    /// A metadata field (or all unmapped fields together) longer than this many bytes is
    /// dropped from its record and named in `extra.dropped_metadata`.
    pub max_metadata_bytes: usize,
    /// Unmapped input fields: `keep` (as JSON in `metadata.extra`) or `skip` (not read).
    pub extra_columns: ExtraColumns,
    /// Parquet: decoded bytes per batch; a page inflating past it quarantines its row group.
    pub max_batch_bytes: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_text_bytes: 4 << 20,
            batch_rows: 4096,
            max_metadata_bytes: 64 << 10,
            extra_columns: ExtraColumns::Keep,
            max_batch_bytes: 128 << 20,
        }
    }
}

impl IngestConfig {
    /// Checks the values serde cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.max_text_bytes == 0 {
            return Err("ingest.max_text_bytes must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.batch_rows) {
            return Err(format!(
                "ingest.batch_rows = {} must be between 1 and 1000000",
                self.batch_rows
            ));
        }
        if self.max_metadata_bytes == 0 {
            return Err("ingest.max_metadata_bytes must be at least 1".into());
        }
        if self.max_batch_bytes < self.max_text_bytes {
            return Err(format!(
                "ingest.max_batch_bytes = {} is below ingest.max_text_bytes = {}: a page holding one \
                 allowed text could not be read",
                self.max_batch_bytes, self.max_text_bytes
            ));
        }
        Ok(())
    }

    /// How ingest reads records of `input`.
    pub fn options(&self, input: &InputConfig) -> IngestOptions {
        let c = &input.columns;
        IngestOptions {
            source: input.name.clone(),
            text_column: c.text.clone(),
            id_column: c.id.clone(),
            metadata_columns: [
                &c.dump,
                &c.url,
                &c.date,
                &c.file_path,
                &c.language,
                &c.language_score,
                &c.token_count,
            ]
            .map(String::clone)
            .to_vec(),
            max_text_bytes: self.max_text_bytes,
            batch_rows: self.batch_rows,
            max_metadata_bytes: self.max_metadata_bytes,
            extra_columns: self.extra_columns,
            max_batch_bytes: self.max_batch_bytes,
            holdout: input.holdout.map(|h| (h, Part::Training)),
        }
    }
}

/// Checks `[[inputs]]` (unique valid names, some paths) and resolves their paths against the
/// config's folder `dir`.
pub fn check_inputs(raw: Vec<InputConfig>, dir: &Path) -> std::result::Result<Vec<InputConfig>, String> {
    if raw.is_empty() {
        return Err("no [[inputs]]; add at least one with a name and paths".into());
    }
    let mut names = BTreeSet::new();
    let mut inputs = Vec::new();
    for (i, input) in raw.into_iter().enumerate() {
        if !valid_name(&input.name) {
            return Err(format!(
                "inputs[{i}].name = {:?}: use letters, digits, '_', '-' or '.'",
                input.name
            ));
        }
        if !names.insert(input.name.clone()) {
            return Err(format!(
                "inputs[{i}].name = {:?} is used twice; names must be unique",
                input.name
            ));
        }
        if input.paths.is_empty() {
            return Err(format!("inputs[{i}].paths is empty; list files, directories or globs"));
        }
        if let Some(h) = &input.holdout {
            h.check().map_err(|e| format!("inputs[{i}].{e}"))?;
        }
        let paths = input.paths.iter().map(|p| resolve(dir, p)).collect();
        inputs.push(InputConfig { paths, ..input });
    }
    Ok(inputs)
}
