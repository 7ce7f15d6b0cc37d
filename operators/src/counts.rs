//! The counters every stage reports for every unit, and the accounting invariant checked on them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Rows a stage saw and where each one went. Invariant (checked by [`UnitCounts::check`]):
/// `rows_in = rows_out + sum(dropped) + quarantined`.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitCounts {
    /// Input records read (for ingest: lines or rows; a whole unreadable unit counts as its row
    /// count when known, else as one record).
    pub rows_in: u64,
    /// Rows passed on to the stage's main output.
    pub rows_out: u64,
    /// Rows removed on purpose, by the name of the rule that removed them.
    pub dropped: BTreeMap<String, u64>,
    /// Records set aside because they could not be used (each with a reason in `quarantine`).
    pub quarantined: u64,
    /// Other figures of the unit, outside the invariant (the synthesis stages: `cache_hits`,
    /// `retries`, `generated_tokens`); summed by [`UnitCounts::merge`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub figures: BTreeMap<String, u64>,
}

impl UnitCounts {
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    pub fn drop(&mut self, rule: &str, n: u64) {
        if n > 0 {
            *self.dropped.entry(rule.to_string()).or_default() += n;
        }
    }

    pub fn merge(&mut self, other: &UnitCounts) {
        self.rows_in += other.rows_in;
        self.rows_out += other.rows_out;
        self.quarantined += other.quarantined;
        for (rule, n) in &other.dropped {
            self.drop(rule, *n);
        }
        for (name, n) in &other.figures {
            *self.figures.entry(name.clone()).or_default() += n;
        }
    }

    /// Checks `in = out + dropped + quarantined`; the error text names all four numbers.
    pub fn check(&self) -> Result<(), String> {
        let accounted = self.rows_out + self.dropped_total() + self.quarantined;
        if accounted == self.rows_in {
            Ok(())
        } else {
            Err(format!(
                "accounting invariant broken: in {} != out {} + dropped {} + quarantined {}",
                self.rows_in,
                self.rows_out,
                self.dropped_total(),
                self.quarantined
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariant_holds_and_breaks() {
        let mut c = UnitCounts {
            rows_in: 10,
            rows_out: 6,
            quarantined: 1,
            ..Default::default()
        };
        c.drop("too_short", 3);
        assert!(c.check().is_ok());
        c.drop("too_short", 1);
        let err = c.check().unwrap_err();
        assert!(err.contains("in 10"), "{err}");
        let mut total = UnitCounts::default();
        total.merge(&c);
        total.merge(&c);
        assert_eq!(total.dropped["too_short"], 8);
        assert_eq!(total.rows_in, 20);
    }
}
