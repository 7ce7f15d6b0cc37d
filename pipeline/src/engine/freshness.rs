//! The one decision of the engine: is a unit's committed result still current, and if not, why?
//!
//! `safepipe run` uses it to choose its work, `safepipe status` to predict that work, the SQL
//! catalog to mark `stats.current`, and the pack stage for its single global unit. A result is
//! current exactly when
//! - it is not forced, its record is valid and all its files are present,
//! - its stamp's fingerprint equals the stage's current fingerprint (settings, plan, upstream
//!   fingerprints, code version), and
//! - the upstream records it was made from are the ones committed now (compared by the content
//!   digest of each record, never by timestamps from different machines), and
//! - the stage does not ask for it to be redone ([`crate::stages::Stage::incomplete`]).

use crate::engine::records::{Committed, Stamp};
use crate::engine::run_dir::{RunDir, StageFiles};
use crate::error::Result;
use crate::stages::{Fingerprint, Node, Scope, StageGraph};
use std::collections::{BTreeMap, HashMap};

/// Why a unit needs work; the text is what `run` and `status` print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Why {
    /// No record yet.
    New,
    /// `--force` named this stage or one upstream of it.
    Forced,
    /// The record is unreadable, of an older layout, or names a missing file.
    Damaged,
    /// The stage's own settings changed.
    SettingsChanged,
    /// An upstream stage's settings (or the code) changed.
    UpstreamChanged,
    /// An upstream unit was redone (same fingerprint, new result): this result is stale.
    UpstreamRedone,
    /// The stage asked to redo it (e.g. failed LLM requests to retry).
    RetryFailed,
}

impl Why {
    pub fn as_str(self) -> &'static str {
        match self {
            Why::New => "new",
            Why::Forced => "forced",
            Why::Damaged => "damaged",
            Why::SettingsChanged => "settings changed",
            Why::UpstreamChanged => "upstream changed",
            Why::UpstreamRedone => "upstream redone",
            Why::RetryFailed => "retry failed requests",
        }
    }
}

impl std::fmt::Display for Why {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The verdict on one (stage, unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Committed and current: no work.
    Current,
    /// Needs work, for this reason.
    Redo(Why),
}

/// What is known of one (stage, unit) when judging it.
pub struct Case<'a> {
    /// Its committed stamp, if a valid record with all files exists.
    pub stamp: Option<&'a Stamp>,
    /// A record exists but cannot count (see [`Why::Damaged`]).
    pub damaged: bool,
    /// `--force` covers the stage.
    pub forced: bool,
    /// The stage's own "redo this" (only asked when the stamp is otherwise current).
    pub incomplete: bool,
}

/// Judges one (stage, unit) against the stage's current fingerprint and the digests of the
/// upstream records committed now (stage name -> digest); `None` when some upstream unit is not
/// current (it will be redone first, so a result made from the old one is stale).
pub fn judge(case: &Case<'_>, current: &Fingerprint, upstream: Option<&BTreeMap<String, String>>) -> Verdict {
    if case.forced {
        return Verdict::Redo(Why::Forced);
    }
    let Some(stamp) = case.stamp else {
        return Verdict::Redo(if case.damaged { Why::Damaged } else { Why::New });
    };
    if stamp.fingerprint != current.stage {
        return Verdict::Redo(if stamp.settings_fingerprint != current.settings {
            Why::SettingsChanged
        } else {
            Why::UpstreamChanged
        });
    }
    if upstream != Some(&stamp.upstream) {
        return Verdict::Redo(Why::UpstreamRedone);
    }
    if case.incomplete {
        return Verdict::Redo(Why::RetryFailed);
    }
    Verdict::Current
}

/// The upstream digests of one unit: for each upstream stage, the digest of its record if that
/// record is current; `None` when some upstream unit is not current (the unit must wait).
pub fn upstream_digests<'a>(
    upstream: impl IntoIterator<Item = (&'a str, Option<&'a Committed>)>,
) -> Option<BTreeMap<String, String>> {
    upstream
        .into_iter()
        .map(|(name, c)| c.map(|c| (name.to_string(), c.digest.clone())))
        .collect()
}

/// One stage judged over a set of units.
#[derive(Debug, Default)]
pub struct Judged {
    /// Units whose committed result is current, with it.
    pub current: HashMap<u32, Committed>,
    /// `current` plus the units whose result is current but incomplete (failed LLM requests to
    /// retry): what downstream stages may read until a retry replaces it.
    pub usable: HashMap<u32, Committed>,
    /// Units that need work, in the order given.
    pub todo: Vec<Todo>,
}

/// A unit that needs work: (unit, why, the upstream digests when every upstream unit is current
/// now; `None`: it waits for its upstream).
pub type Todo = (u32, Why, Option<BTreeMap<String, String>>);

/// Judges `units` of the per-unit stage `node`, whose records are `files`, given the current
/// results of its upstream stages (`upstream[i]` for `node.upstream[i]`).
pub fn judge_stage(
    node: &Node,
    fingerprint: &Fingerprint,
    files: &StageFiles,
    units: &[u32],
    forced: bool,
    upstream: &[&HashMap<u32, Committed>],
) -> Judged {
    let mut judged = Judged::default();
    for &unit in units {
        let digests = upstream_digests(
            node.upstream
                .iter()
                .zip(upstream)
                .map(|(name, current)| (*name, current.get(&unit))),
        );
        let committed = files.done.get(&unit);
        let case = Case {
            stamp: committed.map(|c| &c.record.stamp),
            damaged: files.damaged.contains_key(&unit),
            forced,
            incomplete: committed.is_some_and(|c| node.stage.incomplete(&c.record)),
        };
        match (judge(&case, fingerprint, digests.as_ref()), committed) {
            (Verdict::Current, Some(c)) => {
                judged.current.insert(unit, c.clone());
                judged.usable.insert(unit, c.clone());
            }
            (Verdict::Redo(why), committed) => {
                if let (Why::RetryFailed, Some(c)) = (why, committed) {
                    judged.usable.insert(unit, c.clone());
                }
                judged.todo.push((unit, why, digests));
            }
            (Verdict::Current, None) => unreachable!("judge says current only for a committed stamp"),
        }
    }
    judged
}

/// Every per-unit stage of `graph` judged over `units`, in graph order (`None` for the global
/// stage: [`crate::pack::PackView`] judges it), as `safepipe run` would find them if it ran now
/// with `forced` stages (and every unit it redoes succeeded): what `status` shows. With
/// `use_incomplete`, downstream stages are judged against incomplete results too (what is
/// committed now, for the pack stage) instead of waiting for their retry.
pub async fn survey(
    run_dir: &RunDir,
    graph: &StageGraph,
    fingerprints: &[Fingerprint],
    units: &[u32],
    forced: &[&str],
    use_incomplete: bool,
) -> Result<Vec<Option<(StageFiles, Judged)>>> {
    let mut out: Vec<Option<(StageFiles, Judged)>> = Vec::new();
    for (node, fingerprint) in graph.nodes.iter().zip(fingerprints) {
        if matches!(node.scope, Scope::Global) {
            out.push(None);
            continue;
        }
        let files = run_dir.stage(node.name()).await?;
        let upstream: Vec<&HashMap<u32, Committed>> = node
            .upstream
            .iter()
            .map(|name| {
                let i = graph.position(name).expect("resolved when the graph was built");
                let (_, judged) = out[i].as_ref().expect("a per-unit stage reads per-unit stages");
                if use_incomplete {
                    &judged.usable
                } else {
                    &judged.current
                }
            })
            .collect();
        let judged = judge_stage(
            node,
            fingerprint,
            &files,
            units,
            forced.contains(&node.name()),
            &upstream,
        );
        out.push(Some((files, judged)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(stage: &str, settings: &str) -> Fingerprint {
        Fingerprint {
            stage: stage.into(),
            settings: settings.into(),
        }
    }

    fn stamp(stage: &str, settings: &str, up: &[(&str, &str)]) -> Stamp {
        Stamp {
            fingerprint: stage.into(),
            settings_fingerprint: settings.into(),
            upstream: up.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        }
    }

    fn case(stamp: Option<&Stamp>) -> Case<'_> {
        Case {
            stamp,
            damaged: false,
            forced: false,
            incomplete: false,
        }
    }

    #[test]
    fn every_reason_in_order() {
        let now = fp("F", "S");
        let up: BTreeMap<String, String> = [("ingest".to_string(), "d1".to_string())].into();
        let good = stamp("F", "S", &[("ingest", "d1")]);
        assert_eq!(judge(&case(Some(&good)), &now, Some(&up)), Verdict::Current);
        assert_eq!(judge(&case(None), &now, Some(&up)), Verdict::Redo(Why::New));
        let damaged = Case {
            damaged: true,
            ..case(None)
        };
        assert_eq!(judge(&damaged, &now, Some(&up)), Verdict::Redo(Why::Damaged));
        let forced = Case {
            forced: true,
            ..case(Some(&good))
        };
        assert_eq!(judge(&forced, &now, Some(&up)), Verdict::Redo(Why::Forced));
        let settings = stamp("G", "T", &[("ingest", "d1")]);
        assert_eq!(
            judge(&case(Some(&settings)), &now, Some(&up)),
            Verdict::Redo(Why::SettingsChanged)
        );
        let upstream = stamp("G", "S", &[("ingest", "d1")]);
        assert_eq!(
            judge(&case(Some(&upstream)), &now, Some(&up)),
            Verdict::Redo(Why::UpstreamChanged)
        );
        let redone = stamp("F", "S", &[("ingest", "d0")]);
        assert_eq!(
            judge(&case(Some(&redone)), &now, Some(&up)),
            Verdict::Redo(Why::UpstreamRedone)
        );
        let incomplete = Case {
            incomplete: true,
            ..case(Some(&good))
        };
        assert_eq!(judge(&incomplete, &now, Some(&up)), Verdict::Redo(Why::RetryFailed));
        // An upstream that will be redone first makes a current-looking result stale.
        assert_eq!(
            judge(&case(Some(&good)), &now, None),
            Verdict::Redo(Why::UpstreamRedone)
        );
    }

    #[test]
    fn a_missing_upstream_blocks() {
        assert_eq!(upstream_digests([("a", None)]), None);
        assert_eq!(upstream_digests(std::iter::empty()), Some(BTreeMap::new()));
    }
}
