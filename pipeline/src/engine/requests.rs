//! Counting the HTTP requests this process sends to object stores, by kind: what a run costs
//! in requests (S3 bills per request, and request rates are what a bucket throttles).
//!
//! Every remote store is built with [`CountingConnector`], which wraps `object_store`'s own
//! HTTP client, so the counts are the requests that went on the wire: retries, listing pages,
//! multipart parts and batch deletes included. `safepipe run` prints them at the end.

use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use std::sync::atomic::{AtomicU64, Ordering};

/// Kinds of requests, in the order [`Requests`] reports them.
const KINDS: [&str; 6] = ["GET", "LIST", "HEAD", "PUT", "POST", "DELETE"];
static COUNTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Requests sent so far by this process, per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Requests {
    pub get: u64,
    /// GETs that list a prefix (S3 `list-type=2`, Azure `comp=list`, GCS's S3-style listing).
    pub list: u64,
    pub head: u64,
    pub put: u64,
    /// Multipart creates and completions, batch deletes.
    pub post: u64,
    pub delete: u64,
}

impl Requests {
    pub fn total(&self) -> u64 {
        self.get + self.list + self.head + self.put + self.post + self.delete
    }
}

impl std::fmt::Display for Requests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let values = [self.get, self.list, self.head, self.put, self.post, self.delete];
        let parts: Vec<String> = KINDS
            .iter()
            .zip(values)
            .filter(|(_, n)| *n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        write!(f, "{} request(s) ({})", self.total(), parts.join(", "))
    }
}

/// The requests sent so far.
pub fn requests() -> Requests {
    let n = |i: usize| COUNTS[i].load(Ordering::Relaxed);
    Requests {
        get: n(0),
        list: n(1),
        head: n(2),
        put: n(3),
        post: n(4),
        delete: n(5),
    }
}

fn kind(request: &HttpRequest) -> usize {
    let query = request.uri().query().unwrap_or_default();
    match request.method().as_str() {
        "GET" if query.contains("list-type=") || query.contains("comp=list") => 1,
        "GET" => 0,
        "HEAD" => 2,
        "PUT" => 3,
        "DELETE" => 5,
        _ => 4,
    }
}

/// Builds `object_store`'s usual HTTP client, wrapped to count what it sends.
#[derive(Debug, Default)]
pub struct CountingConnector;

impl HttpConnector for CountingConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Counting { inner }))
    }
}

#[derive(Debug)]
struct Counting {
    inner: HttpClient,
}

#[async_trait::async_trait]
impl HttpService for Counting {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        COUNTS[kind(&request)].fetch_add(1, Ordering::Relaxed);
        self.inner.execute(request).await
    }
}
