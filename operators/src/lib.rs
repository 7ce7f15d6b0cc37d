//! The stage transforms of safepipe, one module per stage, in dataflow order:
//!
//! ```text
//! ingest  raw Parquet / JSON Lines slices  -> documents + quarantine
//! score   documents                        -> scores   (the ONNX safety classifier, max over chunks)
//! annotate documents (+ scores)            -> llm_scores (the LLM rubric; ensemble = max with the classifier)
//! route   documents (+ scores, llm_scores) -> routes   (SQL predicates from the config)
//! synthesize documents routed rephrase/refuse -> synthetic (SafeWeb, RefuseWeb, Moral Education)
//! tag     documents with routes.also_tag   -> tagged   (Algorithm 1: the harmfulness tag between words)
//! tokenize kept documents + tagged + kept synthetic -> tokens   (ids + EOS, the tag one special token)
//! pack    every unit's tokens (global)     -> shards   (mixture, seeded shuffle, seq_len + 1 rows)
//! ```
//!
//! Operators know nothing of the CLI, the run directory or the work plan's persistence: they are
//! handed an object store and a slice of a file (ingest) or a DataFusion context holding their
//! input tables (route), and they return streams of Arrow record batches plus the counts every
//! stage reports ([`UnitCounts`]). Column names and types of every table are defined once, in
//! [`schema`].

pub mod counts;
pub mod error;
pub mod holdout;
pub mod ingest;
pub mod pack;
pub mod parquet_headers;
pub mod parquet_io;
pub mod route;
pub mod schema;
pub mod score;
pub mod synthesize;
pub mod tag;
pub mod tokenize;

pub use counts::UnitCounts;
pub use error::{OpError, OpResult};
