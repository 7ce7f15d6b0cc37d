//! Progress bars on stderr (hidden when stderr is not a terminal), built from runner events.

use crate::engine::runner::{Reporter, StageSummary};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use safepipe_operators::UnitCounts;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::io::Write;
use std::sync::{LazyLock, Mutex};
use std::time::Instant;

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

pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, (ProgressBar, UnitCounts, Instant)>>,
}

impl Bars {
    pub fn new() -> Self {
        Bars {
            multi: MULTI.clone(),
            bars: Mutex::new(HashMap::new()),
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
        self.bars
            .lock()
            .expect("bars")
            .insert(stage.to_string(), (bar, UnitCounts::default(), Instant::now()));
    }

    fn unit_finished(&self, stage: &str, counts: &UnitCounts) {
        if let Some((bar, total, started)) = self.bars.lock().expect("bars").get_mut(stage) {
            total.merge(counts);
            bar.inc(1);
            bar.set_message(message(total, *started));
        }
    }

    fn unit_failed(&self, stage: &str, unit: u32, error: &str) {
        if let Some((bar, _, _)) = self.bars.lock().expect("bars").get_mut(stage) {
            bar.inc(1);
            bar.println(format!("{stage}: unit {unit} failed: {error}"));
        }
    }

    fn stage_finished(&self, summary: &StageSummary) {
        if let Some((bar, total, started)) = self.bars.lock().expect("bars").get_mut(&summary.stage) {
            bar.finish_with_message(message(total, *started));
        }
    }
}
