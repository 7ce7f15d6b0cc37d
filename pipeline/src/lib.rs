//! safepipe's engine: config, work plan, stage runner with its commit protocol, SQL and status.
//!
//! ```text
//! config.rs    TOML -> validated Config          plan.rs     inputs -> work units (persisted)
//! stages/      the DAG and each stage's adapter  runner.rs   units -> committed outputs
//! records.rs   completion / failure records      writer.rs   batches -> atomic Parquet files
//! catalog.rs   committed outputs as SQL tables   sql.rs      `safepipe sql` / `shell`
//! status.rs    `safepipe status`                 storage.rs  paths and URLs -> object stores
//! gc.rs        `safepipe gc`: unreferenced files
//! pack.rs      the global stage: tokens -> mixture, shuffle -> shards + manifest.json
//! export.rs    `safepipe export megatron`, `safepipe tokenizer export`
//! train.rs     `safepipe train`: the packed shards -> the CPU trainer -> checkpoints
//! classifier.rs `safepipe classifier train|score`: fit a safety head, score texts
//! ranks.rs     rank / world size from flags, Slurm, Kubernetes
//! ```
//! The transforms themselves live in the `safepipe-operators` crate.

pub mod catalog;
pub mod classifier;
pub mod cli;
pub mod config;
pub mod error;
pub mod export;
pub mod gc;
pub mod llm;
pub mod pack;
pub mod plan;
pub mod progress;
pub mod ranks;
pub mod records;
pub mod runner;
pub mod sql;
pub mod stages;
pub mod status;
pub mod storage;
pub mod train;
pub mod writer;
