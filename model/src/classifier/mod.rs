//! The safety classifier: an ONNX model run through ONNX Runtime (`ort`), with the paper's
//! scoring semantics.
//!
//! Guarantees:
//! - a document is split into chunks of at most `max_length` tokens (special tokens included,
//!   consecutive windows sharing `overlap` tokens); every chunk gets a softmax over the labels;
//!   the document's `score` is the **maximum** chunk score, and its `probs`/`expected` are those
//!   of that worst chunk (ties: higher expected score, then the earlier chunk);
//! - a document with no tokens at all (empty, or only characters the tokenizer drops) has no
//!   chunks and scores 0 with `probs = [1, 0, ...]`: there is nothing in it to train on or to
//!   judge (docs/classifier.md);
//! - batches are built to a token budget over chunks sorted by length, so padding is small;
//!   in fp32 a chunk's result does not depend on which batch it lands in beyond ONNX Runtime's
//!   floating-point summation order (labels equal, probabilities within 1e-5, tested); int8
//!   models quantise activations with one scale per batch, so their results depend on the batch
//!   settings, which are then part of the fingerprint;
//! - a chunk with non-finite logits is an error, never a "safe" verdict;
//! - [`model_identity`] names the exact model (manifest, ONNX file, head, precision): the score
//!   stage's fingerprint.

mod head;
mod manifest;
mod metrics;
mod runtime;

pub use head::{Dense, Head, HeadTraining, train_head};
pub use manifest::{HeadSpec, Inputs, Manifest, OutputKind, Pooling};
pub use metrics::{HeadMetrics, evaluate};
pub use runtime::{BUNDLED_LIBRARY, Device, library_candidates};

use ort::session::Session;
use ort::value::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ClassifierError {
    #[error("{path}: {detail}")]
    Manifest { path: String, detail: String },
    #[error("cannot read {path}: {detail}")]
    Io { path: String, detail: String },
    #[error("{0}")]
    Runtime(String),
    #[error("tokenizing failed: {0}")]
    Tokenize(String),
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, ClassifierError>;

/// Weights of the model: the fp32 export or its dynamically quantised copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    Int8,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// How to run a classifier.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunOptions {
    pub precision: Precision,
    pub device: Device,
    /// ONNX Runtime intra-op threads; 0 = one per core.
    pub threads: usize,
    /// Padded tokens per batch (rows x longest row).
    pub batch_tokens: usize,
    /// Rows per batch at most.
    pub max_batch: usize,
    /// Tokens shared by consecutive chunks of a long document.
    pub overlap: usize,
    /// The ONNX Runtime library; `None` searches (see [`library_candidates`]).
    pub onnxruntime: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            precision: Precision::Fp32,
            device: Device::Cpu,
            threads: 0,
            batch_tokens: 16384,
            max_batch: 256,
            overlap: 0,
            onnxruntime: None,
        }
    }
}

/// The score of one document.
#[derive(Clone, Debug, PartialEq)]
pub struct DocumentScore {
    /// The worst chunk's score (0 for a document without tokens).
    pub score: u8,
    /// The worst chunk's label probabilities.
    pub probs: Vec<f32>,
    /// The worst chunk's expected score, `sum(p_i * score_i)`.
    pub expected: f32,
    pub chunks: u32,
    /// Content tokens of the document (special tokens not counted).
    pub tokens: u64,
}

/// Documents tokenized and cut into model-ready chunks (the CPU half of scoring, which can run
/// while the previous window is being inferred).
pub struct Prepared {
    /// Every chunk: (document index, token ids with special tokens).
    chunks: Vec<(usize, Vec<u32>)>,
    /// Content tokens per document.
    tokens: Vec<u64>,
}

impl Prepared {
    pub fn documents(&self) -> usize {
        self.tokens.len()
    }
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }
    /// Every chunk as (document index, token ids with special tokens), in document order.
    pub fn chunk_ids(&self) -> impl Iterator<Item = (usize, &[u32])> {
        self.chunks.iter().map(|(d, c)| (*d, c.as_slice()))
    }
    /// Tokens fed to the model (special tokens included, no padding).
    pub fn model_tokens(&self) -> u64 {
        self.chunks.iter().map(|(_, c)| c.len() as u64).sum()
    }
}

/// A loaded classifier.
pub struct Classifier {
    manifest: Manifest,
    options: RunOptions,
    tokenizer: Tokenizer,
    /// Special tokens the tokenizer puts before and after a single sequence.
    prefix: Vec<u32>,
    suffix: Vec<u32>,
    pad_id: u32,
    session: Mutex<Session>,
    head: Option<Head>,
    library: PathBuf,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("name", &self.manifest.name)
            .field("precision", &self.options.precision)
            .finish()
    }
}

impl Classifier {
    /// Loads the classifier manifest at `path`, its tokenizer, head and ONNX session.
    pub fn load(path: &Path, options: &RunOptions) -> Result<Classifier> {
        Self::open(Manifest::load(path)?, path, options)
    }

    /// Loads an encoder manifest (head optional): for [`Classifier::embed`].
    pub fn load_encoder(path: &Path, options: &RunOptions) -> Result<Classifier> {
        Self::open(Manifest::load_encoder(path)?, path, options)
    }

    fn open(manifest: Manifest, path: &Path, options: &RunOptions) -> Result<Classifier> {
        check_options(&manifest, path, options)?;
        let mut tokenizer = Tokenizer::from_file(&manifest.tokenizer).map_err(|e| ClassifierError::Manifest {
            path: manifest.tokenizer.display().to_string(),
            detail: e.to_string(),
        })?;
        let pad_id = tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| tokenizer.token_to_id("[PAD]"))
            .or_else(|| tokenizer.token_to_id("<pad>"))
            .unwrap_or(0);
        // Chunking is ours: the file's own padding/truncation (often fixed at 128) must not apply.
        tokenizer.with_padding(None);
        // A document that spells `[SEP]` or `[CLS]` gets those characters tokenized as text, not
        // the special tokens: text cannot forge the model's structure.
        tokenizer.set_encode_special_tokens(true);
        tokenizer
            .with_truncation(None)
            .map_err(|e| ClassifierError::Tokenize(e.to_string()))?;
        let (prefix, suffix) = special_wrap(&tokenizer)?;
        if prefix.len() + suffix.len() + 1 + options.overlap >= manifest.max_length {
            return Err(ClassifierError::Invalid(format!(
                "max_length = {} leaves no room for content after {} special tokens and overlap {}",
                manifest.max_length,
                prefix.len() + suffix.len(),
                options.overlap
            )));
        }
        let head = match &manifest.head {
            Some(spec) => Some(Head::load(&spec.path)?),
            None => None,
        };
        if let Some(h) = &head
            && h.labels() != manifest.labels()
        {
            return Err(ClassifierError::Invalid(format!(
                "{}: the head has {} labels but the manifest's scores list {}",
                manifest
                    .head
                    .as_ref()
                    .map(|s| s.path.display().to_string())
                    .unwrap_or_default(),
                h.labels(),
                manifest.labels()
            )));
        }
        let onnx = onnx_file(&manifest, path, options.precision)?;
        let session = runtime::session(&onnx, options.threads, options.device, options.onnxruntime.as_deref())?;
        let (_, library) = runtime::environment(options.onnxruntime.as_deref())?;
        for name in [
            Some(&manifest.inputs.input_ids),
            Some(&manifest.inputs.attention_mask),
            manifest.inputs.token_type_ids.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !session.inputs().iter().any(|i| i.name() == name) {
                return Err(ClassifierError::Invalid(format!(
                    "{}: the model has no input {name:?} (it has {})",
                    onnx.display(),
                    session
                        .inputs()
                        .iter()
                        .map(|i| i.name().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == manifest.output) {
            return Err(ClassifierError::Invalid(format!(
                "{}: the model has no output {:?}",
                onnx.display(),
                manifest.output
            )));
        }
        Ok(Classifier {
            manifest,
            options: options.clone(),
            tokenizer,
            prefix,
            suffix,
            pad_id,
            session: Mutex::new(session),
            head,
            library,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// `name@precision`, written to `scores.model`.
    pub fn model_id(&self) -> String {
        format!("{}@{}", self.manifest.name, self.options.precision.as_str())
    }

    /// The ONNX Runtime library in use.
    pub fn library(&self) -> &Path {
        &self.library
    }

    /// Content tokens per chunk.
    fn window(&self) -> usize {
        self.manifest.max_length - self.prefix.len() - self.suffix.len()
    }

    /// Tokenizes `texts` (on rayon's pool) and cuts them into chunks.
    pub fn prepare(&self, texts: &[&str]) -> Result<Prepared> {
        let encoded: Vec<Vec<u32>> = texts
            .par_iter()
            .map(|t| {
                self.tokenizer
                    .encode_fast(*t, false)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| ClassifierError::Tokenize(e.to_string()))
            })
            .collect::<Result<_>>()?;
        let (window, step) = (self.window(), self.window() - self.options.overlap);
        let mut chunks = Vec::new();
        let mut tokens = Vec::with_capacity(encoded.len());
        for (doc, ids) in encoded.iter().enumerate() {
            tokens.push(ids.len() as u64);
            let mut start = 0;
            while start < ids.len() {
                let end = (start + window).min(ids.len());
                let mut chunk = Vec::with_capacity(end - start + self.prefix.len() + self.suffix.len());
                chunk.extend_from_slice(&self.prefix);
                chunk.extend_from_slice(&ids[start..end]);
                chunk.extend_from_slice(&self.suffix);
                chunks.push((doc, chunk));
                if end == ids.len() {
                    break;
                }
                start += step;
            }
        }
        Ok(Prepared { chunks, tokens })
    }

    /// Scores prepared documents: batches by token budget over length-sorted chunks, softmax per
    /// chunk, maximum per document.
    pub fn score_prepared(&self, prepared: &Prepared) -> Result<Vec<DocumentScore>> {
        let rows: Vec<&[u32]> = prepared.chunks.iter().map(|(_, c)| c.as_slice()).collect();
        let logits = self.batched(&rows, |batch| self.logits(batch))?;
        let mut chunk_probs = Vec::with_capacity(logits.len());
        for (l, row) in logits.iter().zip(&rows) {
            if l.iter().any(|x| !x.is_finite()) {
                // A safety filter must not read a broken model as "safe".
                return Err(ClassifierError::Runtime(format!(
                    "the model returned non-finite logits {l:?} for a chunk of {} tokens",
                    row.len()
                )));
            }
            chunk_probs.push(softmax(l));
        }
        let mut worst: Vec<Option<(u8, f32, Vec<f32>)>> = vec![None; prepared.documents()];
        let mut counts = vec![0u32; prepared.documents()];
        for ((doc, _), probs) in prepared.chunks.iter().zip(chunk_probs) {
            counts[*doc] += 1;
            let (score, expected) = self.judge(&probs);
            if is_worse((score, expected), worst[*doc].as_ref().map(|(s, e, _)| (*s, *e))) {
                worst[*doc] = Some((score, expected, probs));
            }
        }
        Ok(worst
            .into_iter()
            .zip(counts)
            .zip(&prepared.tokens)
            .map(|((w, chunks), &tokens)| match w {
                Some((score, expected, probs)) => DocumentScore {
                    score,
                    probs,
                    expected,
                    chunks,
                    tokens,
                },
                None => {
                    // Nothing to judge: all mass on the safest label.
                    // cannot fail: the manifest check requires at least 2 labels.
                    let safest = (0..self.manifest.labels())
                        .min_by_key(|&i| self.manifest.scores[i])
                        .expect("at least 2 labels");
                    let mut probs = vec![0.0; self.manifest.labels()];
                    probs[safest] = 1.0;
                    DocumentScore {
                        score: self.manifest.scores[safest],
                        expected: self.manifest.scores[safest] as f32,
                        probs,
                        chunks: 0,
                        tokens,
                    }
                }
            })
            .collect())
    }

    /// The pooled embedding of every chunk of every text, per text in chunk order (empty for a
    /// text without tokens): what a head is trained and calibrated on.
    pub fn embed_chunks(&self, texts: &[&str]) -> Result<Vec<Vec<Vec<f32>>>> {
        let prepared = self.prepare(texts)?;
        let rows: Vec<&[u32]> = prepared.chunks.iter().map(|(_, c)| c.as_slice()).collect();
        let embeddings = self.batched(&rows, |batch| self.embed(batch))?;
        let mut out = vec![Vec::new(); texts.len()];
        for ((doc, _), e) in prepared.chunks.iter().zip(embeddings) {
            out[*doc].push(e);
        }
        Ok(out)
    }

    /// The chunk the score stage would judge worst among one document's chunk logits (highest
    /// score, then highest expected score, the earlier chunk on ties), with its score; `None`
    /// for a document without chunks. For evaluating a head before it is written to a manifest.
    pub fn worst_chunk(&self, chunk_logits: &[Vec<f32>]) -> Option<(usize, u8)> {
        let mut worst: Option<(usize, u8, f32)> = None;
        for (i, logits) in chunk_logits.iter().enumerate() {
            let (score, expected) = self.judge(&softmax(logits));
            if is_worse((score, expected), worst.map(|(_, s, e)| (s, e))) {
                worst = Some((i, score, expected));
            }
        }
        worst.map(|(i, s, _)| (i, s))
    }

    /// `run` over `rows` in batches planned by [`plan_batches`] (length-sorted, token budget);
    /// one output per row, in row order.
    fn batched(&self, rows: &[&[u32]], run: impl Fn(&[&[u32]]) -> Result<Vec<Vec<f32>>>) -> Result<Vec<Vec<f32>>> {
        let lengths: Vec<usize> = rows.iter().map(|r| r.len()).collect();
        let mut out = vec![Vec::new(); rows.len()];
        for batch in plan_batches(&lengths, self.options.batch_tokens, self.options.max_batch) {
            let picked: Vec<&[u32]> = batch.iter().map(|&i| rows[i]).collect();
            for (&i, v) in batch.iter().zip(run(&picked)?) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Scores `texts` (prepare + score).
    pub fn score(&self, texts: &[&str]) -> Result<Vec<DocumentScore>> {
        self.score_prepared(&self.prepare(texts)?)
    }

    /// The (score, expected score) of one chunk's probabilities: the argmax label's score
    /// (first on ties) and `sum(p_i * score_i)`.
    pub fn judge(&self, probs: &[f32]) -> (u8, f32) {
        let mut best = 0;
        for (i, p) in probs.iter().enumerate() {
            if *p > probs[best] {
                best = i;
            }
        }
        let expected = probs
            .iter()
            .zip(&self.manifest.scores)
            .map(|(p, s)| p * *s as f32)
            .sum();
        (self.manifest.scores[best], expected)
    }

    /// Logits of each row (one chunk each, special tokens included), padded into one batch.
    pub fn logits(&self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let out = self.run(rows)?;
        let width = out.first().map_or(0, Vec::len);
        match &self.head {
            Some(head) if width != head.input_width() => Err(ClassifierError::Invalid(format!(
                "the encoder's embeddings have {width} dimensions but the head expects {}",
                head.input_width()
            ))),
            Some(head) => Ok(out.iter().map(|x| head.apply(x, self.normalize())).collect()),
            None if self.manifest.output_kind == OutputKind::Logits && width != self.manifest.labels() => {
                Err(ClassifierError::Invalid(format!(
                    "the model returns {width} logits but the manifest's scores list {} labels",
                    self.manifest.labels()
                )))
            }
            None if self.manifest.output_kind == OutputKind::Logits => Ok(out),
            None => Err(ClassifierError::Invalid(
                "an encoder without a head has no logits (train one: safepipe classifier train)".into(),
            )),
        }
    }

    /// The pooled embeddings of rows (what the head sees, before its optional normalisation).
    /// For `output_kind = "logits"` models this is an error.
    pub fn embed(&self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if self.manifest.output_kind == OutputKind::Logits {
            return Err(ClassifierError::Invalid(
                "this model outputs logits, not embeddings: there is no head to train".into(),
            ));
        }
        self.run(rows)
    }

    fn normalize(&self) -> bool {
        self.manifest.head.as_ref().is_some_and(|h| h.normalize)
    }

    /// Runs the session on one padded batch and returns one vector per row: pooled embeddings
    /// (encoder outputs) or logits.
    fn run(&self, rows: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        let b = rows.len();
        let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if b == 0 || t == 0 {
            return Ok(vec![Vec::new(); b]);
        }
        if t > self.manifest.max_length {
            return Err(ClassifierError::Invalid(format!(
                "a row of {t} tokens is longer than max_length {}",
                self.manifest.max_length
            )));
        }
        let mut ids = vec![self.pad_id as i64; b * t];
        let mut mask = vec![0i64; b * t];
        for (r, row) in rows.iter().enumerate() {
            for (j, &id) in row.iter().enumerate() {
                ids[r * t + j] = id as i64;
                mask[r * t + j] = 1;
            }
        }
        let shape = [b as i64, t as i64];
        let tensor =
            |data: Vec<i64>| Tensor::from_array((shape, data)).map_err(|e| ClassifierError::Runtime(e.to_string()));
        let inputs = &self.manifest.inputs;
        let mut feed = vec![
            (inputs.input_ids.clone(), tensor(ids)?.into_dyn()),
            (inputs.attention_mask.clone(), tensor(mask.clone())?.into_dyn()),
        ];
        if let Some(name) = &inputs.token_type_ids {
            feed.push((name.clone(), tensor(vec![0i64; b * t])?.into_dyn()));
        }
        // cannot fail: the lock is poisoned only by a panic while it is held, and `run` does not panic.
        let mut session = self.session.lock().expect("session lock");
        let outputs = session
            .run(feed)
            .map_err(|e| ClassifierError::Runtime(format!("inference failed: {e}")))?;
        // cannot fail: `open` checked the session has this output.
        let (dims, data) = outputs[self.manifest.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(|e| ClassifierError::Runtime(format!("output {:?}: {e}", self.manifest.output)))?;
        let dims: Vec<usize> = dims
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| {
                ClassifierError::Invalid(format!(
                    "output {:?} has a negative dimension in {dims:?}",
                    self.manifest.output
                ))
            })?;
        // The output's data holds the product of its dimensions (ONNX Runtime's tensor), so the
        // row slices below stay within it once the shape matched.
        match self.manifest.output_kind {
            OutputKind::HiddenStates => {
                if dims.len() != 3 || dims[0] != b || dims[1] != t || dims[2] == 0 {
                    return Err(ClassifierError::Invalid(format!(
                        "output {:?} has shape {dims:?}, expected [{b}, {t}, hidden]",
                        self.manifest.output
                    )));
                }
                let h = dims[2];
                Ok((0..b)
                    .map(|r| {
                        pool(
                            &data[r * t * h..(r + 1) * t * h],
                            &mask[r * t..(r + 1) * t],
                            h,
                            self.manifest.pooling,
                        )
                    })
                    .collect())
            }
            OutputKind::Pooled | OutputKind::Logits => {
                if dims.len() != 2 || dims[0] != b || dims[1] == 0 {
                    return Err(ClassifierError::Invalid(format!(
                        "output {:?} has shape {dims:?}, expected [{b}, n]",
                        self.manifest.output
                    )));
                }
                Ok(data.chunks_exact(dims[1]).map(<[f32]>::to_vec).collect())
            }
        }
    }
}

/// Whether a chunk judged `(score, expected)` is worse than the worst so far: a higher score,
/// then a higher expected score; the earlier chunk wins ties.
fn is_worse(chunk: (u8, f32), so_far: Option<(u8, f32)>) -> bool {
    match so_far {
        None => true,
        Some((s, e)) => chunk.0 > s || (chunk.0 == s && chunk.1 > e),
    }
}

/// The special tokens the tokenizer's post-processor puts around a single sequence, found by
/// encoding a probe with and without them (works for BERT, RoBERTa, gte, e5 templates).
fn special_wrap(tokenizer: &Tokenizer) -> Result<(Vec<u32>, Vec<u32>)> {
    let err = |e: tokenizers::Error| ClassifierError::Tokenize(e.to_string());
    let probe = "probe";
    let bare = tokenizer.encode_fast(probe, false).map_err(err)?.get_ids().to_vec();
    let full = tokenizer.encode_fast(probe, true).map_err(err)?.get_ids().to_vec();
    let at = (0..=full.len().saturating_sub(bare.len()))
        .find(|&i| full[i..].starts_with(&bare))
        .ok_or_else(|| ClassifierError::Tokenize("cannot locate the text between the special tokens".into()))?;
    // cannot fail: `bare` was found at `at`, so `at + bare.len() <= full.len()`.
    Ok((full[..at].to_vec(), full[at + bare.len()..].to_vec()))
}

/// Batches over rows of the given lengths: rows sorted by length (longest first, ties by
/// index), cut greedily so that `rows x longest <= batch_tokens` and `rows <= max_batch`.
/// Every index appears in exactly one batch.
pub fn plan_batches(lengths: &[usize], batch_tokens: usize, max_batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lengths[i]), i));
    let mut batches = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for i in order {
        // Sorted longest first: the batch's first row is its longest.
        let longest = current.first().map_or(lengths[i], |&f| lengths[f]);
        if !current.is_empty() && ((current.len() + 1) * longest > batch_tokens || current.len() >= max_batch) {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

fn pool(hidden: &[f32], mask: &[i64], h: usize, pooling: Pooling) -> Vec<f32> {
    match pooling {
        Pooling::Cls => hidden[..h].to_vec(),
        Pooling::Mean => {
            let mut sum = vec![0.0f32; h];
            let mut n = 0.0f32;
            for (pos, &m) in mask.iter().enumerate() {
                if m != 0 {
                    n += 1.0;
                    for (s, x) in sum.iter_mut().zip(&hidden[pos * h..(pos + 1) * h]) {
                        *s += x;
                    }
                }
            }
            sum.iter_mut().for_each(|s| *s /= n.max(1.0));
            sum
        }
    }
}

/// Softmax in f64 for stability, returned as f32.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let exps: Vec<f64> = logits.iter().map(|&l| (l as f64 - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|e| (e / sum) as f32).collect()
}

/// Checks `options` against a manifest: overlap and batch budget versus the chunk length, the
/// int8 file for `precision = "int8"`. Called when a config loads and when a model loads.
pub fn check_options(manifest: &Manifest, path: &Path, options: &RunOptions) -> Result<()> {
    if options.overlap + 1 >= manifest.max_length {
        return Err(ClassifierError::Invalid(format!(
            "overlap = {} must be smaller than the chunk length ({} tokens)",
            options.overlap, manifest.max_length
        )));
    }
    if options.batch_tokens < manifest.max_length || options.max_batch == 0 {
        return Err(ClassifierError::Invalid(format!(
            "batch_tokens = {} must hold one chunk of {} tokens, and max_batch must be > 0",
            options.batch_tokens, manifest.max_length
        )));
    }
    onnx_file(manifest, path, options.precision).map(|_| ())
}

/// The ONNX file of `precision`, which must exist.
fn onnx_file(manifest: &Manifest, path: &Path, precision: Precision) -> Result<PathBuf> {
    let onnx = match precision {
        Precision::Fp32 => manifest.onnx.clone(),
        Precision::Int8 => manifest.onnx_int8.clone().ok_or_else(|| {
            ClassifierError::Invalid(format!(
                "{}: precision = \"int8\" needs `onnx_int8` in the manifest (make setup writes one for the demo model; \
                 model/export/bert_to_onnx.py --int8 or onnxruntime.quantization.quantize_dynamic make one)",
                path.display()
            ))
        })?,
    };
    if !onnx.is_file() {
        return Err(ClassifierError::Io {
            path: onnx.display().to_string(),
            detail: "no such file (run `make setup`)".into(),
        });
    }
    Ok(onnx)
}

/// The identity of a classifier as run with `options`: SHA-256 (16 hex digits) over the
/// manifest, the ONNX file of the chosen precision, the tokenizer, the head, the precision, the
/// chunk overlap and the device; for int8 also the batch settings (see [`RunOptions`]). fp32
/// batch sizes and threads are left out: they change nothing but floating-point summation order.
/// Reads the files and checks the options, loads no model.
pub fn model_identity(path: &Path, options: &RunOptions) -> Result<String> {
    let manifest = Manifest::load(path)?;
    check_options(&manifest, path, options)?;
    identity(path, &manifest, options)
}

/// The identity of an encoder manifest (head optional) as run with `options`, computed as
/// [`model_identity`] does: keys caches of embeddings, which change with any of those files.
pub fn encoder_identity(path: &Path, options: &RunOptions) -> Result<String> {
    let manifest = Manifest::load_encoder(path)?;
    check_options(&manifest, path, options)?;
    identity(path, &manifest, options)
}

/// SHA-256 of a (large) file, cached in `FILE.sha256` next to it as `size mtime-ns digest`: a
/// config load does not rehash a gigabyte model unless the file changed. A cache that cannot be
/// written (read-only model directory) only costs the rehash.
pub fn file_digest(path: &Path) -> Result<String> {
    let io = |e: std::io::Error| ClassifierError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let stamp = format!("{} {mtime}", meta.len());
    let cache = PathBuf::from(format!("{}.sha256", path.display()));
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Some(digest) = text.trim().strip_prefix(&format!("{stamp} "))
        && digest.len() == 64
        && digest.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Ok(digest.to_string());
    }
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut h = Sha256::new();
    std::io::copy(&mut file, &mut h).map_err(io)?;
    let digest = hex::encode(h.finalize());
    let _ = std::fs::write(&cache, format!("{stamp} {digest}\n"));
    Ok(digest)
}

fn identity(manifest_path: &Path, manifest: &Manifest, options: &RunOptions) -> Result<String> {
    let mut h = Sha256::new();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| ClassifierError::Io {
            path: p.display().to_string(),
            detail: e.to_string(),
        })
    };
    let onnx = onnx_file(manifest, manifest_path, options.precision)?;
    h.update(read(manifest_path)?);
    // The ONNX file can be gigabytes: its digest is cached beside it (see `file_digest`).
    h.update(file_digest(&onnx)?);
    for file in [Some(&manifest.tokenizer), manifest.head.as_ref().map(|h| &h.path)]
        .into_iter()
        .flatten()
    {
        h.update(read(file)?);
    }
    h.update(format!(
        "{}|{}|{:?}",
        options.precision.as_str(),
        options.overlap,
        options.device
    ));
    if options.precision == Precision::Int8 {
        // Dynamic quantisation takes one activation scale per tensor, i.e. per batch: int8
        // results depend on which chunks share a batch, so the batch settings are part of them.
        h.update(format!("|{}|{}", options.batch_tokens, options.max_batch));
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_every_row_once_within_the_budget() {
        let lengths = [5, 130, 7, 128, 3, 64, 64, 1, 200, 9];
        for (budget, max) in [(256, 4), (200, 100), (1000, 2), (200, 1)] {
            let batches = plan_batches(&lengths, budget, max);
            let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
            seen.sort();
            assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>());
            for b in &batches {
                let longest = b.iter().map(|&i| lengths[i]).max().unwrap();
                assert!(b.len() <= max);
                assert!(b.len() == 1 || b.len() * longest <= budget, "{b:?} over {budget}");
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let p = softmax(&[1000.0, 999.0, -1000.0, 0.0, 3.0, 2.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(p[0] > p[1] && p[1] > p[4]);
    }
}
