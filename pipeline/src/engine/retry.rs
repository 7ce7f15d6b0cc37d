//! Retries of object-store requests that failed in transit.
//!
//! `object_store` retries a request whose server answered 5xx or 429, but not one whose
//! connection broke while the body was moving (a reset mid-body, a truncated listing, a lost
//! response to a PUT): against a flaky endpoint such requests fail whole work units. A
//! [`RetryingStore`] wraps every remote store ([`super::storage::Stores`]) and:
//!
//! - repeats requests that failed with a transport error ([`object_store::Error::Generic`]), at
//!   most [`ATTEMPTS`] times with doubling waits;
//! - resumes a GET whose body broke from the byte it reached, pinned to the first response's
//!   ETag (`If-Match`), so a reader never sees a partial object nor one stitched from two
//!   versions: a changed object is an error;
//! - resumes a listing that broke after its last key;
//! - treats `AlreadyExists` on a retried create-if-absent PUT as success when the object holds
//!   exactly the bytes we sent (our first attempt landed but its answer was lost).
//!
//! Every retry is counted ([`retries`]) and logged; `safepipe run` prints the count.

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetRange, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tracing::info;

/// Tries per request (the first and up to 5 retries).
pub const ATTEMPTS: u32 = 6;

static RETRIES: AtomicU64 = AtomicU64::new(0);

/// Requests retried by this process so far.
pub fn retries() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}

fn transient(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::Generic { .. })
}

/// Counts and logs one retry, then waits 100 ms, 200 ms, ... (at most 3.2 s).
async fn pause(what: &str, path: &Path, attempt: u32, e: &object_store::Error) {
    RETRIES.fetch_add(1, Ordering::Relaxed);
    info!(request = what, path = %path, attempt, error = %e, "retrying an object-store request");
    tokio::time::sleep(Duration::from_millis(100 << attempt.min(5))).await;
}

/// Runs `op` until it succeeds, fails for good, or has been tried [`ATTEMPTS`] times.
async fn again<T, F, Fut>(what: &str, path: &Path, mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                pause(what, path, attempt, &e).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// A remote store whose requests are retried after transport errors (module docs).
#[derive(Debug)]
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
}

impl RetryingStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        RetryingStore { inner }
    }
}

impl std::fmt::Display for RetryingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Retrying({})", self.inner)
    }
}

/// The state of a GET body being read, to resume it where it broke.
struct Body {
    store: Arc<dyn ObjectStore>,
    path: Path,
    options: GetOptions,
    /// The bytes of the object this body covers.
    range: Range<u64>,
    /// Bytes passed on so far.
    read: u64,
    stream: BoxStream<'static, Result<Bytes>>,
    attempt: u32,
}

impl Body {
    /// The next chunk; after a transport error, a new request for the rest, same version.
    async fn next(mut self) -> Option<(Result<Bytes>, Option<Body>)> {
        loop {
            match self.stream.next().await {
                Some(Ok(chunk)) => {
                    self.read += chunk.len() as u64;
                    return Some((Ok(chunk), Some(self)));
                }
                None => return None,
                Some(Err(e)) if transient(&e) && self.attempt + 1 < ATTEMPTS => {
                    pause("get (resume)", &self.path, self.attempt, &e).await;
                    self.attempt += 1;
                    let start = self.range.start + self.read;
                    if start >= self.range.end {
                        return None;
                    }
                    let mut options = self.options.clone();
                    options.range = Some(GetRange::Bounded(start..self.range.end));
                    match self.store.get_opts(&self.path, options).await {
                        Ok(GetResult {
                            payload: GetResultPayload::Stream(stream),
                            ..
                        }) => self.stream = stream,
                        Ok(_) => {
                            let e = object_store::Error::NotSupported {
                                source: "a remote store answered with a local file".into(),
                            };
                            return Some((Err(e), None));
                        }
                        // Counted at the next turn: the failed request becomes this stream.
                        Err(e) if transient(&e) => self.stream = futures::stream::once(async { Err(e) }).boxed(),
                        Err(e) => return Some((Err(e), None)),
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
            }
        }
    }
}

/// A listing being read, to resume it after the last key it returned.
struct Listing {
    store: Arc<dyn ObjectStore>,
    prefix: Option<Path>,
    last: Option<Path>,
    stream: BoxStream<'static, Result<ObjectMeta>>,
    attempt: u32,
}

impl Listing {
    async fn next(mut self) -> Option<(Result<ObjectMeta>, Option<Listing>)> {
        loop {
            match self.stream.next().await {
                Some(Ok(meta)) => {
                    self.last = Some(meta.location.clone());
                    return Some((Ok(meta), Some(self)));
                }
                None => return None,
                Some(Err(e)) if transient(&e) && self.attempt + 1 < ATTEMPTS => {
                    let at = self.prefix.clone().unwrap_or_default();
                    pause("list (resume)", &at, self.attempt, &e).await;
                    self.attempt += 1;
                    self.stream = match &self.last {
                        Some(last) => self.store.list_with_offset(self.prefix.as_ref(), last),
                        None => self.store.list(self.prefix.as_ref()),
                    };
                }
                Some(Err(e)) => return Some((Err(e), None)),
            }
        }
    }
}

#[async_trait]
impl ObjectStore for RetryingStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        let mut attempt = 0;
        loop {
            match self.inner.put_opts(location, payload.clone(), opts.clone()).await {
                Err(object_store::Error::AlreadyExists { path, source })
                    if attempt > 0 && matches!(opts.mode, PutMode::Create) =>
                {
                    // Our earlier attempt may have landed with its answer lost: ours if the bytes
                    // are exactly what we sent.
                    let existing = self.inner.get(location).await?;
                    let meta = existing.meta.clone();
                    if existing.bytes().await? == Bytes::from(payload.clone()) {
                        return Ok(PutResult {
                            e_tag: meta.e_tag,
                            version: meta.version,
                        });
                    }
                    return Err(object_store::Error::AlreadyExists { path, source });
                }
                Err(e) if transient(&e) && attempt + 1 < ATTEMPTS => {
                    pause("put", location, attempt, &e).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Not retried here: a failed part fails the upload (the unit is redone by the next run).
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let result = again("get", location, || self.inner.get_opts(location, options.clone())).await?;
        let GetResultPayload::Stream(stream) = result.payload else {
            return Ok(result);
        };
        // Resumed requests must read the same version of the object.
        let mut resume = options;
        if resume.if_match.is_none() && resume.version.is_none() {
            resume.if_match = result.meta.e_tag.clone();
            resume.version = result.meta.version.clone();
        }
        let body = Body {
            store: self.inner.clone(),
            path: location.clone(),
            options: resume,
            range: result.range.clone(),
            read: 0,
            stream,
            attempt: 0,
        };
        let payload = futures::stream::unfold(Some(body), |b| async move { b?.next().await }).boxed();
        Ok(GetResult {
            payload: GetResultPayload::Stream(payload),
            ..result
        })
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        again("get ranges", location, || self.inner.get_ranges(location, ranges)).await
    }

    /// Deletes in chunks of up to 1,000 paths (one S3 `DeleteObjects` request each, as the store
    /// batches them); a chunk with a transport error is sent again whole (deleting is idempotent).
    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        let inner = self.inner.clone();
        locations
            .ready_chunks(1000)
            .then(move |chunk| {
                let inner = inner.clone();
                async move {
                    let (paths, mut failed): (Vec<_>, Vec<_>) = chunk.into_iter().partition(Result::is_ok);
                    let paths: Vec<Path> = paths.into_iter().flatten().collect();
                    let mut attempt = 0;
                    loop {
                        let batch = futures::stream::iter(paths.clone().into_iter().map(Ok)).boxed();
                        let results: Vec<Result<Path>> = inner.delete_stream(batch).collect().await;
                        let broken = results.iter().position(|r| r.as_ref().is_err_and(transient));
                        match broken {
                            Some(at) if attempt + 1 < ATTEMPTS => {
                                if let Some(Err(e)) = results.into_iter().nth(at) {
                                    let first = paths.first().cloned().unwrap_or_default();
                                    pause("delete", &first, attempt, &e).await;
                                }
                                attempt += 1;
                            }
                            _ => {
                                failed.extend(results);
                                return futures::stream::iter(failed);
                            }
                        }
                    }
                }
            })
            .flatten()
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let listing = Listing {
            store: self.inner.clone(),
            prefix: prefix.cloned(),
            last: None,
            stream: self.inner.list(prefix),
            attempt: 0,
        };
        futures::stream::unfold(Some(listing), |l| async move { l?.next().await }).boxed()
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        let listing = Listing {
            store: self.inner.clone(),
            prefix: prefix.cloned(),
            last: Some(offset.clone()),
            stream: self.inner.list_with_offset(prefix, offset),
            attempt: 0,
        };
        futures::stream::unfold(Some(listing), |l| async move { l?.next().await }).boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        let at = prefix.cloned().unwrap_or_default();
        again("list", &at, || self.inner.list_with_delimiter(prefix)).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        again("copy", from, || self.inner.copy_opts(from, to, options.clone())).await
    }
}
