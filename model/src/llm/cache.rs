//! The persistent request cache: every finished generation, keyed by a hash of everything that
//! determines it, appended to a JSON-lines file as soon as it arrives.
//!
//! A scope (one stage's work unit) has one file per writer process (`SCOPE.PID-NANOS.jsonl`), so
//! concurrent or successive attempts never write the same file; opening a scope reads all of
//! them. Each entry is one `write` of a whole line, so a process killed at any instant leaves at
//! most a torn last line, which the next open skips (and counts). Only successes are cached:
//! failed requests are sent again by the next run.

use super::Generation;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    /// What the request was, for people reading the file (e.g. `<document id> <template>`).
    #[serde(default)]
    label: String,
    generation: Generation,
}

pub struct RequestCache {
    entries: HashMap<String, Generation>,
    path: PathBuf,
    file: Mutex<Option<std::fs::File>>,
    /// Torn or unreadable lines skipped at open.
    pub skipped_lines: u64,
    hits: AtomicU64,
}

impl RequestCache {
    /// The cache key of a request: SHA-256 of the JSON of its parts (backend model id, template
    /// id and version, rendered prompt, sampling parameters, document id, rollout index).
    pub fn key(parts: &serde_json::Value) -> String {
        hex::encode(Sha256::digest(parts.to_string()))
    }

    /// Opens `scope` in `dir` (created if missing), loading every earlier entry.
    pub fn open(dir: &Path, scope: &str) -> std::io::Result<RequestCache> {
        std::fs::create_dir_all(dir)?;
        let prefix = format!("{scope}.");
        let mut entries = HashMap::new();
        let mut skipped_lines = 0;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".jsonl"))
            })
            .collect();
        files.sort();
        for file in files {
            let text = std::fs::read(&file)?;
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<Entry>(line) {
                    Ok(e) => {
                        entries.insert(e.key, e.generation);
                    }
                    Err(_) => skipped_lines += 1,
                }
            }
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let path = dir.join(format!("{scope}.{}-{stamp}.jsonl", std::process::id()));
        Ok(RequestCache {
            entries,
            path,
            file: Mutex::new(None),
            skipped_lines,
            hits: AtomicU64::new(0),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A finished generation for `key`, counting the hit.
    pub fn get(&self, key: &str) -> Option<&Generation> {
        let found = self.entries.get(key);
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Appends one finished generation (one write of a whole line; the file is created on the
    /// first put).
    pub fn put(&self, key: &str, label: &str, generation: &Generation) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&Entry {
            key: key.to_string(),
            label: label.to_string(),
            generation: generation.clone(),
        })
        .map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().expect("cache file lock");
        if file.is_none() {
            *file = Some(std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?);
        }
        file.as_mut().expect("opened").write_all(&line)
    }

    /// Flushes the file to disk (end of a unit).
    pub fn sync(&self) -> std::io::Result<()> {
        match self.file.lock().expect("cache file lock").as_ref() {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::FinishReason;

    #[test]
    fn entries_survive_reopen_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let g = Generation {
            text: "out".into(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 3,
            completion_tokens: 1,
        };
        let key = RequestCache::key(&serde_json::json!(["m", "t@1", "prompt", 0]));
        {
            let cache = RequestCache::open(dir.path(), "u1").unwrap();
            assert!(cache.get(&key).is_none());
            cache.put(&key, "doc-1 t@1", &g).unwrap();
        }
        // A torn line from a killed writer, and another scope's file.
        std::fs::write(dir.path().join("u1.1-2.jsonl"), b"{\"key\":\"ab").unwrap();
        std::fs::write(dir.path().join("u10.1-2.jsonl"), b"").unwrap();
        let cache = RequestCache::open(dir.path(), "u1").unwrap();
        assert_eq!(cache.get(&key), Some(&g));
        assert_eq!((cache.len(), cache.skipped_lines, cache.hits()), (1, 1, 1));
        assert_ne!(key, RequestCache::key(&serde_json::json!(["m", "t@1", "prompt", 1])));
    }
}
