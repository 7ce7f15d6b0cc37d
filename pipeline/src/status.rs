//! `safepipe status`: per stage, how many units are committed and current, running (held under a
//! live lease by any rank), stale, failed, damaged or pending, the rows they account for, the last errors, and input files that changed
//! since planning. It asks the same freshness rule as `safepipe run`
//! ([`crate::engine::freshness::survey`]), so `to_do` is exactly the work the next `run` does
//! (with no `--force`, if every unit it redoes succeeds), by reason.

use crate::config::Config;
use crate::engine::freshness::{self, Verdict};
use crate::engine::leases;
use crate::engine::plan::Plan;
use crate::engine::run_dir::RunDir;
use crate::error::Result;
use crate::pack::{ManifestState, PackView};
use crate::stages::StageGraph;
use safepipe_operators::UnitCounts;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub units: usize,
    /// Committed and current: the next run leaves them alone.
    pub committed: usize,
    /// Committed under an older config or from older upstream results: the next run redoes them.
    pub stale: usize,
    /// Last attempt failed and no current commit exists.
    pub failed: usize,
    /// Held under a live lease right now, by any rank (being worked on).
    pub running: usize,
    /// A record exists but cannot count (corrupt, older layout, a committed file missing).
    pub damaged: usize,
    pub pending: usize,
    /// The units the next `safepipe run` does, by the reason it prints.
    pub to_do: BTreeMap<String, usize>,
    /// Sum over the committed (current) units.
    pub counts: UnitCounts,
    /// The most recent failure message, if any.
    pub last_error: Option<String>,
    /// What is wrong with damaged units (first few).
    pub problems: Vec<String>,
}

/// Everything `status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub units: usize,
    pub planned_at: String,
    pub stages: Vec<StageStatus>,
    /// Input files changed or new since planning.
    pub inputs: Vec<String>,
    /// Stages judged with the settings of their last result (their model file is missing now).
    pub notes: Vec<String>,
}

pub async fn collect(config: &Config) -> Result<Option<Report>> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let Some(plan) = Plan::load(config, &run_dir).await? else {
        return Ok(None);
    };
    let drift = plan.check_inputs(config, &run_dir).await?;
    let graph = StageGraph::new(&Arc::new(config.clone()))?;
    let (fingerprints, notes) = graph.fingerprints_or_recorded(&plan.fingerprint, &run_dir).await?;
    let units: Vec<u32> = plan.units.iter().map(|u| u.id).collect();
    let survey = freshness::survey(&run_dir, &graph, &fingerprints, &units, &[], false).await?;
    let lease_time = std::time::Duration::from_secs(config.lease_seconds);
    let mut out = Vec::new();
    for (node, surveyed) in graph.nodes.iter().zip(&survey) {
        let Some((files, judged)) = surveyed else {
            let view = PackView::of_graph(&run_dir, &plan, &graph, &fingerprints, &survey).await?;
            let mut status = global_status(node.name(), &view);
            status.running = leases::held(&run_dir, node.name(), None, lease_time).await?.len();
            out.push(status);
            continue;
        };
        // Units being worked on: those the next run would do (a `--force` redo of a committed
        // unit elsewhere shows as committed until it commits).
        let todo: Vec<u32> = judged.todo.iter().map(|(unit, _, _)| *unit).collect();
        let mut status = StageStatus {
            stage: node.name().to_string(),
            units: units.len(),
            committed: judged.current.len(),
            running: leases::held(&run_dir, node.name(), Some(&todo), lease_time)
                .await?
                .len(),
            ..Default::default()
        };
        for c in judged.current.values() {
            status.counts.merge(&c.record.counts);
        }
        for (unit, why, _) in &judged.todo {
            *status.to_do.entry(why.to_string()).or_default() += 1;
            if let Some(problem) = files.damaged.get(unit) {
                status.damaged += 1;
                if status.problems.len() < 5 {
                    status.problems.push(format!("unit {unit}: {problem}"));
                }
            } else if files.failed.contains_key(unit) {
                status.failed += 1;
            } else if files.done.contains_key(unit) {
                status.stale += 1;
            } else {
                status.pending += 1;
            }
        }
        let last = files
            .failed
            .values()
            .filter(|f| !judged.current.contains_key(&f.unit))
            .max_by(|a, b| a.at.cmp(&b.at));
        status.last_error = last.map(|f| format!("unit {} (rank {}, {}): {}", f.unit, f.rank, f.at, f.error));
        out.push(status);
    }
    Ok(Some(Report {
        units: units.len(),
        planned_at: plan.created_at,
        stages: out,
        inputs: drift.describe(),
        notes,
    }))
}

/// The global pack stage as one unit: committed, stale, damaged or pending.
fn global_status(name: &str, view: &PackView) -> StageStatus {
    let mut status = StageStatus {
        stage: name.into(),
        units: 1,
        ..Default::default()
    };
    match (view.verdict(false), &view.manifest) {
        (Verdict::Current, ManifestState::Committed(m)) => {
            status.committed = 1;
            status.counts = m.counts();
        }
        (Verdict::Current, _) => unreachable!("a current verdict needs a committed manifest"),
        (Verdict::Redo(why), state) => {
            status.to_do.insert(why.to_string(), 1);
            match state {
                ManifestState::Missing => status.pending = 1,
                ManifestState::Committed(_) => status.stale = 1,
                ManifestState::Damaged(problem) => {
                    status.damaged = 1;
                    status.problems.push(problem.clone());
                }
            }
        }
    }
    status
}

pub fn render(config: &Config, found: &Option<Report>) -> String {
    let mut s = String::new();
    let Some(report) = found else {
        return format!(
            "no work plan in {} yet: `safepipe run {}` (or `safepipe plan`) makes it\n",
            config.run_dir,
            config.path.display()
        );
    };
    let _ = writeln!(
        s,
        "run dir {}: {} work units (planned {})",
        config.run_dir, report.units, report.planned_at
    );
    let _ = writeln!(
        s,
        "{:<10} {:>9} {:>7} {:>6} {:>7} {:>8} {:>8} {:>10} {:>10} {:>8} {:>12}",
        "stage",
        "committed",
        "running",
        "stale",
        "failed",
        "damaged",
        "pending",
        "rows_in",
        "rows_out",
        "dropped",
        "quarantined"
    );
    for st in &report.stages {
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>7} {:>6} {:>7} {:>8} {:>8} {:>10} {:>10} {:>8} {:>12}",
            st.stage,
            format!("{}/{}", st.committed, st.units),
            st.running,
            st.stale,
            st.failed,
            st.damaged,
            st.pending,
            st.counts.rows_in,
            st.counts.rows_out,
            st.counts.dropped_total(),
            st.counts.quarantined
        );
    }
    for st in &report.stages {
        if !st.to_do.is_empty() {
            let why: Vec<String> = st.to_do.iter().map(|(w, n)| format!("{n} {w}")).collect();
            let _ = writeln!(s, "next run redoes in {}: {}", st.stage, why.join(", "));
        }
        for p in &st.problems {
            let _ = writeln!(s, "damaged in {}: {p}", st.stage);
        }
        if let Some(e) = &st.last_error {
            let _ = writeln!(s, "last error in {}: {e}", st.stage);
        }
    }
    for line in &report.inputs {
        let _ = writeln!(s, "input {line}");
    }
    for note in &report.notes {
        let _ = writeln!(s, "note: {note}");
    }
    s
}
