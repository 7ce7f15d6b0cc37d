//! **tag**: documents routed `tag` or `also_tag` -> `tagged`, the harmfulness tag inserted between words
//! (Algorithm 1 of the Safety Pretraining paper).
//!
//! For a text of words w1..wn (maximal runs of non-whitespace), w1 is emitted as is; before each
//! later word the tag is inserted with probability `p`. The tag goes at the end of the preceding
//! word, before the whitespace (`w1<tag> w2`), so every original byte and every word's leading
//! space stay exactly as they were: removing the tag string gives back the input text, and a
//! tokenizer sees the same word tokens with the tag token between them.
//!
//! The random draws come from SplitMix64 seeded by SHA-256(run seed, document id), so the output
//! is identical across reruns, ranks, batch sizes and machines. Cost: one pass over the text.

use crate::{OpResult, schema};
use arrow::array::{Array, AsArray, ListBuilder, RecordBatch, StringBuilder, UInt32Builder};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use safepipe_model::rng::SplitMix64;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// The query that picks this unit's documents to tag: routed `tag`, or by a rule with
/// `also_tag` (`routes.also_tag`). Documents and routes are matched by
/// position as well as id (routes are written in documents order), so duplicate ids stay exact.
pub const SELECT_TAGGED: &str = "WITH d AS (SELECT id, text, source, row_number() OVER () AS n FROM documents), \
     r AS (SELECT id, route, also_tag, row_number() OVER () AS n FROM routes) \
     SELECT d.id, d.text, d.source FROM d JOIN r ON d.n = r.n AND d.id = r.id WHERE r.also_tag ORDER BY d.n";

/// The paper's tag string.
pub use safepipe_model::tokenizer::DEFAULT_TAG;

/// Tags texts with probability `probability` per word boundary.
#[derive(Clone, Debug, PartialEq)]
pub struct Tagger {
    pub tag: String,
    pub probability: f64,
    pub seed: u64,
}

/// The result for one text.
#[derive(Debug, PartialEq, Eq)]
pub struct Tagged {
    pub text: String,
    pub words: u32,
    pub tags: u32,
    /// Byte offset in `text` of each inserted tag, increasing.
    pub offsets: Vec<u32>,
}

impl Tagger {
    /// Checks the settings; the error names the config key.
    pub fn new(tag: String, probability: f64, seed: u64) -> Result<Self, String> {
        if !(0.0..=1.0).contains(&probability) {
            return Err(format!("tag.probability = {probability} must be between 0 and 1"));
        }
        if tag.trim().is_empty() {
            return Err("tag.tag must not be empty".into());
        }
        Ok(Tagger { tag, probability, seed })
    }

    fn rng(&self, id: &str) -> SplitMix64 {
        let mut hasher = Sha256::new();
        hasher.update(self.seed.to_le_bytes());
        hasher.update(id.as_bytes());
        let digest = hasher.finalize();
        SplitMix64(u64::from_le_bytes(digest[..8].try_into().expect("32-byte digest")))
    }

    /// Tags one text; the same (seed, id, text) always gives the same result.
    pub fn tag(&self, id: &str, text: &str) -> Tagged {
        let mut rng = self.rng(id);
        // A draw below `threshold` inserts the tag (p = 1 always does).
        let threshold = (self.probability * 2f64.powi(64)).min(u64::MAX as f64) as u64;
        let always = self.probability >= 1.0;
        let mut out = String::with_capacity(text.len() + text.len() / 64);
        let (mut words, mut tags) = (0u32, 0u32);
        let mut in_word = false;
        // End of the last word written so far, where a tag for the next word goes.
        let mut last_word_end: Option<usize> = None;
        let mut copied = 0; // bytes of `text` already in `out`
        let mut offsets = Vec::new();
        for (i, c) in text.char_indices() {
            let space = c.is_whitespace();
            if !space && !in_word {
                words += 1;
                if let Some(end) = last_word_end {
                    let draw = rng.next_u64();
                    if always || draw < threshold {
                        out.push_str(&text[copied..end]);
                        // Texts are Arrow strings (< 2 GiB), so offsets fit in u32.
                        offsets.push(u32::try_from(out.len()).unwrap_or(u32::MAX));
                        out.push_str(&self.tag);
                        copied = end;
                        tags += 1;
                    }
                }
            }
            if space && in_word {
                last_word_end = Some(i);
            }
            in_word = !space;
        }
        out.push_str(&text[copied..]);
        Tagged {
            text: out,
            words,
            tags,
            offsets,
        }
    }
}

impl Tagger {
    /// Tags a batch of `(id, text, source)` rows into a `tagged` batch.
    pub fn tag_batch(&self, batch: &RecordBatch) -> OpResult<RecordBatch> {
        let id = cast(batch.column(0), &DataType::Utf8)?;
        let text = cast(batch.column(1), &DataType::Utf8)?;
        let source = cast(batch.column(2), &DataType::Utf8)?;
        let (id, text, source) = (
            id.as_string::<i32>(),
            text.as_string::<i32>(),
            source.as_string::<i32>(),
        );
        let mut out_text = StringBuilder::new();
        let mut words = UInt32Builder::new();
        let mut tags = UInt32Builder::new();
        let mut offsets = ListBuilder::new(UInt32Builder::new());
        for row in 0..batch.num_rows() {
            let tagged = self.tag(id.value(row), text.value(row));
            out_text.append_value(&tagged.text);
            words.append_value(tagged.words);
            tags.append_value(tagged.tags);
            offsets.values().append_slice(&tagged.offsets);
            offsets.append(true);
        }
        let ids = Arc::new(id.clone()) as Arc<dyn Array>;
        let sources = Arc::new(source.clone()) as Arc<dyn Array>;
        Ok(RecordBatch::try_new(
            schema::TAGGED.clone(),
            vec![
                ids,
                sources,
                Arc::new(out_text.finish()),
                Arc::new(words.finish()),
                Arc::new(tags.finish()),
                Arc::new(offsets.finish()),
            ],
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagger(p: f64) -> Tagger {
        Tagger::new(DEFAULT_TAG.into(), p, 7).unwrap()
    }

    #[test]
    fn removing_the_tags_gives_back_the_text_exactly() {
        let text = "  first\tsecond  third\n\nfourth é5 ☃ last ";
        let t = tagger(1.0).tag("doc", text);
        assert_eq!(t.words, 7);
        assert_eq!(t.tags, 6);
        assert_eq!(t.text.replace(DEFAULT_TAG, ""), text);
        assert!(
            t.text.starts_with("  first<potentially unsafe content>\tsecond"),
            "{}",
            t.text
        );
        let none = tagger(0.0).tag("doc", text);
        assert_eq!((none.text.as_str(), none.tags), (text, 0));
        // The offsets point at the inserted tags, and only at them: a tag string that was in
        // the document already is not one of them.
        let literal = format!("a{DEFAULT_TAG} b c");
        let t = tagger(1.0).tag("doc", &literal);
        assert_eq!(t.offsets.len() as u32, t.tags);
        assert_eq!(t.tags, t.words - 1);
        for &at in &t.offsets {
            assert!(t.text[at as usize..].starts_with(DEFAULT_TAG));
        }
        assert!(
            !t.offsets.contains(&1),
            "the literal tag at byte 1 is not an inserted one"
        );
        assert!(t.offsets.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn deterministic_per_seed_and_id() {
        let text = "a b c d e f g h i j k l m n o p q r s t u v w x y z ".repeat(20);
        let a = tagger(0.3).tag("x", &text);
        assert_eq!(a, tagger(0.3).tag("x", &text));
        assert_ne!(a.text, tagger(0.3).tag("y", &text).text);
        assert_ne!(
            a.text,
            Tagger::new(DEFAULT_TAG.into(), 0.3, 8).unwrap().tag("x", &text).text
        );
    }

    #[test]
    fn rate_over_a_million_words_is_within_half_a_point_of_p() {
        for p in [0.03, 0.05, 0.10] {
            let t = tagger(p);
            let text = "word ".repeat(10_000);
            let (mut boundaries, mut tags) = (0u64, 0u64);
            for doc in 0..110 {
                let r = t.tag(&format!("doc-{doc}"), &text);
                boundaries += u64::from(r.words - 1);
                tags += u64::from(r.tags);
            }
            assert!(boundaries >= 1_000_000);
            let rate = tags as f64 / boundaries as f64;
            assert!((rate - p).abs() < 0.005, "p = {p}: measured {rate}");
        }
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(
            Tagger::new(DEFAULT_TAG.into(), 1.5, 0)
                .unwrap_err()
                .contains("tag.probability")
        );
        assert!(Tagger::new(" ".into(), 0.05, 0).is_err());
    }
}
