//! The pack stage's local files: spill entries of the shuffle (one file per key-range bucket,
//! removed as soon as read) and the writer that cuts packed rows into shard files.

use super::job::PackJob;
use crate::engine::records::OutputFile;
use crate::engine::run_dir::RunDir;
use crate::engine::writer::TableWriter;
use crate::error::{Error, Result};
use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;

/// One selected document copy in a spill file.
pub(super) struct SpillEntry {
    pub key: u64,
    pub unit: u32,
    pub row: u32,
    pub epoch: u32,
    pub source: u16,
    /// Byte offset of its ids in the file, and their count.
    pub start: usize,
    pub len: usize,
}

const SPILL_HEADER: usize = 8 + 4 + 4 + 4 + 2 + 4;
/// Packed sequences handed to the shard writer at a time (bounded memory whatever the shard size).
pub(super) const FLUSH_SEQUENCES: usize = 512;

pub(super) fn write_entry(
    w: &mut impl Write,
    key: u64,
    unit: u32,
    row: u32,
    epoch: u32,
    source: u16,
    ids: &[u32],
) -> std::io::Result<()> {
    w.write_all(&key.to_le_bytes())?;
    w.write_all(&unit.to_le_bytes())?;
    w.write_all(&row.to_le_bytes())?;
    w.write_all(&epoch.to_le_bytes())?;
    w.write_all(&source.to_le_bytes())?;
    w.write_all(&(ids.len() as u32).to_le_bytes())?;
    for id in ids {
        w.write_all(&id.to_le_bytes())?;
    }
    Ok(())
}

pub(super) fn parse_entries(bytes: &[u8]) -> Result<Vec<SpillEntry>> {
    let mut out = Vec::new();
    let mut at = 0;
    let field = |at: usize, n: usize| &bytes[at..at + n];
    while at < bytes.len() {
        if at + SPILL_HEADER > bytes.len() {
            return Err(Error::Internal("pack: a spill file ends inside an entry".into()));
        }
        let u32_at = |p: usize| u32::from_le_bytes(field(p, 4).try_into().expect("4 bytes"));
        let key = u64::from_le_bytes(field(at, 8).try_into().expect("8 bytes"));
        let (unit, row, epoch) = (u32_at(at + 8), u32_at(at + 12), u32_at(at + 16));
        let source = u16::from_le_bytes(field(at + 20, 2).try_into().expect("2 bytes"));
        let len = u32_at(at + 22) as usize;
        let start = at + SPILL_HEADER;
        if start + 4 * len > bytes.len() {
            return Err(Error::Internal("pack: a spill file ends inside a document".into()));
        }
        out.push(SpillEntry {
            key,
            unit,
            row,
            epoch,
            source,
            start,
            len,
        });
        at = start + 4 * len;
    }
    Ok(out)
}

/// The shuffle's spill files: a fresh directory, removed when dropped.
pub(super) struct SpillDir {
    pub path: PathBuf,
}

impl SpillDir {
    pub fn create(parent: Option<&str>) -> Result<SpillDir> {
        let parent = parent.map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let path = parent.join(format!(
            "safepipe-pack-{}-{}",
            std::process::id(),
            chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
        ));
        std::fs::create_dir_all(&path)
            .map_err(|e| Error::Config(format!("pack.spill_dir: cannot create {}: {e}", path.display())))?;
        Ok(SpillDir { path })
    }

    fn file(&self, bucket: u64) -> PathBuf {
        self.path.join(format!("bucket-{bucket:05}.bin"))
    }

    pub fn writer(&self, bucket: u64) -> Result<BufWriter<std::fs::File>> {
        let file = std::fs::File::create(self.file(bucket)).map_err(|e| {
            Error::Internal(format!(
                "pack: cannot create a spill file in {}: {e}",
                self.path.display()
            ))
        })?;
        Ok(BufWriter::with_capacity(256 << 10, file))
    }

    pub fn read(&self, bucket: u64) -> Result<Vec<u8>> {
        let path = self.file(bucket);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| Error::Internal(format!("pack: cannot read {}: {e}", path.display())))?;
        // Free disk as we go: the bucket is in memory now.
        let _ = std::fs::remove_file(&path);
        Ok(bytes)
    }
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes packed sequences into shard files of exactly `shard_sequences` rows (the last may
/// hold fewer).
/// The staged name of global shard `index`, in its attempt's folder.
pub(super) fn shard_name(index: u64) -> String {
    format!("shard-{index:06}.parquet")
}

/// The committed name of global shard `index` (relative to the run directory): the fingerprint
/// and the attempt make it unique, so a repack never writes over a shard a reader may be using.
pub(super) fn shard_file(index: u64, fingerprint: &str, attempt: &str) -> String {
    format!(
        "{}/shards/shard-{index:06}-{fingerprint}-{attempt}.parquet",
        super::STAGE
    )
}

pub(super) struct ShardSink {
    run_dir: RunDir,
    attempt: String,
    schema: SchemaRef,
    per_shard: usize,
    first_shard: u64,
    current: Option<(TableWriter, usize)>,
    shards: Vec<OutputFile>,
    sequences: u64,
}

impl ShardSink {
    /// Shards are numbered from `first_shard` (this rank's first shard of the global order).
    pub fn new(job: &PackJob<'_>, schema: SchemaRef, first_shard: u64) -> Self {
        ShardSink {
            run_dir: job.run_dir.clone(),
            attempt: job.attempt.clone(),
            schema,
            per_shard: job.pack.shard_sequences,
            first_shard,
            current: None,
            shards: Vec::new(),
            sequences: 0,
        }
    }

    pub async fn write(&mut self, batch: RecordBatch) -> Result<()> {
        let mut start = 0;
        while start < batch.num_rows() {
            if self.current.is_none() {
                let name = shard_name(self.first_shard + self.shards.len() as u64);
                let staged = self.run_dir.attempt_file(super::STAGE, &self.attempt, &name);
                self.current = Some((TableWriter::new(staged, self.schema.clone()), 0));
            }
            let (writer, rows) = self.current.as_mut().expect("set above");
            let n = (self.per_shard - *rows).min(batch.num_rows() - start);
            writer.write(&batch.slice(start, n)).await?;
            *rows += n;
            start += n;
            self.sequences += n as u64;
            if *rows == self.per_shard {
                self.commit_current().await?;
            }
        }
        Ok(())
    }

    async fn commit_current(&mut self) -> Result<()> {
        if let Some((writer, _)) = self.current.take()
            && let Some(file) = writer.finish().await?
        {
            let relative = self
                .run_dir
                .relative(&file.location)
                .ok_or_else(|| Error::Internal("a shard outside the run directory".into()))?;
            self.shards.push(OutputFile {
                file: relative,
                rows: file.rows,
                bytes: file.bytes,
            });
        }
        Ok(())
    }

    pub async fn finish(mut self) -> Result<(Vec<OutputFile>, u64)> {
        self.commit_current().await?;
        Ok((self.shards, self.sequences))
    }
}
