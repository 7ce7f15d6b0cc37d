//! Parquet reads from an object store: an `AsyncFileReader` over `object_store` with the file's
//! size known from the listing, so opening a file costs one ranged read for the footer.

use crate::parquet_headers::check_schema_depth;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, TryFutureExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::{AsyncFileReader, MetadataFetch};
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use std::ops::Range;
use std::sync::Arc;

/// Storage errors travel as `ParquetError::External(object_store::Error)`, so callers can tell
/// them (retryable) from bad bytes (quarantined).
fn storage(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

/// If `e` is a storage failure, returns it; otherwise gives the error back.
pub fn storage_failure(e: ParquetError) -> std::result::Result<object_store::Error, ParquetError> {
    match e {
        ParquetError::External(inner) if inner.is::<object_store::Error>() => {
            Ok(*inner.downcast::<object_store::Error>().expect("checked above"))
        }
        other => Err(other),
    }
}

/// Byte ranges fetched ahead of the decoder, by range.
type Prefetched = std::sync::Mutex<std::collections::HashMap<Range<u64>, Bytes>>;

#[derive(Clone, Debug)]
pub struct ObjectReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    /// Byte ranges fetched ahead (to check their page headers), handed out once each.
    prefetched: Option<Arc<Prefetched>>,
}

impl ObjectReader {
    pub fn new(store: Arc<dyn ObjectStore>, path: Path, size: u64) -> Self {
        ObjectReader {
            store,
            path,
            size,
            prefetched: None,
        }
    }

    /// Serves the next request for exactly these ranges from `fetched` (each once) instead of
    /// the store: the column chunks the caller fetched to check are not fetched twice.
    pub fn with_prefetched(mut self, ranges: Vec<Range<u64>>, fetched: Vec<Bytes>) -> Self {
        let map = ranges.into_iter().zip(fetched).collect();
        self.prefetched = Some(Arc::new(std::sync::Mutex::new(map)));
        self
    }

    fn take_prefetched(&self, ranges: &[Range<u64>]) -> Option<Vec<Bytes>> {
        let mut map = self.prefetched.as_ref()?.lock().ok()?;
        if !ranges.iter().all(|r| map.contains_key(r)) {
            return None;
        }
        ranges.iter().map(|r| map.remove(r)).collect()
    }
}

impl AsyncFileReader for ObjectReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes>> {
        self.store.get_range(&self.path, range).map_err(storage).boxed()
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Vec<Bytes>>> {
        async move {
            match self.take_prefetched(&ranges) {
                Some(chunks) => Ok(chunks),
                None => self.store.get_ranges(&self.path, &ranges).await.map_err(storage),
            }
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let fetch = CheckedFooter {
                reader: self,
                metadata_len: None,
            };
            let metadata = ParquetMetaDataReader::new()
                .with_arrow_reader_options(options)
                .load_and_finish(fetch, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}

/// Fetches a file's footer for the parquet crate, checking the schema's depth
/// ([`check_schema_depth`]) in the footer bytes before the crate parses them.
struct CheckedFooter<'a> {
    reader: &'a mut ObjectReader,
    /// The footer's length, once the file's last 8 bytes were fetched.
    metadata_len: Option<u64>,
}

impl MetadataFetch for CheckedFooter<'_> {
    fn fetch(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes>> {
        async move {
            let bytes = self.reader.get_bytes(range.clone()).await?;
            let size = self.reader.size;
            // The slices below are bounded by the checks beside them.
            let footer = if range.end == size && bytes.len() >= 8 {
                let tail = &bytes[bytes.len() - 8..];
                let len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
                self.metadata_len = Some(len);
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                (bytes.len() - 8 >= len).then(|| &bytes[bytes.len() - 8 - len..bytes.len() - 8])
            } else if range.end.checked_add(8) == Some(size)
                && range
                    .end
                    .checked_sub(range.start)
                    .is_some_and(|n| self.metadata_len == Some(n))
            {
                Some(&bytes[..])
            } else {
                None
            };
            if let Some(footer) = footer.filter(|f| !f.is_empty()) {
                check_schema_depth(footer).map_err(|e| ParquetError::General(format!("the footer's schema: {e}")))?;
            }
            Ok(bytes)
        }
        .boxed()
    }
}
