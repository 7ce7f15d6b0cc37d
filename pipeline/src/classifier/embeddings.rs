//! Chunk embeddings of the labelled texts, optionally cached in one safetensors file
//! (`classifier train --embeddings-cache FILE`), so retraining a head with other settings does
//! not re-run the encoder (minutes on CPU).
//!
//! The file holds `embeddings` (F32 `[chunks, hidden]`) and `chunks` (I64 `[texts]`, chunks per
//! text), and in its metadata a `key`: the SHA-256 of the encoder's identity (its files,
//! precision and chunk overlap) and of every text in order. A file with another key, or one that
//! cannot be read, is recomputed and replaced: a cache can cost time, never change a result.

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

/// The embeddings of `texts`, from `cache` when it holds exactly these texts under this encoder.
pub fn embed(classifier: &Classifier, identity: &str, texts: &[&str], cache: Option<&Path>) -> Result<ChunkEmbeddings> {
    let key = cache_key(identity, texts);
    if let Some(path) = cache.filter(|p| p.exists()) {
        match read(path, &key, texts.len()) {
            Ok(found) => {
                eprintln!("embeddings: {} texts from {}", texts.len(), path.display());
                return Ok(found);
            }
            Err(why) => eprintln!("embeddings: not using {} ({why}); embedding again", path.display()),
        }
    }
    let bar = step_bar(texts.len() as u64, "embed");
    let mut out = Vec::with_capacity(texts.len());
    for window in texts.chunks(WINDOW) {
        out.extend(
            classifier
                .embed_chunks(window)
                .map_err(|e| Error::Execution(e.to_string()))?,
        );
        bar.inc(window.len() as u64);
    }
    bar.finish_and_clear();
    if let Some(path) = cache {
        write(path, &key, &out)?;
    }
    Ok(out)
}

fn cache_key(identity: &str, texts: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(identity.as_bytes());
    for t in texts {
        h.update((t.len() as u64).to_le_bytes());
        h.update(t.as_bytes());
    }
    hex::encode(h.finalize())
}

fn read(path: &Path, key: &str, texts: usize) -> std::result::Result<ChunkEmbeddings, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
    if meta.metadata().as_ref().and_then(|m| m.get("key")).map(String::as_str) != Some(key) {
        return Err("made for other texts or another encoder".into());
    }
    let file = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
    let (embeddings, counts) = (
        file.tensor("embeddings").map_err(|e| e.to_string())?,
        file.tensor("chunks").map_err(|e| e.to_string())?,
    );
    let (&[rows, hidden], &[n]) = (embeddings.shape(), counts.shape()) else {
        return Err("tensor shapes are not [chunks, hidden] and [texts]".into());
    };
    if embeddings.dtype() != Dtype::F32 || counts.dtype() != Dtype::I64 || n != texts || (hidden == 0 && rows > 0) {
        return Err("tensor types or the number of texts do not match".into());
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
    Ok(counts.iter().map(|&c| rows_iter.by_ref().take(c).collect()).collect())
}

fn write(path: &Path, key: &str, embeddings: &ChunkEmbeddings) -> Result<()> {
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
    ];
    let metadata = HashMap::from([("key".to_string(), key.to_string())]);
    let bytes = safetensors::serialize(tensors, Some(metadata)).map_err(internal)?;
    let io = |e: std::io::Error| Error::Config(format!("embeddings cache {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
