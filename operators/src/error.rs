//! Errors an operator can return. Bad *records* never become errors: they become quarantine rows.
//! What reaches the caller is what stops a whole unit: storage that cannot be read (transient, a
//! rerun retries it), a query that cannot be planned (the user's config), or our own bug.

use thiserror::Error;

pub type OpResult<T> = Result<T, OpError>;

#[derive(Debug, Error)]
pub enum OpError {
    /// The object store failed (network, permissions, missing object). Retryable by a rerun.
    #[error("storage: {0}")]
    Storage(#[from] object_store::Error),
    /// Reading a byte stream failed for a reason other than corrupt data.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A DataFusion plan failed to build or run.
    #[error("query: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The user's configuration cannot work with this input (names the key and the fix).
    #[error("config: {0}")]
    Config(String),
    /// The tokenizer failed on a text (a bug in the tokenizer or a malformed vocabulary).
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] safepipe_model::TokenizerError),
    /// A model failed to load or to run (missing files, ONNX Runtime errors).
    #[error("model: {0}")]
    Model(String),
}
