//! Progress bars on stderr, built from runner events. When stderr is not a terminal (a log
//! file, Slurm's output) the bars are hidden and a `progress` log line per running stage is
//! written every [`HEARTBEAT`] instead, so a long stage shows it is alive.

use crate::engine::runner::{Reporter, StageSummary};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use safepipe_operators::UnitCounts;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::io::Write;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// The one set of bars of this process; log lines go through [`LogWriter`] so they print above
/// the bars instead of through them.
static MULTI: LazyLock<MultiProgress> = LazyLock::new(|| {
    let target = if std::io::stderr().is_terminal() {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    MultiProgress::with_draw_target(target)
});

/// A stderr writer for `tracing` that hides the progress bars while a line is written.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        MULTI.suspend(|| std::io::stderr().write(buf))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// A bar of `len` steps in the process's bar set (for long loops outside the runner).
pub fn step_bar(len: u64, what: &str) -> ProgressBar {
    let bar = MULTI.add(ProgressBar::new(len));
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_string());
    bar
}

/// How often a stage in progress logs a line when stderr is not a terminal (default 60 s;
/// `SAFEPIPE_PROGRESS_SECONDS` sets it).
pub const HEARTBEAT: Duration = Duration::from_secs(60);

fn heartbeat() -> Duration {
    std::env::var("SAFEPIPE_PROGRESS_SECONDS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(HEARTBEAT, Duration::from_secs_f64)
}

/// A running stage: its bar, counts so far, when it started, units to do and done.
struct Running {
    bar: ProgressBar,
    counts: UnitCounts,
    started: Instant,
    todo: usize,
    done: usize,
    failed: usize,
}

type Stages = Arc<Mutex<HashMap<String, Running>>>;

pub struct Bars {
    multi: MultiProgress,
    bars: Stages,
    /// Stops the heartbeat thread when the bars are dropped.
    stop: Option<std::sync::mpsc::Sender<()>>,
}

impl Bars {
    pub fn new() -> Self {
        let bars: Stages = Arc::default();
        let stop = (!std::io::stderr().is_terminal()).then(|| {
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let every = heartbeat();
            let watched = bars.clone();
            std::thread::spawn(move || {
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                    for (stage, r) in watched.lock().expect("bars").iter() {
                        if r.done + r.failed < r.todo {
                            tracing::info!(
                                stage = stage.as_str(),
                                units_done = r.done,
                                units_failed = r.failed,
                                units_to_do = r.todo,
                                rows_in = r.counts.rows_in,
                                rows_per_second =
                                    (r.counts.rows_in as f64 / r.started.elapsed().as_secs_f64().max(1e-3)) as u64,
                                elapsed_seconds = r.started.elapsed().as_secs(),
                                "progress"
                            );
                        }
                    }
                }
            });
            tx
        });
        Bars {
            multi: MULTI.clone(),
            bars,
            stop,
        }
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

fn message(counts: &UnitCounts, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    format!(
        "{} rows in, {} out, {} quarantined, {:.0} rows/s",
        counts.rows_in,
        counts.rows_out,
        counts.quarantined,
        counts.rows_in as f64 / secs
    )
}

impl Reporter for Bars {
    fn stage_started(&self, stage: &str, todo: usize, skipped: usize) {
        let bar = self.multi.add(ProgressBar::new(todo as u64));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} units {msg}")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar.set_prefix(stage.to_string());
        if skipped > 0 {
            bar.println(format!("{stage}: {skipped} unit(s) already committed, skipped"));
        }
        let running = Running {
            bar,
            counts: UnitCounts::default(),
            started: Instant::now(),
            todo,
            done: 0,
            failed: 0,
        };
        self.bars.lock().expect("bars").insert(stage.to_string(), running);
    }

    fn unit_finished(&self, stage: &str, counts: &UnitCounts) {
        if let Some(r) = self.bars.lock().expect("bars").get_mut(stage) {
            r.counts.merge(counts);
            r.done += 1;
            r.bar.inc(1);
            r.bar.set_message(message(&r.counts, r.started));
        }
    }

    fn unit_failed(&self, stage: &str, unit: u32, error: &str) {
        if let Some(r) = self.bars.lock().expect("bars").get_mut(stage) {
            r.failed += 1;
            r.bar.inc(1);
            r.bar.println(format!("{stage}: unit {unit} failed: {error}"));
        }
    }

    fn stage_finished(&self, summary: &StageSummary) {
        if let Some(r) = self.bars.lock().expect("bars").get_mut(&summary.stage) {
            r.bar.finish_with_message(message(&r.counts, r.started));
            // Finished: no more heartbeat lines for it.
            r.todo = 0;
        }
    }
}

/// The most memory this process has held at once (its resident high-water mark, `VmHWM` in
/// `/proc/self/status`), where the system reports it.
pub fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
