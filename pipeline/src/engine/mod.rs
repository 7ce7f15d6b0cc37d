//! The commit protocol in one folder: where a run's files live ([`run_dir`]), when a unit's
//! committed result is still current ([`freshness`]), who may write a unit ([`leases`]), what the
//! units are ([`plan`]), and the runner that ties them together ([`runner`]). Reading a stage of
//! many units costs one listing ([`listing`]) and one snapshot file ([`snapshot`]).
//!
//! Every command that reads or writes a run directory opens it through [`run_dir::RunDir`], and
//! every question "does this unit need work?" is answered by [`freshness`]: `run`, `status`, the
//! SQL catalog and `gc` cannot disagree.

pub mod freshness;
pub mod leases;
pub mod listing;
pub mod plan;
pub mod ranks;
pub mod records;
pub mod requests;
pub mod retry;
pub mod run_dir;
pub mod runner;
pub mod snapshot;
pub mod storage;
pub mod writer;
