//! `safepipe status`: per stage, how many units are committed under the current config, stale,
//! failed or pending, the rows they account for, and the last errors.

use crate::config::Config;
use crate::error::Result;
use crate::plan::Plan;
use crate::records;
use crate::stages;
use crate::storage::Stores;
use safepipe_operators::UnitCounts;
use std::fmt::Write as _;
use std::sync::Arc;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub units: usize,
    /// Committed under the current config.
    pub committed: usize,
    /// Committed under an older config: the next run redoes them.
    pub stale: usize,
    /// Last attempt failed and no current commit exists.
    pub failed: usize,
    pub pending: usize,
    /// Sum over the committed (current) units.
    pub counts: UnitCounts,
    /// The most recent failure message, if any.
    pub last_error: Option<String>,
}

pub async fn collect(config: &Config) -> Result<Option<(Plan, Vec<StageStatus>)>> {
    let stores = Stores::default();
    let run_dir = stores.resolve(&config.run_dir)?;
    let Some(plan) = Plan::load(config, &run_dir).await? else {
        return Ok(None);
    };
    let stages = stages::pipeline(&Arc::new(config.clone()));
    let fingerprints = stages::fingerprints(&stages, &plan.fingerprint);
    let mut out = Vec::new();
    for (stage, fp) in stages.iter().zip(&fingerprints) {
        let done = records::load_done(&run_dir, stage.name()).await?;
        let failed = records::load_failed(&run_dir, stage.name()).await?;
        let mut status = StageStatus {
            stage: stage.name().to_string(),
            units: plan.units.len(),
            ..Default::default()
        };
        for unit in &plan.units {
            match done.get(&unit.id) {
                Some(r) if r.fingerprint == fp.stage => {
                    status.committed += 1;
                    status.counts.merge(&r.counts);
                }
                _ if failed.contains_key(&unit.id) => status.failed += 1,
                Some(_) => status.stale += 1,
                None => status.pending += 1,
            }
        }
        let last = failed
            .values()
            .filter(|f| done.get(&f.unit).is_none_or(|d| d.fingerprint != fp.stage))
            .max_by(|a, b| a.at.cmp(&b.at));
        status.last_error = last.map(|f| format!("unit {} (rank {}, {}): {}", f.unit, f.rank, f.at, f.error));
        out.push(status);
    }
    if let (Some(pack), Some(i)) = (&config.pack, stages.iter().position(|s| s.name() == "tokenize")) {
        let (_, current) = crate::pack::fingerprint(pack, &fingerprints[i].stage);
        let mut status = StageStatus {
            stage: "pack".into(),
            units: 1,
            ..Default::default()
        };
        match crate::pack::load_manifest(&run_dir).await? {
            Some(m) if m.fingerprint == current => {
                status.committed = 1;
                status.counts = UnitCounts {
                    rows_in: m.documents_in,
                    rows_out: m.documents_packed,
                    ..Default::default()
                };
                status.counts.drop("not_selected", m.documents_not_selected);
                status.counts.drop("not_in_mixture", m.documents_not_in_mixture);
            }
            Some(_) => status.stale = 1,
            None => status.pending = 1,
        }
        out.push(status);
    }
    Ok(Some((plan, out)))
}

pub fn render(config: &Config, found: &Option<(Plan, Vec<StageStatus>)>) -> String {
    let mut s = String::new();
    let Some((plan, stages)) = found else {
        return format!(
            "no work plan in {} yet: `safepipe run {}` (or `safepipe plan`) makes it\n",
            config.run_dir,
            config.path.display()
        );
    };
    let _ = writeln!(
        s,
        "run dir {}: {} work units (planned {})",
        config.run_dir,
        plan.units.len(),
        plan.created_at
    );
    let _ = writeln!(
        s,
        "{:<10} {:>9} {:>6} {:>7} {:>8} {:>10} {:>10} {:>8} {:>12}",
        "stage", "committed", "stale", "failed", "pending", "rows_in", "rows_out", "dropped", "quarantined"
    );
    for st in stages {
        let _ = writeln!(
            s,
            "{:<10} {:>9} {:>6} {:>7} {:>8} {:>10} {:>10} {:>8} {:>12}",
            st.stage,
            format!("{}/{}", st.committed, st.units),
            st.stale,
            st.failed,
            st.pending,
            st.counts.rows_in,
            st.counts.rows_out,
            st.counts.dropped_total(),
            st.counts.quarantined
        );
    }
    for st in stages {
        if let Some(e) = &st.last_error {
            let _ = writeln!(s, "last error in {}: {e}", st.stage);
        }
    }
    s
}
