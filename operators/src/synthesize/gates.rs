//! Quality gates on generated text. Each gate is a named check recorded per row
//! (`synthetic.gates`); the config chooses which of them drop the row (counted under the gate's
//! name, never silently).

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The gates, in the order they are reported.
pub const GATES: [&str; 5] = ["empty", "truncated", "repetitive", "format", "language"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateSettings {
    /// `empty`: fewer characters than this after trimming.
    pub min_chars: usize,
    /// `repetitive`: a line of 10+ characters repeated this many times, or (from 40 words on)
    /// fewer distinct word 4-grams than `min_distinct_4grams` of all.
    pub max_line_repeats: usize,
    pub min_distinct_4grams: f64,
    /// `language`: fewer ASCII letters among all letters than this share (0 turns it off).
    pub min_ascii_letters: f64,
    /// Gates that drop the row.
    pub drop: Vec<String>,
}

impl Default for GateSettings {
    fn default() -> Self {
        GateSettings {
            min_chars: 32,
            max_line_repeats: 3,
            min_distinct_4grams: 0.3,
            min_ascii_letters: 0.6,
            drop: GATES.iter().map(|g| g.to_string()).collect(),
        }
    }
}

impl GateSettings {
    pub fn validate(&self) -> Result<(), String> {
        for g in &self.drop {
            if !GATES.contains(&g.as_str()) {
                return Err(format!("unknown gate {g:?}; the gates are {GATES:?}"));
            }
        }
        Ok(())
    }

    /// The gates `text` fails. `truncated` comes from the finish reason; `format_ok` is the
    /// kind's own format check.
    pub fn check(&self, text: &str, truncated: bool, format_ok: bool) -> Vec<&'static str> {
        let mut failed = Vec::new();
        if text.trim().chars().count() < self.min_chars {
            failed.push("empty");
        }
        if truncated {
            failed.push("truncated");
        }
        if self.repetitive(text) {
            failed.push("repetitive");
        }
        if !format_ok || text.contains("<|im_") || text.contains("<|endoftext|>") || echoes_prompt(text) {
            failed.push("format");
        }
        if self.min_ascii_letters > 0.0 {
            let letters = text.chars().filter(|c| c.is_alphabetic()).count();
            let ascii = text.chars().filter(|c| c.is_ascii_alphabetic()).count();
            if letters >= 20 && (ascii as f64) < self.min_ascii_letters * letters as f64 {
                failed.push("language");
            }
        }
        failed
    }

    fn repetitive(&self, text: &str) -> bool {
        let mut lines: HashMap<&str, usize> = HashMap::new();
        for line in text.lines().map(str::trim).filter(|l| l.chars().count() >= 10) {
            let n = lines.entry(line).or_default();
            *n += 1;
            if *n >= self.max_line_repeats.max(2) {
                return true;
            }
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        if words.len() >= 40 {
            let grams: Vec<&[&str]> = words.windows(4).collect();
            let distinct: std::collections::HashSet<&[&str]> = grams.iter().copied().collect();
            if (distinct.len() as f64) < self.min_distinct_4grams * grams.len() as f64 {
                return true;
            }
        }
        false
    }

    /// Whether a row that failed `failed` is dropped, and under which gate's name.
    pub fn dropped_by(&self, failed: &[&'static str]) -> Option<&'static str> {
        failed.iter().copied().find(|g| self.drop.iter().any(|d| d == g))
    }
}

/// The output repeats our templates' scaffolding (the `<<<` / `>>>` fences around the input, or
/// the `Source text:` label) instead of writing new text.
fn echoes_prompt(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        l == "<<<" || l == ">>>" || l.starts_with("<<<<") || l.starts_with("Source text:")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_gate_fires_on_its_case_only() {
        let g = GateSettings::default();
        let good = "Photosynthesis lets plants turn light, water and air into sugar and oxygen. It feeds almost every living thing.";
        assert!(g.check(good, false, true).is_empty());
        assert_eq!(g.check("  ok ", false, true), ["empty"]);
        assert_eq!(g.check(good, true, true), ["truncated"]);
        let loop_text = "the sea is calm today. ".repeat(30);
        assert!(g.check(&loop_text, false, true).contains(&"repetitive"));
        let lines = "A line that repeats itself\n".repeat(3);
        assert!(
            g.check(&format!("{good}\n{lines}"), false, true)
                .contains(&"repetitive")
        );
        assert_eq!(g.check(good, false, false), ["format"]);
        assert!(g.check(&format!("{good}<|im_end|>"), false, true).contains(&"format"));
        assert!(g.check(&format!("<<<<\n{good}\n>>>>"), false, true).contains(&"format"));
        assert!(
            g.check(&format!("{good}\n\nSource text:\n{good}"), false, true)
                .contains(&"format")
        );
        assert!(
            g.check(&format!("> quoted mail line\n>> older\n{good}"), false, true)
                .is_empty()
        );
        assert_eq!(
            g.check(
                "Фотосинтез позволяет растениям превращать свет в сахар и кислород.",
                false,
                true
            ),
            ["language"]
        );
        assert_eq!(g.dropped_by(&["truncated", "format"]), Some("truncated"));
        let keep_truncated = GateSettings {
            drop: vec!["format".into()],
            ..GateSettings::default()
        };
        assert_eq!(keep_truncated.dropped_by(&["truncated"]), None);
        assert!(
            GateSettings {
                drop: vec!["nope".into()],
                ..GateSettings::default()
            }
            .validate()
            .is_err()
        );
    }
}
