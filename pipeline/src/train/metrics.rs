//! `metrics.jsonl` beside the checkpoints: one JSON object per logged optimiser step (loss,
//! learning rate, gradient norm, tokens/s), for `safepipe report` and any plotting tool.
//!
//! Kept across `--resume`: a run that starts after step `s` keeps the lines of steps `<= s` and
//! drops later ones (steps about to be redone after a crash past the last checkpoint), so the file
//! always describes one history. A fresh run (step 0) starts a new file. Lines are appended and
//! flushed one at a time; a torn last line (a kill mid-write) is skipped when read.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const METRICS_FILE: &str = "metrics.jsonl";

/// One logged step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Of this step, on all ranks together.
    pub tokens_per_second: f64,
    /// Targets counted in this step (rank 0's share times the ranks).
    pub tokens: u64,
    /// When the step ended (RFC 3339).
    pub at: String,
}

/// The metrics file of `checkpoint_dir`, open for appending.
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

fn fail(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Config(format!("training metrics {}: {e}", path.display()))
}

impl MetricsLog {
    /// Opens the file for a run whose next step is `from_step + 1`: lines of later steps are
    /// dropped first (rewritten atomically).
    pub fn open(checkpoint_dir: &Path, from_step: u64) -> Result<MetricsLog> {
        let path = checkpoint_dir.join(METRICS_FILE);
        std::fs::create_dir_all(checkpoint_dir).map_err(|e| fail(checkpoint_dir, e))?;
        let kept: String = read(checkpoint_dir)?
            .iter()
            .filter(|m| m.step <= from_step)
            .map(|m| serde_json::to_string(m).expect("serialisable") + "\n")
            .collect();
        let partial = path.with_extension("jsonl.partial");
        std::fs::write(&partial, kept).map_err(|e| fail(&partial, e))?;
        std::fs::rename(&partial, &path).map_err(|e| fail(&path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| fail(&path, e))?;
        Ok(MetricsLog { path, file })
    }

    pub fn append(&mut self, metrics: &StepMetrics) -> Result<()> {
        let line = serde_json::to_string(metrics).expect("serialisable") + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| fail(&self.path, e))
    }
}

/// The logged steps of `checkpoint_dir` in file order (none when there is no file); lines that
/// do not parse (a torn last line) are skipped.
pub fn read(checkpoint_dir: &Path) -> Result<Vec<StepMetrics>> {
    let path = checkpoint_dir.join(METRICS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fail(&path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64) -> StepMetrics {
        StepMetrics {
            step,
            loss: 10.0 / step as f64,
            lr: 1e-3,
            grad_norm: 1.0,
            tokens_per_second: 100.0,
            tokens: 64,
            at: "t".into(),
        }
    }

    #[test]
    fn a_resume_keeps_the_steps_before_it_and_drops_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), 0).unwrap();
        for s in 1..=6 {
            log.append(&step(s)).unwrap();
        }
        drop(log);
        // A torn line from a kill mid-write is skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(METRICS_FILE))
            .unwrap()
            .write_all(b"{\"step\": 7, \"lo")
            .unwrap();
        let mut log = MetricsLog::open(dir.path(), 4).unwrap();
        log.append(&step(5)).unwrap();
        let steps: Vec<u64> = read(dir.path()).unwrap().iter().map(|m| m.step).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5]);
        // A fresh run starts over.
        MetricsLog::open(dir.path(), 0).unwrap();
        assert!(read(dir.path()).unwrap().is_empty());
    }
}
