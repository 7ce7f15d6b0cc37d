//! `safepipe sql` and `safepipe shell`: read-only SQL over the run's tables.

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

/// Runs one read-only query and returns its rows.
pub async fn execute(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>> {
    check_read_only(sql)?;
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql, options)
        .await
        .map_err(|e| Error::Query(e.to_string()))?;
    let schema = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(|e| Error::Query(e.to_string()))?;
    if batches.is_empty() {
        // Keep the column names visible (table header, CSV header) when no row matched.
        return Ok(vec![RecordBatch::new_empty(schema)]);
    }
    Ok(batches)
}

pub fn render(batches: &[RecordBatch], format: Format, out: &mut dyn Write) -> Result<()> {
    let io = |e: std::io::Error| Error::Internal(format!("writing output: {e}"));
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(batches)?;
            writeln!(out, "{table}").map_err(io)?;
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new().with_header(true).build(out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(&mut *out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            writeln!(out).map_err(io)?;
        }
        Format::Jsonl => {
            let mut writer = arrow::json::LineDelimitedWriter::new(out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(())
}

/// `safepipe sql CONFIG QUERY`.
pub async fn sql(config: &Config, query: &str, format: Format) -> Result<()> {
    let ctx = catalog::session(config).await?;
    let batches = execute(&ctx, query).await?;
    render(&batches, format, &mut std::io::stdout().lock())
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
        match execute(&ctx, statement.trim()).await {
            Ok(batches) => render(&batches, Format::Table, &mut std::io::stdout().lock())?,
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(())
}
