//! Chunk embeddings of the labelled texts, optionally cached in one safetensors file
//! (`classifier train --embeddings-cache FILE`), so retraining a head with other settings, or
//! on a table with a few rows added, does not re-run the encoder over every text (minutes on
//! CPU).
//!
//! The file holds `embeddings` (F32 `[chunks, hidden]`), `chunks` (I64 `[texts]`, chunks per
//! text) and `digests` (U8 `[texts, 32]`, the SHA-256 of each text), and in its metadata the
//! encoder's identity (its files, precision and chunk overlap). A text is taken from the file
//! only when its digest is there under the same encoder identity; the rest are embedded, and the
//! file is rewritten with exactly the current texts. A file that cannot be read is ignored and
//! replaced: a cache can cost time, never change a result.

use crate::error::{Error, Result};
use crate::progress::step_bar;
use safepipe_model::classifier::Classifier;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::Path;

/// Every chunk's embedding per text (empty for a text without tokens).
pub type ChunkEmbeddings = Vec<Vec<Vec<f32>>>;

/// Texts embedded per call (progress granularity).
const WINDOW: usize = 256;

type Digest32 = [u8; 32];

/// The embeddings of `texts`, from `cache` for the texts it holds under this encoder.
pub fn embed(classifier: &Classifier, identity: &str, texts: &[&str], cache: Option<&Path>) -> Result<ChunkEmbeddings> {
    let digests: Vec<Digest32> = texts.iter().map(|t| Sha256::digest(t.as_bytes()).into()).collect();
    let mut known: HashMap<Digest32, Vec<Vec<f32>>> = match cache.filter(|p| p.exists()) {
        Some(path) => read(path, identity).unwrap_or_else(|why| {
            eprintln!("embeddings: not using {} ({why}); embedding again", path.display());
            HashMap::new()
        }),
        None => HashMap::new(),
    };
    // Each distinct missing text once.
    let mut missing: Vec<usize> = Vec::new();
    let mut queued = std::collections::HashSet::new();
    for (i, d) in digests.iter().enumerate() {
        if !known.contains_key(d) && queued.insert(*d) {
            missing.push(i);
        }
    }
    if let Some(path) = cache {
        let cached = digests.iter().filter(|d| known.contains_key(*d)).count();
        eprintln!("embeddings: {cached} of {} texts from {}", texts.len(), path.display());
    }
    let bar = step_bar(missing.len() as u64, "embed");
    for window in missing.chunks(WINDOW) {
        let batch: Vec<&str> = window.iter().map(|&i| texts[i]).collect();
        let embedded = classifier
            .embed_chunks(&batch)
            .map_err(|e| Error::Execution(e.to_string()))?;
        for (&i, chunks) in window.iter().zip(embedded) {
            known.insert(digests[i], chunks);
        }
        bar.inc(window.len() as u64);
    }
    bar.finish_and_clear();
    // cannot fail: every digest was either in the cache or embedded just now.
    let out: ChunkEmbeddings = digests.iter().map(|d| known[d].clone()).collect();
    // Rewritten when it gained texts or holds texts no longer asked for.
    let distinct: std::collections::HashSet<&Digest32> = digests.iter().collect();
    if let Some(path) = cache.filter(|_| !missing.is_empty() || known.len() != distinct.len()) {
        write(path, identity, &digests, &out)?;
    }
    Ok(out)
}

fn read(path: &Path, identity: &str) -> std::result::Result<HashMap<Digest32, Vec<Vec<f32>>>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
    if meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("encoder"))
        .map(String::as_str)
        != Some(identity)
    {
        return Err("made with another encoder".into());
    }
    let file = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let tensor = |name: &str| file.tensor(name).map_err(|e| e.to_string());
    let (embeddings, counts, digests) = (tensor("embeddings")?, tensor("chunks")?, tensor("digests")?);
    let (&[rows, hidden], &[n], &[n2, 32]) = (embeddings.shape(), counts.shape(), digests.shape()) else {
        return Err("tensor shapes are not [chunks, hidden], [texts] and [texts, 32]".into());
    };
    let types = (embeddings.dtype(), counts.dtype(), digests.dtype());
    if types != (Dtype::F32, Dtype::I64, Dtype::U8) || n != n2 || (hidden == 0 && rows > 0) {
        return Err("tensor types or sizes do not match".into());
    }
    let counts: Vec<usize> = counts
        .data()
        .chunks_exact(8)
        // cannot fail: chunks_exact(8) yields 8-byte slices.
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")).max(0) as usize)
        .collect();
    if counts.iter().sum::<usize>() != rows {
        return Err("chunk counts do not add up to the embeddings".into());
    }
    let values: Vec<f32> = embeddings
        .data()
        .chunks_exact(4)
        // cannot fail: chunks_exact(4) yields 4-byte slices.
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    let mut rows_iter = values.chunks_exact(hidden.max(1)).map(<[f32]>::to_vec);
    Ok(digests
        .data()
        .chunks_exact(32)
        // cannot fail: chunks_exact(32) yields 32-byte slices.
        .map(|d| <Digest32>::try_from(d).expect("32 bytes"))
        .zip(counts)
        .map(|(d, c)| (d, rows_iter.by_ref().take(c).collect()))
        .collect())
}

fn write(path: &Path, identity: &str, digests: &[Digest32], embeddings: &ChunkEmbeddings) -> Result<()> {
    let hidden = embeddings.iter().flatten().map(Vec::len).next().unwrap_or(0);
    let values: Vec<u8> = embeddings
        .iter()
        .flatten()
        .flat_map(|row| row.iter().flat_map(|v| v.to_le_bytes()))
        .collect();
    let counts: Vec<u8> = embeddings
        .iter()
        .flat_map(|chunks| (chunks.len() as i64).to_le_bytes())
        .collect();
    let digest_bytes: Vec<u8> = digests.iter().flatten().copied().collect();
    let rows = embeddings.iter().map(Vec::len).sum::<usize>();
    let internal = |e: safetensors::SafeTensorError| Error::Internal(format!("embeddings cache: {e}"));
    let tensors = vec![
        (
            "embeddings",
            TensorView::new(Dtype::F32, vec![rows, hidden], &values).map_err(internal)?,
        ),
        (
            "chunks",
            TensorView::new(Dtype::I64, vec![embeddings.len()], &counts).map_err(internal)?,
        ),
        (
            "digests",
            TensorView::new(Dtype::U8, vec![digests.len(), 32], &digest_bytes).map_err(internal)?,
        ),
    ];
    let metadata = HashMap::from([("encoder".to_string(), identity.to_string())]);
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(internal)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::Config(format!("embeddings cache {}: {e}", dir.display())))?;
    }
    safepipe_model::train::write_atomic(path, &bytes).map_err(|e| Error::Config(format!("embeddings cache: {e}")))
}
