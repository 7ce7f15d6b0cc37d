//! Exports for other tools: the packed shards as a Megatron-LM indexed dataset, and the
//! tokenizer as `tokenizer.json`.
//!
//! Megatron's `MMIDIDX` layout (megatron/core/datasets/indexed_dataset.py), little-endian:
//! ```text
//! PREFIX.idx: b"MMIDIDX\x00\x00", u64 version = 1, u8 dtype code, u64 sequence count S,
//!             u64 document-index count D, i32[S] sequence lengths, i64[S] byte offsets of
//!             the sequences in .bin, i64[D] document indices (0, then the sequence index
//!             where each document ends)
//! PREFIX.bin: the token ids of every sequence back to back (uint16, or int32 for vocabularies
//!             over 65536)
//! ```
//! A sequence here is one document segment of a packed row and a document is the run of
//! segments of one source document (a document split across two rows is one document of two
//! sequences), so the stream of tokens is exactly the shards' `input_ids` in order.

use crate::config::Config;
use crate::engine::run_dir::RunDir;
use crate::error::{Error, Result};
use crate::pack::{Manifest, open_shard, require_manifest};
use arrow::array::{Array, AsArray};
use arrow::datatypes::{UInt16Type, UInt32Type};
use futures::TryStreamExt;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// What an export wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MegatronReport {
    pub bin: PathBuf,
    pub idx: PathBuf,
    pub tokens: u64,
    pub sequences: u64,
    pub documents: u64,
}

const DTYPE_INT32: u8 = 4;
const DTYPE_UINT16: u8 = 8;

/// Writes `PREFIX.bin` and `PREFIX.idx` from the committed shards of `config`'s run.
pub async fn megatron(config: &Config, prefix: &Path) -> Result<MegatronReport> {
    let run_dir = RunDir::open(&config.run_dir)?;
    let hint = format!(
        "run `safepipe run {}` with a [pack] section first",
        config.path.display()
    );
    let manifest: Manifest = require_manifest(&run_dir, &hint).await?;
    let wide = manifest.id_type == "uint32";
    let with_suffix = |suffix: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(suffix);
        PathBuf::from(name)
    };
    let (bin, idx) = (with_suffix(".bin"), with_suffix(".idx"));
    if let Some(parent) = bin.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let bin_tmp = with_suffix(".bin.partial");
    let file = std::fs::File::create(&bin_tmp).map_err(|e| io_error(&bin_tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut lengths: Vec<i32> = Vec::new();
    let mut documents: Vec<i64> = vec![0];
    let mut tokens = 0u64;
    for shard in &manifest.shards {
        let mut stream = open_shard(&run_dir.file(&shard.file)?).await?;
        while let Some(batch) = stream.try_next().await? {
            let ids = batch.column(0).as_list::<i32>();
            let offsets = batch.column(1).as_list::<i32>();
            let continues = batch.column(3).as_boolean();
            for row in 0..batch.num_rows() {
                let row_ids = ids.value(row);
                let starts = offsets.value(row);
                let starts = starts.as_primitive::<UInt32Type>().values();
                let n = row_ids.len();
                for (k, &start) in starts.iter().enumerate() {
                    let end = starts.get(k + 1).map_or(n, |&e| e as usize);
                    let start = start as usize;
                    // A new source document closes the previous one.
                    let new_document = !(k == 0 && continues.value(row));
                    if new_document && !lengths.is_empty() {
                        documents.push(lengths.len() as i64);
                    }
                    let segment = row_ids.slice(start, end - start);
                    if wide {
                        for &t in segment.as_primitive::<UInt32Type>().values() {
                            out.write_all(&(t as i32).to_le_bytes())
                                .map_err(|e| io_error(&bin_tmp, e))?;
                        }
                    } else {
                        for &t in segment.as_primitive::<UInt16Type>().values() {
                            out.write_all(&t.to_le_bytes()).map_err(|e| io_error(&bin_tmp, e))?;
                        }
                    }
                    lengths.push((end - start) as i32);
                    tokens += (end - start) as u64;
                }
            }
        }
    }
    if !lengths.is_empty() {
        documents.push(lengths.len() as i64);
    }
    out.flush().map_err(|e| io_error(&bin_tmp, e))?;
    drop(out);

    let width: i64 = if wide { 4 } else { 2 };
    let mut index = Vec::with_capacity(34 + lengths.len() * 12 + documents.len() * 8);
    index.extend_from_slice(b"MMIDIDX\x00\x00");
    index.extend_from_slice(&1u64.to_le_bytes());
    index.push(if wide { DTYPE_INT32 } else { DTYPE_UINT16 });
    index.extend_from_slice(&(lengths.len() as u64).to_le_bytes());
    index.extend_from_slice(&(documents.len() as u64).to_le_bytes());
    for l in &lengths {
        index.extend_from_slice(&l.to_le_bytes());
    }
    let mut pointer = 0i64;
    for l in &lengths {
        index.extend_from_slice(&pointer.to_le_bytes());
        pointer += i64::from(*l) * width;
    }
    for d in &documents {
        index.extend_from_slice(&d.to_le_bytes());
    }
    if tokens != manifest.tokens {
        let _ = std::fs::remove_file(&bin_tmp);
        return Err(Error::Internal(format!(
            "megatron export read {tokens} tokens but the manifest has {}; nothing written",
            manifest.tokens
        )));
    }
    let idx_tmp = with_suffix(".idx.partial");
    std::fs::write(&idx_tmp, &index).map_err(|e| io_error(&idx_tmp, e))?;
    std::fs::rename(&bin_tmp, &bin).map_err(|e| io_error(&bin, e))?;
    std::fs::rename(&idx_tmp, &idx).map_err(|e| io_error(&idx, e))?;
    Ok(MegatronReport {
        bin,
        idx,
        tokens,
        sequences: lengths.len() as u64,
        documents: documents.len() as u64 - 1,
    })
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Config(format!("cannot write {}: {e}", path.display()))
}

/// Writes the run's tokenizer (base vocabulary + the tag) as `tokenizer.json` to `out` (a file,
/// or a directory to put `tokenizer.json` in). Returns the file written.
pub fn tokenizer_json(config: &Config, out: &Path) -> Result<PathBuf> {
    let settings = config.tokenize.as_ref().ok_or_else(|| {
        Error::Config(format!(
            "{} has no [tokenize] section naming a tokenizer",
            config.path.display()
        ))
    })?;
    let file = if out.is_dir() {
        out.join("tokenizer.json")
    } else {
        out.to_path_buf()
    };
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    std::fs::write(&file, settings.tokenizer.get()?.json()).map_err(|e| io_error(&file, e))?;
    Ok(file)
}
