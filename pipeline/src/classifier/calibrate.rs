//! The decision threshold of a trained head, chosen on calibration documents (in
//! `safepipe classifier train`, the out-of-fold judgements), and the per-group rates it reports.
//!
//! A document is flagged (score >= 1) when its worst chunk's most probable label is not the
//! safe one (label 0). Adding `offset` to the safe label's bias flags exactly the documents
//! whose margin, the largest `max(unsafe logits) - safe logit` over their chunks, exceeds
//! `offset`. [`choose_offset`] takes the offset that flags the most unsafe calibration documents
//! while keeping the false-positive rate of every group's safe calibration documents at or below
//! that group's target, and among offsets that flag the same unsafe documents the highest (the
//! fewest false positives): the Neyman-Pearson choice, made per group.

use serde::Serialize;
use std::collections::BTreeMap;

/// One judged document.
#[derive(Debug, Clone)]
pub struct Judged<'a> {
    pub label: usize,
    pub group: &'a str,
    /// The largest `max(unsafe logits) - safe logit` over the document's chunks (negative
    /// infinity for a document without chunks, which is never flagged). The score stage gives
    /// the document a score >= 1 exactly when this exceeds 0 (on ties the safe label, first,
    /// wins), so the document is flagged at offset `t` when it exceeds `t`.
    pub margin: f32,
}

/// `max(unsafe logits) - safe logit` of one chunk.
pub fn chunk_margin(logits: &[f32]) -> f32 {
    logits[1..].iter().copied().fold(f32::NEG_INFINITY, f32::max) - logits[0]
}

/// The margin of one document from its chunks' logits.
pub fn margin(chunk_logits: &[Vec<f32>]) -> f32 {
    chunk_logits
        .iter()
        .map(|l| chunk_margin(l))
        .fold(f32::NEG_INFINITY, f32::max)
}

/// Logit units added above the chosen margin, so that float rounding when the head's bias is
/// updated cannot flag the document that sits exactly at the threshold.
const CLEARANCE: f32 = 1e-4;

/// False-positive targets: one for every group, and overrides for named groups.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    pub default: f64,
    pub groups: BTreeMap<String, f64>,
}

impl Targets {
    pub fn of(&self, group: &str) -> f64 {
        self.groups.get(group).copied().unwrap_or(self.default)
    }
}

/// The offset described in the module docs. A group of n safe documents allows
/// floor(target x n) flagged ones.
pub fn choose_offset(docs: &[Judged], targets: &Targets) -> f32 {
    let mut safe: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for d in docs.iter().filter(|d| d.label == 0) {
        safe.entry(d.group).or_default().push(d.margin);
    }
    // The lowest offset every group's target allows.
    let mut lowest = f32::NEG_INFINITY;
    for (group, margins) in safe.iter_mut() {
        margins.sort_by(|a, b| b.total_cmp(a));
        let allowed = (targets.of(group) * margins.len() as f64 + 1e-9).floor() as usize;
        // Flagging at most `allowed` documents: the threshold sits at the next largest margin.
        if let Some(&m) = margins.get(allowed)
            && m.is_finite()
        {
            lowest = lowest.max(m + CLEARANCE);
        }
    }
    // Raise it to just below the least unsafe margin it flags: the same unsafe documents, fewer
    // false positives.
    let least_flagged = docs
        .iter()
        .filter(|d| d.label > 0 && d.margin.is_finite() && d.margin > lowest)
        .map(|d| d.margin)
        .fold(f32::INFINITY, f32::min);
    match (lowest.is_finite(), least_flagged.is_finite()) {
        (_, true) => lowest.max(least_flagged - CLEARANCE),
        (true, false) => lowest,
        (false, false) => 0.0,
    }
}

/// How a head does on one group of documents.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupRates {
    pub group: String,
    pub safe_documents: usize,
    /// Safe documents flagged (score >= 1) and their fraction.
    pub false_positives: usize,
    pub false_positive_rate: f64,
    pub unsafe_documents: usize,
    /// Unsafe documents flagged and their fraction.
    pub caught: usize,
    pub unsafe_recall: f64,
}

/// Rates per group (sorted by name) with documents flagged when their margin exceeds
/// `offset`, then over all documents as group `"all"` when there is more than one group.
pub fn group_rates(docs: &[Judged], offset: f32) -> Vec<GroupRates> {
    let mut by_group: BTreeMap<&str, Vec<&Judged>> = BTreeMap::new();
    for d in docs {
        by_group.entry(d.group).or_default().push(d);
    }
    let mut out: Vec<GroupRates> = by_group.iter().map(|(g, ds)| rates(g, ds, offset)).collect();
    if by_group.len() > 1 {
        out.push(rates("all", &docs.iter().collect::<Vec<_>>(), offset));
    }
    out
}

fn rates(group: &str, docs: &[&Judged], offset: f32) -> GroupRates {
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let count = |unsafe_: bool, flagged: bool| {
        docs.iter()
            .filter(|d| (d.label > 0) == unsafe_ && (!flagged || d.margin > offset))
            .count()
    };
    let (safe, false_positives) = (count(false, false), count(false, true));
    let (unsafe_documents, caught) = (count(true, false), count(true, true));
    GroupRates {
        group: group.to_string(),
        safe_documents: safe,
        false_positives,
        false_positive_rate: ratio(false_positives, safe),
        unsafe_documents,
        caught,
        unsafe_recall: ratio(caught, unsafe_documents),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(label: usize, group: &str, margin: f32) -> Judged<'_> {
        Judged { label, group, margin }
    }

    #[test]
    fn the_margin_is_the_worst_chunks_gap_to_the_safe_logit() {
        assert_eq!(margin(&[vec![2.0, 1.0, 0.5], vec![0.0, 1.5, 3.0]]), 3.0);
        assert_eq!(margin(&[vec![2.0, 1.0, 0.5]]), -1.0);
        assert_eq!(margin(&[]), f32::NEG_INFINITY);
    }

    #[test]
    fn the_offset_is_the_smallest_that_meets_the_target_in_every_group() {
        // 10 safe mails, 3 of them with positive margins; 5 safe requests, 1 positive.
        let mut docs: Vec<Judged> = [-3.0, -2.0, -1.0, -0.5, -0.2, -0.1, 0.3, 0.8, 1.6, -4.0]
            .iter()
            .map(|&m| doc(0, "mail", m))
            .collect();
        docs.extend([-1.0, -2.0, 0.5, -3.0, -0.7].iter().map(|&m| doc(0, "request", m)));
        docs.push(doc(3, "request", 5.0));
        let uniform = |t: f64| Targets {
            default: t,
            groups: BTreeMap::new(),
        };
        // 10% of 10 mails allows 1 flagged: the threshold is the second largest mail margin.
        // 10% of 5 requests allows 0: the largest request margin (0.5). The stricter wins, and
        // the one unsafe document (5.0) is flagged at any offset below it: the highest is taken.
        let offset = choose_offset(&docs, &uniform(0.1));
        assert!((offset - (5.0 - CLEARANCE)).abs() < 1e-6, "{offset}");
        docs.push(doc(4, "mail", 1.0));
        docs.push(doc(4, "mail", 0.6));
        // Now the offset stops just below the least unsafe margin above 0.8 (1.0); 0.6 is lost.
        let offset = choose_offset(&docs, &uniform(0.1));
        assert!((offset - (1.0 - CLEARANCE)).abs() < 1e-6, "{offset}");
        // At that offset one mail and no request is flagged.
        let rates = group_rates(&docs, offset);
        assert_eq!(rates[0].false_positives, 1);
        assert_eq!((rates[0].unsafe_documents, rates[0].caught), (2, 1));
        assert_eq!(rates[1].false_positives, 0);
        assert_eq!((rates[1].unsafe_documents, rates[1].caught), (1, 1));
        assert_eq!(rates[2].group, "all");
        assert_eq!(rates[2].safe_documents, 15);
        // A looser target for requests alone changes nothing (mails bind); for both, the offset
        // falls below 0.6 so every unsafe document is flagged, as high as that allows.
        let requests = Targets {
            default: 0.1,
            groups: BTreeMap::from([("request".to_string(), 0.5)]),
        };
        assert!((choose_offset(&docs, &requests) - (1.0 - CLEARANCE)).abs() < 1e-6);
        let offset = choose_offset(&docs, &uniform(0.5));
        assert!((offset - (0.6 - CLEARANCE)).abs() < 1e-6, "{offset}");
        // Safe documents without chunks never set the threshold; nothing to flag: offset 0.
        assert_eq!(choose_offset(&[doc(0, "mail", f32::NEG_INFINITY)], &uniform(0.0)), 0.0);
    }
}
