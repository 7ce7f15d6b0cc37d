//! Errors of the engine and CLI, each with the party at fault and a documented exit code.

use safepipe_operators::OpError;
use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit codes (docs/cli.md lists the same).
pub mod exit {
    /// Everything asked for was done.
    pub const OK: i32 = 0;
    /// Our bug or an unexpected failure: please report it with the log.
    pub const INTERNAL: i32 = 1;
    /// The config, the command line or a query is wrong: fix it and run again.
    pub const USAGE: i32 = 2;
    /// Some units failed (storage, network): rerun the same command to retry only those.
    pub const UNITS_FAILED: i32 = 3;
}

#[derive(Debug, Error)]
pub enum Error {
    /// The user's config or command line (names the key or flag and the fix).
    #[error("config error: {0}")]
    Config(String),
    /// A query given to `safepipe sql` is invalid or not allowed.
    #[error("query error: {0}")]
    Query(String),
    /// The run directory or an input could not be read or written.
    #[error("storage error: {0}")]
    Storage(#[from] object_store::Error),
    /// A stage's query or transform failed while running (e.g. a route predicate that cannot be
    /// evaluated on some row). Recorded per unit; the message says what failed.
    #[error("execution error: {0}")]
    Execution(String),
    /// The run finished, but some units failed; their errors are in `safepipe status`.
    #[error("{failed} unit(s) failed; rerun the same command to retry them (see `safepipe status`)")]
    UnitsFailed { failed: usize },
    /// The run finished, but other live processes held some units (their leases), so this one
    /// left them alone.
    #[error(
        "{busy} unit(s) were held by another process and left to it; rerun once it has finished to check they are done"
    )]
    UnitsBusy { busy: usize },
    /// Something we did not expect; a bug unless the message says otherwise.
    #[error("internal error: {0} (please report this with the log)")]
    Internal(String),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) | Error::Query(_) => exit::USAGE,
            Error::Storage(_) | Error::Execution(_) | Error::UnitsFailed { .. } | Error::UnitsBusy { .. } => {
                exit::UNITS_FAILED
            }
            Error::Internal(_) => exit::INTERNAL,
        }
    }
}

impl From<OpError> for Error {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Storage(e) => Error::Storage(e),
            OpError::Config(msg) => Error::Config(msg),
            OpError::Query(e) => Error::Execution(e.to_string()),
            OpError::Model(msg) => Error::Execution(format!("model: {msg}")),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<safepipe_model::cuda::CudaError> for Error {
    /// A missing GPU, driver or library is the setup's to fix (exit 2); a failure on the GPU
    /// fails the run (exit 3).
    fn from(e: safepipe_model::cuda::CudaError) -> Self {
        use safepipe_model::cuda::CudaError;
        match e {
            CudaError::Library { .. } | CudaError::NoDevice(_) => Error::Config(e.to_string()),
            other => Error::Execution(other.to_string()),
        }
    }
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        Error::Execution(e.to_string())
    }
}

impl From<parquet::errors::ParquetError> for Error {
    fn from(e: parquet::errors::ParquetError) -> Self {
        Error::Internal(format!("parquet: {e}"))
    }
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Self {
        Error::Internal(format!("arrow: {e}"))
    }
}
