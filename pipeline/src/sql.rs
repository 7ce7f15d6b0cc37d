//! `safepipe sql` and `safepipe shell`: read-only SQL over the run's tables, within limits
//! (`[sql]`, or `--memory-limit-mb` / `--timeout`): a memory pool that sorts, joins and
//! aggregations spill from, a statement timeout, results streamed to stdout as they come (CSV,
//! JSON, JSON Lines), and text shown in tables with control characters escaped, so a document
//! cannot drive the terminal.

use crate::catalog;
use crate::config::Config;
use crate::error::{Error, Result};
use arrow::array::RecordBatch;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;

/// `[sql]`: the limits of `safepipe sql`, `shell` and `report` queries.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    /// Memory the operators of one query may hold, in MiB (sorts, joins and aggregations spill
    /// to disk beyond it; what cannot spill fails with a clear error); 0 = no limit.
    pub memory_limit_mb: u64,
    /// A statement running longer than this many seconds is stopped; 0 = no limit.
    pub timeout_seconds: u64,
    /// Where spill files go (default: the system temp directory).
    pub spill_dir: Option<String>,
}

impl Default for SqlConfig {
    fn default() -> Self {
        SqlConfig {
            memory_limit_mb: 4096,
            timeout_seconds: 3600,
            spill_dir: None,
        }
    }
}

impl SqlConfig {
    fn timeout(&self) -> Option<std::time::Duration> {
        (self.timeout_seconds > 0).then(|| std::time::Duration::from_secs(self.timeout_seconds))
    }

    /// A query error, with the fix when the memory limit was hit.
    fn query_error(&self, e: impl std::fmt::Display) -> Error {
        let text = e.to_string();
        if text.contains("Resources exhausted") {
            Error::Query(format!(
                "{text}\nthe query needs more than the {} MiB memory limit: raise --memory-limit-mb (or [sql] memory_limit_mb), \
                 or narrow the query",
                self.memory_limit_mb
            ))
        } else {
            Error::Query(text)
        }
    }

    fn timed_out(&self) -> Error {
        Error::Query(format!(
            "the statement ran past the {} s timeout and was stopped: raise --timeout (or [sql] timeout_seconds), or narrow the query",
            self.timeout_seconds
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// One JSON array of row objects.
    Json,
    /// One JSON object per line.
    Jsonl,
}

/// Refuses anything but queries, with a message that says why and what is allowed.
pub fn check_read_only(sql: &str) -> Result<()> {
    let statements = DFParser::parse_sql(sql).map_err(|e| Error::Query(e.to_string()))?;
    if statements.len() != 1 {
        return Err(Error::Query(format!(
            "give exactly one statement (got {})",
            statements.len()
        )));
    }
    let refused = match &statements[0] {
        Statement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_)
            | SqlStatement::Explain { .. }
            | SqlStatement::ExplainTable { .. }
            | SqlStatement::ShowTables { .. }
            | SqlStatement::ShowColumns { .. } => None,
            other => Some(
                other
                    .to_string()
                    .split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
            ),
        },
        Statement::Explain(_) => None,
        Statement::CreateExternalTable(_) => Some("CREATE EXTERNAL TABLE".to_string()),
        Statement::CopyTo(_) => Some("COPY".to_string()),
        other => Some(
            format!("{other}")
                .split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" "),
        ),
    };
    match refused {
        None => Ok(()),
        Some(kind) => Err(Error::Query(format!(
            "safepipe sql is read-only: `{kind} ...` is not allowed. It runs SELECT (and EXPLAIN, SHOW TABLES, DESCRIBE) \
             over the run's committed tables; stage outputs change only through `safepipe run`"
        ))),
    }
}

/// Plans one read-only query.
async fn plan(ctx: &SessionContext, sql: &str, limits: &SqlConfig) -> Result<datafusion::dataframe::DataFrame> {
    check_read_only(sql)?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    ctx.sql_with_options(sql, options)
        .await
        .map_err(|e| limits.query_error(e))
}

/// Runs one read-only query within `limits` and returns its rows.
pub async fn execute(ctx: &SessionContext, sql: &str, limits: &SqlConfig) -> Result<Vec<RecordBatch>> {
    let df = plan(ctx, sql, limits).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let collect = df.collect();
    let batches = match limits.timeout() {
        Some(t) => tokio::time::timeout(t, collect).await.map_err(|_| limits.timed_out())?,
        None => collect.await,
    }
    .map_err(|e| limits.query_error(e))?;
    if batches.is_empty() {
        // Keep the column names visible (table header, CSV header) when no row matched.
        return Ok(vec![RecordBatch::new_empty(schema)]);
    }
    Ok(batches)
}

/// Text columns (also inside structs) with control characters escaped (`\n`, `\t`,
/// `\u{1b}`), for showing rows on a terminal.
/// A list column with `escape` applied to its values (offsets and nulls kept).
fn list<O: arrow::array::OffsetSizeTrait>(
    array: &arrow::array::ArrayRef,
    field: &arrow::datatypes::FieldRef,
    escape: fn(&arrow::array::ArrayRef) -> Result<arrow::array::ArrayRef>,
) -> Result<arrow::array::ArrayRef> {
    use arrow::array::{Array, AsArray};
    let list = array.as_list::<O>();
    let values = escape(list.values())?;
    let field = Arc::new(field.as_ref().clone().with_data_type(values.data_type().clone()));
    Ok(Arc::new(arrow::array::GenericListArray::<O>::try_new(
        field,
        list.offsets().clone(),
        values,
        list.nulls().cloned(),
    )?))
}

pub fn escape_controls(batch: &RecordBatch) -> Result<RecordBatch> {
    fn column(array: &arrow::array::ArrayRef) -> Result<arrow::array::ArrayRef> {
        use arrow::array::{Array, AsArray, StringArray, StructArray};
        use arrow::datatypes::DataType;
        Ok(match array.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                let text = arrow::compute::cast(array, &DataType::Utf8)?;
                let text = text.as_string::<i32>();
                let escaped: StringArray = text
                    .iter()
                    .map(|v| {
                        v.map(|v| {
                            if v.chars().any(char::is_control) {
                                v.chars()
                                    .map(|c| {
                                        if c.is_control() {
                                            c.escape_default().to_string()
                                        } else {
                                            c.to_string()
                                        }
                                    })
                                    .collect::<String>()
                            } else {
                                v.to_string()
                            }
                        })
                    })
                    .collect();
                Arc::new(escaped)
            }
            DataType::Struct(fields) => {
                let parts = array.as_struct();
                let children = parts.columns().iter().map(column).collect::<Result<Vec<_>>>()?;
                let fields: Vec<_> = fields
                    .iter()
                    .zip(&children)
                    .map(|(f, c)| Arc::new(f.as_ref().clone().with_data_type(c.data_type().clone())))
                    .collect();
                Arc::new(StructArray::try_new(fields.into(), children, parts.nulls().cloned())?)
            }
            // Text inside lists and maps reaches the terminal too.
            DataType::List(field) => list::<i32>(array, field, column)?,
            DataType::LargeList(field) => list::<i64>(array, field, column)?,
            DataType::Map(field, ordered) => {
                let map = array.as_map();
                let entries = column(&(Arc::new(map.entries().clone()) as arrow::array::ArrayRef))?;
                let field = Arc::new(field.as_ref().clone().with_data_type(entries.data_type().clone()));
                Arc::new(arrow::array::MapArray::try_new(
                    field,
                    map.offsets().clone(),
                    entries.as_struct().clone(),
                    map.nulls().cloned(),
                    *ordered,
                )?)
            }
            DataType::Dictionary(_, values) if matches!(**values, DataType::Utf8 | DataType::LargeUtf8) => {
                column(&arrow::compute::cast(array, values)?)?
            }
            _ => array.clone(),
        })
    }
    let columns = batch.columns().iter().map(column).collect::<Result<Vec<_>>>()?;
    let fields: Vec<_> = batch
        .schema()
        .fields()
        .iter()
        .zip(&columns)
        .map(|(f, c)| f.as_ref().clone().with_data_type(c.data_type().clone()))
        .collect();
    Ok(RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(fields)),
        columns,
    )?)
}

/// Writes rows as an aligned table, control characters in text escaped (the other formats are
/// streamed by [`StreamWriter`]).
pub fn render_table(batches: &[RecordBatch], out: &mut dyn Write) -> Result<()> {
    let shown = batches.iter().map(escape_controls).collect::<Result<Vec<_>>>()?;
    let table = arrow::util::pretty::pretty_format_batches(&shown)?;
    writeln!(out, "{table}").map_err(|e| Error::Internal(format!("writing output: {e}")))
}

/// `safepipe sql CONFIG QUERY`: a table is collected (to align its columns); CSV, JSON and
/// JSON Lines are written batch by batch as the query produces them.
pub async fn sql(config: &Config, query: &str, format: Format) -> Result<()> {
    let limits = &config.sql;
    let ctx = catalog::session(config).await?;
    if format == Format::Table {
        let batches = execute(&ctx, query, limits).await?;
        return render_table(&batches, &mut std::io::stdout().lock());
    }
    let df = plan(&ctx, query, limits).await?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let streamed = async {
        use futures::StreamExt;
        let mut stream = df.execute_stream().await.map_err(|e| limits.query_error(e))?;
        let mut out = std::io::stdout().lock();
        let mut writer = StreamWriter::new(format, &mut out);
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| limits.query_error(e))?;
            rows += batch.num_rows();
            writer.write(&batch)?;
        }
        if rows == 0 {
            // Keep the CSV header when no row matched.
            writer.write(&RecordBatch::new_empty(schema))?;
        }
        writer.finish()
    };
    match limits.timeout() {
        Some(t) => tokio::time::timeout(t, streamed)
            .await
            .map_err(|_| limits.timed_out())?,
        None => streamed.await,
    }
}

/// CSV, JSON or JSON Lines written a batch at a time.
enum StreamWriter<'a> {
    Csv(Box<arrow::csv::Writer<&'a mut dyn Write>>),
    Json(arrow::json::ArrayWriter<&'a mut dyn Write>),
    Jsonl(arrow::json::LineDelimitedWriter<&'a mut dyn Write>),
}

impl<'a> StreamWriter<'a> {
    fn new(format: Format, out: &'a mut dyn Write) -> StreamWriter<'a> {
        match format {
            Format::Csv => StreamWriter::Csv(Box::new(arrow::csv::WriterBuilder::new().with_header(true).build(out))),
            Format::Json => StreamWriter::Json(arrow::json::ArrayWriter::new(out)),
            Format::Jsonl | Format::Table => StreamWriter::Jsonl(arrow::json::LineDelimitedWriter::new(out)),
        }
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        match self {
            StreamWriter::Csv(w) => w.write(batch)?,
            StreamWriter::Json(w) => w.write(batch)?,
            StreamWriter::Jsonl(w) => w.write(batch)?,
        }
        Ok(())
    }

    fn finish(self) -> Result<()> {
        match self {
            StreamWriter::Csv(_) => {}
            StreamWriter::Json(mut w) => {
                w.finish()?;
                let out = w.into_inner();
                writeln!(out).map_err(|e| Error::Internal(format!("writing output: {e}")))?;
            }
            StreamWriter::Jsonl(mut w) => w.finish()?,
        }
        Ok(())
    }
}

/// `safepipe shell CONFIG`: statements end with `;`; errors are printed and the shell goes on.
pub async fn shell(config: &Config) -> Result<()> {
    let ctx = catalog::session(config).await?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "safepipe SQL shell over {} (read-only). Tables: SHOW TABLES; quit with Ctrl-D.",
            config.run_dir
        );
    }
    let mut pending = String::new();
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("{}", if pending.is_empty() { "safepipe> " } else { "      ... " });
        }
        let mut line = String::new();
        if stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| Error::Internal(e.to_string()))?
            == 0
        {
            break;
        }
        pending.push_str(&line);
        if !line.trim_end().ends_with(';') {
            continue;
        }
        let statement = std::mem::take(&mut pending);
        match execute(&ctx, statement.trim(), &config.sql).await {
            Ok(batches) => render_table(&batches, &mut std::io::stdout().lock())?,
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}
