//! The held-out evaluation split of an input: a seeded hash of each document's text puts it in
//! the training part or the evaluation part, the same way on every run and machine. The text, not
//! the id: corpora repeat texts under new ids (the sample's ham mails do), and a split by id would
//! put one copy in training and the other in the evaluation set. Ingest keeps
//! only the training part of an input with `holdout` (the evaluation part is counted as dropped,
//! `held_out`); `safepipe eval` reads the same files keeping only the evaluation part, so no
//! evaluation prompt can reach training through that input.

use crate::synthesize::seeded_unit;
use serde::{Deserialize, Serialize};

/// `[[inputs]] holdout = { fraction, seed }`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Holdout {
    /// The share of documents (by text) in the evaluation part, in (0, 1).
    pub fraction: f64,
    #[serde(default)]
    pub seed: u64,
}

/// Which part of a split input a reader keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Part {
    /// Ingest: everything but the evaluation part.
    #[default]
    Training,
    /// `safepipe eval`: the evaluation part only.
    Evaluation,
}

impl Holdout {
    pub fn check(&self) -> Result<(), String> {
        if !(self.fraction > 0.0 && self.fraction < 1.0) {
            return Err(format!("holdout.fraction = {} must be between 0 and 1", self.fraction));
        }
        Ok(())
    }

    /// Whether a document with this text belongs to the evaluation part.
    pub fn held_out(&self, text: &str) -> bool {
        seeded_unit(self.seed, "holdout", text) < self.fraction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_seeded_stable_and_close_to_its_fraction() {
        let h = Holdout {
            fraction: 0.2,
            seed: 17,
        };
        let texts: Vec<String> = (0..20_000).map(|i| format!("text number {i}")).collect();
        let held = texts.iter().filter(|t| h.held_out(t)).count();
        assert!((held as f64 / 20_000.0 - 0.2).abs() < 0.01, "{held}");
        assert!(texts.iter().all(|t| h.held_out(t) == h.held_out(t)));
        let other = Holdout { seed: 18, ..h };
        assert!(texts.iter().any(|t| h.held_out(t) != other.held_out(t)));
        assert!(Holdout { fraction: 1.0, seed: 0 }.check().is_err());
    }
}
