//! Progress bars on stderr (hidden when stderr is not a terminal), built from runner events.

use crate::runner::{Reporter, StageSummary};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use safepipe_operators::UnitCounts;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::Instant;

pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, (ProgressBar, UnitCounts, Instant)>>,
}

impl Bars {
    pub fn new() -> Self {
        let target = if std::io::stderr().is_terminal() {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
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
