//! safepipe's engine: config, work plan, stage runner with its commit protocol, SQL and status.
//!
//! ```text
//! config.rs     TOML -> validated Config         error.rs    errors by whose fault, exit codes
//! engine/       the commit protocol in one folder:
//!   run_dir.rs    RunDir: the run directory's layout, records, relative file names
//!   freshness.rs  the one decision "is this unit's record current?" (run, status, sql, gc)
//!   leases.rs     one owner per (stage, unit): create-if-absent leases with expiry
//!   plan.rs       inputs -> work units (persisted), input drift, `plan --extend`
//!   runner.rs     units -> committed outputs      records.rs  completion / failure records
//!   runner/       the runner's tests (tests.rs)
//!   writer.rs     batches -> Parquet files        storage.rs  paths and URLs -> object stores
//!   snapshot.rs   per-stage record snapshots, used only for the files they were taken from
//!   listing.rs    folder listings (local folders walked with one stat per file)
//!   retry.rs      remote requests retried after transport errors (GETs and listings resumed)
//!   requests.rs   HTTP requests sent to object stores, counted by kind
//!   ranks.rs      rank / world size from flags, Slurm, Kubernetes
//! stages/       the stage graph (graph.rs), each stage's adapter and its config section
//! catalog.rs    committed outputs as SQL tables   sql.rs      `safepipe sql` / `shell`
//! status.rs     `safepipe status`                 gc.rs       `safepipe gc`: unreferenced files
//! watch.rs      `safepipe status --watch`: refreshed status, rate and ETA across ranks
//! report/       `safepipe report`: one offline HTML page of a run (SVG charts, escaped examples)
//! pack/         the global stage: tokens -> mixture, shuffle -> shards + manifest.json,
//!               packed on every rank (its own module map)
//! export.rs     `safepipe export megatron`, `safepipe tokenizer export`
//! train/        `safepipe train`: the packed shards -> the CPU trainer -> checkpoints, metrics.jsonl;
//!               `--nproc-per-node` (launch.rs) starts and supervises one machine's ranks
//! gpu.rs        `safepipe gpu info|compile|check`: the CUDA backend's libraries, kernels, checks
//! classifier/   `safepipe classifier train|score`: labels.rs (parts, folds, groups),
//!               embeddings.rs (every chunk, cached), calibrate.rs (the out-of-fold threshold,
//!               per-group rates), mod.rs (fit per fold, average, report; score texts)
//! llm.rs        the `[llm]` backend shared by the synthesis stages, `safepipe generate`
//! eval/         `safepipe eval`: held-out prefixes -> continuations per decoder -> judges,
//!               tag AUROC, perplexity -> the `eval` table and a summary
//! progress.rs   progress bars and log lines from runner events
//! cli.rs        flags -> one function per command; main.rs maps errors to exit codes
//! ```
//! The transforms themselves live in the `safepipe-operators` crate.

pub mod catalog;
pub mod classifier;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod eval;
pub mod export;
pub mod gc;
pub mod gpu;
pub mod llm;
pub mod pack;
pub mod progress;
pub mod report;
pub mod sql;
pub mod stages;
pub mod status;
pub mod train;
pub mod watch;
