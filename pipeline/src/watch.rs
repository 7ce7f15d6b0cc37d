//! `safepipe status CONFIG --watch`: the status of a run in progress, refreshed every interval,
//! across all ranks (everything is read from the run directory: records, failure records and
//! live leases). On a terminal the table is redrawn in place; otherwise (a log file, a pipe, a
//! Slurm output) one line per refresh. The rate is committed (stage, unit) results per second
//! since the watch started, and the ETA divides what is left by it.

use crate::config::Config;
use crate::error::Result;
use crate::status::{self, Report};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

pub struct WatchOptions {
    pub interval: Duration,
    /// Stop once no stage has work left (every unit committed and current). A run that ended
    /// with failed units leaves work: interrupt the watch then.
    pub until_done: bool,
}

/// Units of every stage committed and current, and all of them.
fn progress(report: &Report) -> (usize, usize) {
    report
        .stages
        .iter()
        .fold((0, 0), |(done, all), s| (done + s.committed, all + s.units))
}

/// Nothing left to do: every unit of every stage committed and current.
fn finished(report: &Report) -> bool {
    report.stages.iter().all(|s| s.to_do.is_empty())
}

/// `12.3 units/s, eta 4m05s` from the first sample (at `start`, `done0` committed) to now.
fn rate_line(start: Instant, done0: usize, done: usize, all: usize) -> String {
    let seconds = start.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        done.saturating_sub(done0) as f64 / seconds
    } else {
        0.0
    };
    let left = all.saturating_sub(done);
    let eta = if left == 0 {
        "done".to_string()
    } else if rate > 0.0 {
        let s = (left as f64 / rate).round() as u64;
        format!("eta {}m{:02}s", s / 60, s % 60)
    } else {
        "eta unknown".to_string()
    };
    format!("{done}/{all} stage-units committed, {rate:.2} units/s, {eta}")
}

/// One line per stage group: `ingest 12/40 (2 running, 1 failed)`.
fn one_line(report: &Report) -> String {
    let mut s = String::new();
    for st in &report.stages {
        let _ = write!(s, "{} {}/{}", st.stage, st.committed, st.units);
        if st.running > 0 || st.failed > 0 {
            let _ = write!(s, " ({} running, {} failed)", st.running, st.failed);
        }
        s.push_str(" | ");
    }
    s
}

/// Watches until interrupted (or, with `until_done`, until the run has nothing left to do).
pub async fn watch(config: &Config, options: WatchOptions) -> Result<()> {
    let terminal = std::io::stdout().is_terminal();
    let start = Instant::now();
    let mut first: Option<usize> = None;
    loop {
        let found = status::collect(config).await?;
        let mut out = std::io::stdout().lock();
        let now = chrono::Utc::now().format("%H:%M:%S");
        match &found {
            None => {
                let _ = writeln!(out, "{now} no work plan yet in {}", config.run_dir);
            }
            Some(report) => {
                let (done, all) = progress(report);
                let done0 = *first.get_or_insert(done);
                let rate = rate_line(start, done0, done, all);
                if terminal {
                    // Clear the screen and redraw from the top left.
                    let _ = writeln!(out, "\x1b[2J\x1b[H{}{now} {rate}", status::render(config, &found));
                } else {
                    let _ = writeln!(out, "{now} {}{rate}", one_line(report));
                }
            }
        }
        let _ = out.flush();
        drop(out);
        if options.until_done && found.as_ref().is_some_and(finished) {
            return Ok(());
        }
        tokio::time::sleep(options.interval).await;
    }
}
