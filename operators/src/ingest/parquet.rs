//! Parquet reading: one row group per unit, columns mapped by name onto `documents`.

use super::sink::{Metadata, Reason, Sink, check_text};
use super::{IngestBatch, IngestInput, IngestOptions};
use crate::parquet_io::{ObjectReader, storage_failure};
use crate::schema::METADATA_FIELDS;
use crate::{OpError, OpResult};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{CastOptions, can_cast_types, cast, cast_with_options};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use parquet::arrow::ParquetRecordBatchStreamBuilder;
use parquet::arrow::async_reader::ParquetRecordBatchStream;
use parquet::errors::ParquetError;
use std::sync::Arc;

/// A Parquet error that came from the object store is a storage failure (retryable); any other
/// is a problem with the file's bytes.
fn split_error(e: ParquetError) -> Result<OpError, ParquetError> {
    storage_failure(e).map(OpError::Storage)
}

/// Where each output column comes from in the file.
struct Columns {
    text: usize,
    id: Option<usize>,
    /// For each metadata field but `extra`, the file's column (already castable to its type).
    metadata: Vec<Option<usize>>,
    /// Every other column, carried as JSON in `metadata.extra`.
    others: Vec<usize>,
}

fn is_string(ty: &DataType) -> bool {
    matches!(ty, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

fn map_columns(schema: &SchemaRef, opts: &IngestOptions) -> Result<Columns, String> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let text = match schema.index_of(&opts.text_column) {
        Ok(i) if is_string(schema.field(i).data_type()) => i,
        Ok(i) => {
            return Err(format!(
                "column '{}' is {}, not a string column",
                opts.text_column,
                schema.field(i).data_type()
            ));
        }
        Err(_) => {
            return Err(format!(
                "no column '{}' among {names:?}; if the text is in another column, set inputs.columns.text",
                opts.text_column
            ));
        }
    };
    let id = match schema.index_of(&opts.id_column) {
        Ok(i) if can_cast_types(schema.field(i).data_type(), &DataType::Utf8) => Some(i),
        Ok(i) => {
            return Err(format!(
                "column '{}' is {}, which cannot serve as an id",
                opts.id_column,
                schema.field(i).data_type()
            ));
        }
        Err(_) => None,
    };
    let metadata: Vec<Option<usize>> = opts
        .metadata_columns
        .iter()
        .zip(METADATA_FIELDS.iter())
        .map(|(column, (_, target))| {
            schema
                .index_of(column)
                .ok()
                .filter(|&i| can_cast_types(schema.field(i).data_type(), target))
        })
        .collect();
    let used: Vec<usize> = [Some(text), id]
        .into_iter()
        .chain(metadata.iter().copied())
        .flatten()
        .collect();
    let others = (0..names.len()).filter(|i| !used.contains(i)).collect();
    Ok(Columns {
        text,
        id,
        metadata,
        others,
    })
}

struct Reader {
    batches: ParquetRecordBatchStream<ObjectReader>,
    columns: Columns,
    opts: Arc<IngestOptions>,
    sink: Sink,
    /// Index in the file of the next row to read.
    next_row: u64,
    end_row: u64,
    done: bool,
}

pub(super) fn read_row_group(
    input: IngestInput,
    opts: Arc<IngestOptions>,
    row_group: usize,
    first_row: u64,
    rows: u64,
) -> BoxStream<'static, OpResult<IngestBatch>> {
    futures::stream::once(open(input, opts, row_group, first_row, rows))
        .try_flatten()
        .boxed()
}

async fn open(
    input: IngestInput,
    opts: Arc<IngestOptions>,
    row_group: usize,
    first_row: u64,
    rows: u64,
) -> OpResult<BoxStream<'static, OpResult<IngestBatch>>> {
    let sink = Sink::new(&input, &opts);
    let whole_unit = |mut sink: Sink, reason: Reason, detail: String| {
        sink.quarantine_unit(reason, &format!("row group {row_group}: {detail}"), rows);
        Ok(futures::stream::iter([Ok(sink.flush())]).boxed())
    };
    let reader = ObjectReader::new(input.store.clone(), input.path.clone(), input.size);
    let builder = match ParquetRecordBatchStreamBuilder::new(reader).await {
        Ok(builder) => builder,
        Err(e) => match split_error(e) {
            Ok(storage) => return Err(storage),
            Err(e) => return whole_unit(sink, Reason::UnreadableFile, e.to_string()),
        },
    };
    let columns = match map_columns(builder.schema(), &opts) {
        Ok(columns) => columns,
        Err(detail) => return whole_unit(sink, Reason::SchemaMismatch, detail),
    };
    let batches = match builder
        .with_row_groups(vec![row_group])
        .with_batch_size(opts.batch_rows.max(1))
        .build()
    {
        Ok(batches) => batches,
        Err(e) => match split_error(e) {
            Ok(storage) => return Err(storage),
            Err(e) => return whole_unit(sink, Reason::UnreadableRowGroup, e.to_string()),
        },
    };
    let reader = Reader {
        batches,
        columns,
        opts,
        sink,
        next_row: first_row,
        end_row: first_row + rows,
        done: false,
    };
    Ok(futures::stream::try_unfold(reader, Reader::next_batch).boxed())
}

impl Reader {
    async fn next_batch(mut self) -> OpResult<Option<(IngestBatch, Reader)>> {
        if self.done {
            return Ok(None);
        }
        match self.batches.next().await {
            None => return Ok(None),
            Some(Ok(batch)) => self.convert(&batch)?,
            Some(Err(e)) => {
                let e = match split_error(e) {
                    Ok(storage) => return Err(storage),
                    Err(e) => e,
                };
                let lost = self.end_row - self.next_row;
                let detail = format!("rows {}..{} could not be decoded: {e}", self.next_row, self.end_row);
                self.sink
                    .quarantine_rest(self.next_row, lost, Reason::UnreadableRowGroup, &detail);
                self.done = true;
            }
        }
        Ok(Some((self.sink.flush(), self)))
    }

    fn convert(&mut self, batch: &RecordBatch) -> OpResult<()> {
        let cols = &self.columns;
        let text = cast(batch.column(cols.text), &DataType::Utf8)?;
        let text = text.as_string::<i32>();
        let id = cols.id.map(|i| cast(batch.column(i), &DataType::Utf8)).transpose()?;
        let id = id.as_ref().map(|a| a.as_string::<i32>());
        let safe = CastOptions {
            safe: true,
            ..Default::default()
        };
        let meta: Vec<Option<ArrayRef>> = cols
            .metadata
            .iter()
            .zip(METADATA_FIELDS.iter())
            .map(|(col, (_, target))| {
                col.map(|i| cast_with_options(batch.column(i), target, &safe))
                    .transpose()
            })
            .collect::<Result<_, _>>()?;
        let extra = self.extra_json(batch)?;
        for row in 0..batch.num_rows() {
            let offset = self.next_row + row as u64;
            let id = id
                .filter(|a| a.is_valid(row) && !a.value(row).is_empty())
                .map(|a| a.value(row));
            if text.is_null(row) {
                let detail = format!("column '{}' is null", self.opts.text_column);
                self.sink.quarantine(offset, Reason::MissingText, &detail, id, None);
                continue;
            }
            let value = text.value(row);
            if let Err((reason, detail)) = check_text(value, self.opts.max_text_bytes) {
                self.sink
                    .quarantine(offset, reason, &detail, id, Some(value.as_bytes()));
                continue;
            }
            let mut m = Metadata::default();
            for (slot, column) in m.strings.iter_mut().zip(&meta) {
                *slot = column
                    .as_ref()
                    .map(|c| c.as_string::<i32>())
                    .filter(|c| c.is_valid(row))
                    .map(|c| c.value(row).to_string());
            }
            m.language_score = meta[5]
                .as_ref()
                .map(|c| c.as_primitive::<Float64Type>())
                .filter(|c| c.is_valid(row))
                .map(|c| c.value(row));
            m.token_count = meta[6]
                .as_ref()
                .map(|c| c.as_primitive::<Int64Type>())
                .filter(|c| c.is_valid(row))
                .map(|c| c.value(row));
            m.extra = extra.as_ref().and_then(|rows| rows[row].clone());
            self.sink.accept(id.map(str::to_string), value, m);
        }
        self.next_row += batch.num_rows() as u64;
        Ok(())
    }

    /// The unmapped columns of each row as a JSON object (None when all of them are null).
    fn extra_json(&self, batch: &RecordBatch) -> OpResult<Option<Vec<Option<String>>>> {
        if self.columns.others.is_empty() {
            return Ok(None);
        }
        let projected = batch.project(&self.columns.others)?;
        let mut buf = Vec::new();
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut buf);
        writer.write(&projected)?;
        writer.finish()?;
        let text =
            String::from_utf8(buf).map_err(|e| OpError::Arrow(arrow::error::ArrowError::ExternalError(Box::new(e))))?;
        let rows = text
            .lines()
            .map(|line| (line != "{}").then(|| line.to_string()))
            .collect::<Vec<_>>();
        Ok(Some(rows))
    }
}
