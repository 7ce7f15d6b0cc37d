//! Parquet reading: one row group per unit, columns mapped by name onto `documents`.

use super::sink::{Metadata, Reason, Sink, check_text};
use super::text_column::{TextColumn, TextValue, is_text_type};
use super::{ExtraColumns, IngestBatch, IngestInput, IngestOptions};
use crate::parquet_headers::scan_pages;
use crate::parquet_io::{ObjectReader, storage_failure};
use crate::schema::METADATA_FIELDS;
use crate::{OpError, OpResult};
use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::{CastOptions, can_cast_types, cast, cast_with_options};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use parquet::arrow::arrow_reader::ArrowReaderMetadata;
use parquet::arrow::async_reader::{AsyncFileReader, ParquetRecordBatchStream};
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::errors::ParquetError;
use parquet::file::metadata::RowGroupMetaData;
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

fn map_columns(schema: &SchemaRef, opts: &IngestOptions) -> Result<Columns, String> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let text = match schema.index_of(&opts.text_column) {
        Ok(i) if is_text_type(schema.field(i).data_type()) => i,
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
        Ok(i)
            if is_text_type(schema.field(i).data_type())
                || can_cast_types(schema.field(i).data_type(), &DataType::Utf8) =>
        {
            Some(i)
        }
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
    let others = match opts.extra_columns {
        ExtraColumns::Keep => (0..names.len()).filter(|i| !used.contains(i)).collect(),
        ExtraColumns::Skip => Vec::new(),
    };
    Ok(Columns {
        text,
        id,
        metadata,
        others,
    })
}

impl Columns {
    /// The file's top-level columns this read needs, in file order.
    fn read(&self) -> Vec<usize> {
        let mut read: Vec<usize> = [Some(self.text), self.id]
            .into_iter()
            .chain(self.metadata.iter().copied())
            .flatten()
            .chain(self.others.iter().copied())
            .collect();
        read.sort_unstable();
        read.dedup();
        read
    }

    /// The same columns, numbered as in a batch that holds only `read` (file order).
    fn projected(&self, read: &[usize]) -> Columns {
        let at = |i: usize| read.binary_search(&i).unwrap_or(0);
        Columns {
            text: at(self.text),
            id: self.id.map(at),
            metadata: self.metadata.iter().map(|m| m.map(at)).collect(),
            others: self.others.iter().map(|&i| at(i)).collect(),
        }
    }
}

/// The column chunks one read fetches: byte ranges and column names, from the footer.
struct Chunks {
    ranges: Vec<std::ops::Range<u64>>,
    names: Vec<String>,
    /// Each chunk's uncompressed size as the footer states it.
    sizes: Vec<u64>,
}

/// The projected column chunks of a row group, or why the footer cannot be believed.
fn chunks(meta: &RowGroupMetaData, read: &[usize]) -> Result<Chunks, String> {
    let schema = meta.schema_descr();
    let mut chunks = Chunks {
        ranges: Vec::new(),
        names: Vec::new(),
        sizes: Vec::new(),
    };
    for (i, column) in meta.columns().iter().enumerate() {
        if !read.contains(&schema.get_column_root_idx(i)) {
            continue;
        }
        let name = column.column_path().string();
        let size = u64::try_from(column.uncompressed_size()).map_err(|_| {
            format!(
                "the footer claims {} bytes for column '{name}'",
                column.uncompressed_size()
            )
        })?;
        let (start, len) = column.byte_range();
        let end = start
            .checked_add(len)
            .ok_or_else(|| format!("the footer places column '{name}' past any file"))?;
        chunks.ranges.push(start..end);
        chunks.names.push(name);
        chunks.sizes.push(size);
    }
    Ok(chunks)
}

/// Rows per batch that keep one decoded batch within `max_batch_bytes`, from the page headers of
/// the fetched chunks; a page that would inflate past the bound refuses the row group.
///
/// A row of a plain column is counted at the chunk's average (its pages are bounded anyway);
/// a row of a dictionary-encoded column at the size of its dictionary, since every row may
/// repeat the largest entry.
fn rows_per_batch(
    chunks: &Chunks,
    fetched: &[bytes::Bytes],
    rows: u64,
    opts: &IngestOptions,
) -> Result<usize, (Reason, String)> {
    let max = opts.max_batch_bytes.max(1) as u64;
    let mut per_row = 1u64;
    for ((name, size), bytes) in chunks.names.iter().zip(&chunks.sizes).zip(fetched) {
        let pages = scan_pages(bytes).map_err(|e| (Reason::UnreadableRowGroup, format!("column '{name}': {e}")))?;
        if pages.largest > max {
            return Err((
                Reason::TooLarge,
                format!(
                    "column '{name}' has a page that inflates to {} bytes, over ingest.max_batch_bytes = {max}",
                    pages.largest
                ),
            ));
        }
        let average = size.max(&pages.total).div_ceil(rows.max(1));
        per_row = per_row.saturating_add(average.max(pages.dictionary));
    }
    Ok((max / per_row).clamp(1, opts.batch_rows.max(1) as u64) as usize)
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
    let mut reader = ObjectReader::new(input.store.clone(), input.path.clone(), input.size);
    let metadata = match ArrowReaderMetadata::load_async(&mut reader, Default::default()).await {
        Ok(metadata) => metadata,
        Err(e) => match split_error(e) {
            Ok(storage) => return Err(storage),
            Err(e) => return whole_unit(sink, Reason::UnreadableFile, e.to_string()),
        },
    };
    let columns = match map_columns(metadata.schema(), &opts) {
        Ok(columns) => columns,
        Err(detail) => return whole_unit(sink, Reason::SchemaMismatch, detail),
    };
    let Some(meta) = metadata.metadata().row_groups().get(row_group) else {
        let detail = format!("the file has {} row groups now", metadata.metadata().num_row_groups());
        return whole_unit(sink, Reason::UnreadableRowGroup, detail);
    };
    if meta.num_rows() < 0 {
        let detail = format!("the footer claims {} rows", meta.num_rows());
        return whole_unit(sink, Reason::UnreadableRowGroup, detail);
    }
    let read = columns.read();
    let chunks = match chunks(meta, &read) {
        Ok(chunks) => chunks,
        Err(detail) => return whole_unit(sink, Reason::UnreadableRowGroup, detail),
    };
    // Fetched here (the decoder would fetch the same ranges) so the page headers are checked
    // before anything is inflated; the reader then serves these bytes to the decoder.
    let fetched = match reader.get_byte_ranges(chunks.ranges.clone()).await {
        Ok(fetched) => fetched,
        Err(e) => match split_error(e) {
            Ok(storage) => return Err(storage),
            Err(e) => return whole_unit(sink, Reason::UnreadableRowGroup, e.to_string()),
        },
    };
    let batch_rows = match rows_per_batch(&chunks, &fetched, meta.num_rows() as u64, &opts) {
        Ok(batch_rows) => batch_rows,
        Err((reason, detail)) => return whole_unit(sink, reason, detail),
    };
    let projection = ProjectionMask::roots(metadata.parquet_schema(), read.iter().copied());
    let columns = columns.projected(&read);
    let reader = reader.with_prefetched(chunks.ranges, fetched);
    let builder = ParquetRecordBatchStreamBuilder::new_with_metadata(reader, metadata);
    let batches = match builder
        .with_row_groups(vec![row_group])
        .with_projection(projection)
        .with_batch_size(batch_rows)
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
        end_row: first_row.saturating_add(rows),
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
                // Saturating: a file rewritten since planning can hold more rows than planned.
                let lost = self.end_row.saturating_sub(self.next_row);
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
        let text = TextColumn::new(batch.column(cols.text))?;
        let id = match cols.id.map(|i| batch.column(i)) {
            Some(c) if is_text_type(c.data_type()) => Some(TextColumn::new(c)?),
            Some(c) => Some(TextColumn::new(&cast(c, &DataType::Utf8)?)?),
            None => None,
        };
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
            let id = match id.as_ref().map(|c| c.get(row)) {
                Some(TextValue::Text(id)) if !id.is_empty() => Some(id),
                Some(TextValue::NotUtf8(raw, e)) => {
                    let detail = format!("column '{}' is not UTF-8: {e}", self.opts.id_column);
                    self.sink
                        .quarantine(offset, Reason::InvalidId, &detail, None, Some(raw));
                    continue;
                }
                _ => None,
            };
            let value = match text.get(row) {
                TextValue::Text(value) => value,
                TextValue::Null => {
                    let detail = format!("column '{}' is null", self.opts.text_column);
                    self.sink.quarantine(offset, Reason::MissingText, &detail, id, None);
                    continue;
                }
                TextValue::NotUtf8(raw, e) => {
                    let detail = format!("column '{}' holds bytes that are not UTF-8: {e}", self.opts.text_column);
                    self.sink
                        .quarantine(offset, Reason::InvalidUtf8, &detail, id, Some(raw));
                    continue;
                }
            };
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
            // cannot fail: one entry per mapped metadata column, always 7 (stages/ingest.rs).
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
            if let Some(range) = extra.as_ref().and_then(|(_, rows)| rows.get(row)) {
                // Only rows within the bound are copied out; the sink names the others.
                match range.len() {
                    2 => {} // "{}": every unmapped column is null
                    n if n > self.opts.max_metadata_bytes => m.dropped_extra = n,
                    // cannot fail: the range was cut from this text at line ends.
                    _ => m.extra = extra.as_ref().map(|(text, _)| text[range.clone()].to_string()),
                }
            }
            self.sink.accept(id.map(str::to_string), value, m);
        }
        self.next_row += batch.num_rows() as u64;
        Ok(())
    }

    /// The unmapped columns of the batch as JSON Lines, one object per row (`{}` when all of
    /// them are null), with each row's byte range: rows are cut from the one buffer as needed.
    fn extra_json(&self, batch: &RecordBatch) -> OpResult<Option<(String, Vec<std::ops::Range<usize>>)>> {
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
        let mut rows = Vec::with_capacity(batch.num_rows());
        let mut start = 0;
        for line in text.split_inclusive('\n') {
            let body = line.trim_end_matches('\n');
            rows.push(start..start + body.len());
            start += line.len();
        }
        Ok(Some((text, rows)))
    }
}
