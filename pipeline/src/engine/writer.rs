//! Writes one output table of one unit as a zstd Parquet file, streaming (multipart upload on
//! object stores), created on the first non-empty batch. The file appears atomically when
//! [`TableWriter::finish`] completes: object stores publish a multipart upload only on
//! completion, and the local store writes a staging file and renames it. The runner writes into
//! an attempt folder and publishes the finished file under its committed name
//! ([`crate::engine::run_dir::RunDir::publish`]).

use crate::engine::storage::Location;
use crate::error::{Error, Result};
use arrow::array::RecordBatch;
use arrow::compute::cast;
use arrow::datatypes::SchemaRef;
use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

/// Rows per Parquet row group of stage outputs.
const ROW_GROUP_ROWS: usize = 16 * 1024;
/// ... and at most this many bytes, so long texts keep writer memory bounded.
const ROW_GROUP_BYTES: usize = 128 << 20;

pub struct TableWriter {
    location: Location,
    schema: SchemaRef,
    writer: Option<AsyncArrowWriter<BufWriter>>,
    rows: u64,
}

impl TableWriter {
    pub fn new(location: Location, schema: SchemaRef) -> Self {
        TableWriter {
            location,
            schema,
            writer: None,
            rows: 0,
        }
    }

    pub async fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let batch = conform(batch, &self.schema)?;
        if self.writer.is_none() {
            let props = WriterProperties::builder()
                .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid level")))
                .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                .set_max_row_group_bytes(Some(ROW_GROUP_BYTES))
                .build();
            let sink = BufWriter::new(self.location.store.clone(), self.location.path.clone());
            self.writer = Some(AsyncArrowWriter::try_new(sink, self.schema.clone(), Some(props))?);
        }
        let writer = self.writer.as_mut().expect("created above");
        writer.write(&batch).await?;
        self.rows += batch.num_rows() as u64;
        Ok(())
    }

    /// Gives up the file: an object store's multipart upload, if one was started, is aborted
    /// (best effort: a bucket lifecycle rule catches what a killed process leaves).
    pub async fn abort(self) {
        if let Some(writer) = self.writer {
            let mut sink = writer.into_inner();
            if let Err(e) = sink.abort().await {
                tracing::warn!(file = %self.location.display(), error = %e, "could not abort an upload");
            }
        }
    }

    /// Finishes the file; `None` when no row was written (no file is created).
    pub async fn finish(self) -> Result<Option<WrittenFile>> {
        let Some(writer) = self.writer else { return Ok(None) };
        writer.close().await?;
        let bytes = self.location.store.head(&self.location.path).await?.size;
        Ok(Some(WrittenFile {
            location: self.location,
            rows: self.rows,
            bytes,
        }))
    }
}

/// A finished Parquet file.
pub struct WrittenFile {
    pub location: Location,
    pub rows: u64,
    pub bytes: u64,
}

/// Casts a batch to the table's declared schema (e.g. DataFusion's `Utf8View` to `Utf8`), so
/// every file of a table has the same schema whatever produced it.
pub fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    if batch.num_columns() != schema.fields().len() {
        return Err(Error::Internal(format!(
            "a batch with columns {:?} does not fit the table schema {:?}",
            batch.schema().fields().iter().map(|f| f.name()).collect::<Vec<_>>(),
            schema.fields().iter().map(|f| f.name()).collect::<Vec<_>>()
        )));
    }
    let columns = batch
        .columns()
        .iter()
        .zip(schema.fields())
        .map(|(column, field)| cast(column, field.data_type()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}
