//! [`RunDir`]: the run directory, opened once, and its whole layout.
//!
//! Every command goes through this type to find the plan, a stage's records and outputs, the
//! pack manifest and caches, so the layout is written down in one place. File names inside
//! records and manifests are **relative to the run directory**: a copied or moved run directory
//! (another local folder, or an object store) reads and deletes only its own files, and
//! [`RunDir::file`] refuses any name that would leave it.
//!
//! Writes that commit something (records, the plan, the manifest) are atomic, and on local disk
//! synced before the rename, so a crash leaves the old file or the new one, never an empty one.

use crate::engine::listing;
use crate::engine::records::{
    ATTEMPTS_DIR, Committed, DONE_DIR, FAILED_DIR, FailureRecord, LEASES_DIR, unit_file, unit_of,
};
use crate::engine::snapshot::{self, FileTag, SNAPSHOT_FILE, Snapshot};
use crate::engine::storage::{Location, Stores};
use crate::error::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::{ObjectMeta, ObjectStoreExt};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::{debug, warn};

pub const PLAN_FILE: &str = "plan.json";
pub const MANIFEST: &str = "pack/manifest.json";

/// An opened run directory: the stores to reach it and its root.
#[derive(Clone)]
pub struct RunDir {
    stores: Arc<Stores>,
    root: Location,
}

/// What one listing of a stage's folder found.
#[derive(Debug, Default)]
pub struct StageFiles {
    /// Valid completion records whose files are all present, by unit.
    pub done: HashMap<u32, Committed>,
    /// Last failures, by unit (a failure record that cannot be read is ignored with a warning).
    pub failed: HashMap<u32, FailureRecord>,
    /// Units whose record exists but cannot count as committed, with the reason (empty or
    /// corrupt record, an older layout, a committed file missing). Their units are redone.
    pub damaged: HashMap<u32, String>,
    /// Committed files that are missing (their units are also in `damaged`).
    pub missing: Vec<String>,
    /// Every object under the stage's folder except its leases, by path relative to the run
    /// directory.
    pub files: BTreeMap<String, ObjectMeta>,
    /// How many of `done` came from the stage's snapshot (the rest were read one by one).
    pub from_snapshot: usize,
}

impl RunDir {
    /// Opens the run directory `run_dir` (a local path or a URL) without touching it.
    pub fn open(run_dir: &str) -> Result<RunDir> {
        let stores = Arc::new(Stores::default());
        let root = stores.resolve(run_dir)?;
        Ok(RunDir { stores, root })
    }

    pub fn stores(&self) -> &Arc<Stores> {
        &self.stores
    }

    pub fn root(&self) -> &Location {
        &self.root
    }

    /// The directory as users wrote it (a path, or a URL).
    pub fn display(&self) -> String {
        self.root.display()
    }

    pub fn is_local(&self) -> bool {
        self.root.base.scheme() == "file"
    }

    pub fn plan(&self) -> Location {
        self.root.child(PLAN_FILE)
    }

    pub fn manifest(&self) -> Location {
        self.root.child(MANIFEST)
    }

    pub fn record(&self, stage: &str, unit: u32) -> Location {
        self.root.child(&format!("{stage}/{DONE_DIR}/{}", unit_file(unit)))
    }

    pub fn failure(&self, stage: &str, unit: u32) -> Location {
        self.root.child(&format!("{stage}/{FAILED_DIR}/{}", unit_file(unit)))
    }

    /// The folder of a (stage, unit)'s lease generations.
    pub fn lease_dir(&self, stage: &str, unit: u32) -> Location {
        self.root.child(&format!("{stage}/{LEASES_DIR}/unit-{unit:06}"))
    }

    /// Where an attempt of a stage writes its outputs before they are published.
    pub fn attempt_file(&self, stage: &str, attempt: &str, name: &str) -> Location {
        self.root.child(&format!("{stage}/{ATTEMPTS_DIR}/{attempt}/{name}"))
    }

    /// The committed name of a unit's output table: unique per attempt, so a redo never writes
    /// over a file a reader (or the current record) may be using.
    pub fn output_name(stage: &str, table: &str, unit: u32, fingerprint: &str, attempt: &str) -> String {
        format!("{stage}/{table}/unit-{unit:06}-{fingerprint}-{attempt}.parquet")
    }

    /// The unit of a name in one of `stage`'s table folders ([`RunDir::output_name`]'s shape,
    /// committed or not); `None` for anything else (records, leases, attempts).
    pub fn output_unit(stage: &str, name: &str) -> Option<u32> {
        let mut parts = name.split('/');
        let (s, table, file) = (parts.next()?, parts.next()?, parts.next()?);
        if s != stage || table.starts_with('_') || parts.next().is_some() {
            return None;
        }
        // `unit-{unit:06}-…`: the digits up to the next '-' (seven or more past 999,999).
        file.strip_prefix("unit-")?.split('-').next()?.parse().ok()
    }

    /// A file named by a record or manifest. Names are relative and stay inside the run
    /// directory; anything else (an absolute path of an older layout, `..`) is refused.
    pub fn file(&self, relative: &str) -> Result<Location> {
        let inside = !relative.is_empty()
            && !relative.starts_with('/')
            && !relative.contains("://")
            && relative.split('/').all(|s| !s.is_empty() && s != "." && s != "..");
        if !inside {
            return Err(Error::Internal(format!(
                "{relative:?} is not a file name inside the run directory {}",
                self.display()
            )));
        }
        Ok(self.root.child(relative))
    }

    /// The name of `location` relative to the run directory (`None` when it is outside).
    pub fn relative(&self, location: &Location) -> Option<String> {
        let root = self.root.path.as_ref();
        let path = location.path.as_ref();
        if location.base != self.root.base {
            return None;
        }
        if root.is_empty() {
            return Some(path.to_string());
        }
        path.strip_prefix(root)?.strip_prefix('/').map(str::to_string)
    }

    /// Writes `bytes` at `location` atomically; on local disk the file is synced before the
    /// rename and the directory after it. Returns the tag the new file is listed with.
    pub async fn put(&self, location: &Location, bytes: Vec<u8>) -> Result<Option<FileTag>> {
        if !self.is_local() {
            return location.write(bytes).await;
        }
        let path = std::path::PathBuf::from(location.display());
        tokio::task::spawn_blocking(move || local_put(&path, &bytes))
            .await
            .map_err(|e| Error::Internal(format!("writing a file: {e}")))?
            .map_err(|e| Error::Internal(format!("cannot write {}: {e}", location.display())))
    }

    /// Moves a finished attempt file to its committed name (a rename on local disk, synced; a
    /// copy and delete on object stores, where the copy appears whole).
    pub async fn publish(&self, from: &Location, to: &Location) -> Result<()> {
        if !self.is_local() {
            from.store.rename(&from.path, &to.path).await?;
            return Ok(());
        }
        let (src, dst) = (
            std::path::PathBuf::from(from.display()),
            std::path::PathBuf::from(to.display()),
        );
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            std::fs::File::open(&src)?.sync_all()?;
            if let Some(parent) = dst.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::rename(&src, &dst)?;
            sync_dir(dst.parent())
        })
        .await
        .map_err(|e| Error::Internal(format!("publishing a file: {e}")))?
        .map_err(|e| Error::Internal(format!("cannot publish {} as {}: {e}", from.display(), to.display())))
    }

    /// Deletes an object, treating "already gone" as success.
    pub async fn delete(&self, location: &Location) -> Result<()> {
        match location.store.delete(&location.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes what an attempt left in its folder (best effort: leftovers are `gc`'s), the
    /// folder included on local disk.
    pub async fn delete_attempt(&self, stage: &str, attempt: &str) {
        let prefix = format!("{stage}/{ATTEMPTS_DIR}/{attempt}");
        for meta in self.list(&prefix).await.unwrap_or_default() {
            let _ = self.delete(&self.root.with_path(meta.location)).await;
        }
        if self.is_local() {
            let _ = std::fs::remove_dir_all(self.root.child(&prefix).display());
        }
    }

    /// Whether every file in `files` (names relative to the run directory) exists.
    pub async fn all_present(&self, files: &[&str]) -> Result<bool> {
        for file in files {
            let at = self.file(file)?;
            match at.store.head(&at.path).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Lists every object under `prefix` (relative to the run directory).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        listing::list(&self.root.child(prefix), &[]).await
    }

    /// One listing of a stage's folder and its records: what is committed, failed or damaged
    /// (every file a record names is checked for presence). Records the stage's snapshot holds
    /// under the listed tag are taken from it; the others are read one by one.
    pub async fn stage(&self, stage: &str) -> Result<StageFiles> {
        let mut found = StageFiles::default();
        let mut records = Vec::new();
        let mut failures = Vec::new();
        let mut snapshot = None;
        let snapshot_name = format!("{stage}/{SNAPSHOT_FILE}");
        // Leases are not listed: one folder per unit, read only by `status` ([`leases::held`]).
        for meta in listing::list(&self.root.child(stage), &[LEASES_DIR]).await? {
            let Some(relative) = self.relative(&self.root.with_path(meta.location.clone())) else {
                continue;
            };
            // `<stage>/_done/unit-N.json` and `<stage>/_failed/unit-N.json`.
            let mut parts = relative.split('/').skip(1);
            match (parts.next(), parts.next().and_then(unit_of), parts.next()) {
                (Some(DONE_DIR), Some(unit), None) => records.push((unit, meta.clone())),
                (Some(FAILED_DIR), Some(unit), None) => failures.push((unit, meta.location.clone())),
                _ if relative == snapshot_name => snapshot = Some(meta.location.clone()),
                _ => {}
            }
            found.files.insert(relative, meta);
        }
        let mut snapshot = match snapshot {
            Some(path) if !records.is_empty() => self.load_snapshot(stage, path).await,
            _ => Snapshot::default(),
        };
        let mut unread = Vec::new();
        let mut parsed = Vec::new();
        for (unit, meta) in records {
            match snapshot.take(unit, &meta) {
                Some(c) => parsed.push((unit, Ok(c))),
                None => unread.push((unit, meta.location)),
            }
        }
        found.from_snapshot = parsed.len();
        debug!(
            stage,
            from_snapshot = parsed.len(),
            read = unread.len(),
            "completion records"
        );
        let reads = unread.into_iter().map(|(unit, path)| {
            let location = self.root.with_path(path);
            async move {
                let (bytes, tag) = location.read_tagged().await?.unwrap_or_default();
                let parsed = Committed::parse(&bytes).map(|c| Committed { tag, ..c });
                Ok::<_, Error>((unit, parsed))
            }
        });
        parsed.extend(
            futures::stream::iter(reads)
                .buffer_unordered(32)
                .try_collect::<Vec<_>>()
                .await?,
        );
        for (unit, parsed) in parsed {
            match parsed {
                Ok(c) => {
                    let missing = c.record.outputs.values().find(|f| !found.files.contains_key(&f.file));
                    match missing {
                        Some(f) => {
                            found.missing.push(f.file.clone());
                            found
                                .damaged
                                .insert(unit, format!("its committed file {} is missing", f.file));
                        }
                        None => {
                            found.done.insert(unit, c);
                        }
                    }
                }
                Err(why) => {
                    found.damaged.insert(unit, why);
                }
            }
        }
        let reads = failures.into_iter().map(|(unit, path)| {
            let location = self.root.with_path(path);
            async move { Ok::<_, Error>((unit, location.read().await?.unwrap_or_default())) }
        });
        let failures: Vec<_> = futures::stream::iter(reads).buffer_unordered(32).try_collect().await?;
        for (unit, bytes) in failures {
            match serde_json::from_slice::<FailureRecord>(&bytes) {
                Ok(f) => {
                    found.failed.insert(unit, f);
                }
                Err(e) => warn!(stage, unit, error = %e, "ignoring an unreadable failure record"),
            }
        }
        Ok(found)
    }

    /// The stage's snapshot, or none (with a warning) when it cannot be read or used.
    async fn load_snapshot(&self, stage: &str, path: object_store::path::Path) -> Snapshot {
        let location = self.root.with_path(path);
        let parsed = match location.read().await {
            Ok(Some(bytes)) => Snapshot::parse(stage, &bytes),
            Ok(None) => return Snapshot::default(),
            Err(e) => Err(e.to_string()),
        };
        parsed.unwrap_or_else(|why| {
            warn!(stage, file = %location.display(), problem = %why, "ignoring the record snapshot: every record is read");
            Snapshot::default()
        })
    }

    /// Writes the snapshot of `stage` holding `records` (those with a tag); returns how many it
    /// holds.
    pub async fn save_snapshot<'a>(
        &self,
        stage: &str,
        records: impl IntoIterator<Item = &'a Committed>,
    ) -> Result<usize> {
        let (bytes, held) = snapshot::encode(stage, records)?;
        self.put(&self.root.child(&format!("{stage}/{SNAPSHOT_FILE}")), bytes)
            .await?;
        Ok(held)
    }
}

/// A fresh name for one attempt at a unit: unique across processes and machines in practice
/// (time, process id, a per-process counter and the host name, hashed).
pub fn attempt_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = format!("{}:{}:{nanos}:{n}", host_name(), std::process::id());
    crate::engine::records::digest(seed.as_bytes())[..12].to_string()
}

/// This machine's host name (for lease owners and attempt ids).
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn local_put(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<Option<FileTag>> {
    use std::io::Write;
    let parent = path.parent().unwrap_or(std::path::Path::new("/"));
    std::fs::create_dir_all(parent)?;
    let staging = parent.join(format!(
        ".{}.{}-{}.partial",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id(),
        attempt_id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&staging)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        let tag = Some(FileTag::of_local(&file.metadata()?));
        std::fs::rename(&staging, path)?;
        sync_dir(Some(parent))?;
        Ok(tag)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    result
}

fn sync_dir(dir: Option<&std::path::Path>) -> std::io::Result<()> {
    match dir {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (review of issue 16): past unit 999,999 names have seven digits; reading six
    /// made a redo of unit 100000 delete units 1000000..=1000009's files.
    #[test]
    fn output_names_give_back_their_whole_unit_number() {
        let name = RunDir::output_name("s", "t", 1_000_003, "f", "a");
        assert_eq!(RunDir::output_unit("s", &name), Some(1_000_003));
        assert_eq!(RunDir::output_unit("s", "s/t/unit-100000-f-a.parquet"), Some(100_000));
        assert_eq!(RunDir::output_unit("s", "s/_done/unit-000001.json"), None);
        assert_eq!(RunDir::output_unit("s", "other/t/unit-000001-f-c.parquet"), None);
        assert_eq!(RunDir::output_unit("s", "s/t/x/unit-000001-f-c.parquet"), None);
    }

    #[test]
    fn names_in_records_must_stay_inside_the_run_directory() {
        let dir = RunDir::open("/tmp/some-run").unwrap();
        assert!(dir.file("ingest/documents/unit-000001-f-a.parquet").is_ok());
        for bad in ["", "/etc/passwd", "../other/x.parquet", "a/../../b", "s3://b/x", "a//b"] {
            assert!(dir.file(bad).is_err(), "{bad:?} accepted");
        }
        let inside = dir.file("pack/manifest.json").unwrap();
        assert_eq!(dir.relative(&inside).as_deref(), Some("pack/manifest.json"));
        let outside = RunDir::open("/tmp/some-run-2").unwrap();
        assert_eq!(dir.relative(outside.root()), None);
    }

    #[tokio::test]
    async fn put_is_atomic_and_leaves_no_staging_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = RunDir::open(tmp.path().to_str().unwrap()).unwrap();
        let at = dir.record("ingest", 7);
        dir.put(&at, b"{}".to_vec()).await.unwrap();
        dir.put(&at, b"{\"a\": 1}".to_vec()).await.unwrap();
        assert_eq!(at.read().await.unwrap().unwrap().as_ref(), b"{\"a\": 1}");
        let names: Vec<_> = std::fs::read_dir(tmp.path().join("ingest/_done"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("unit-000007.json")]);
        assert_ne!(attempt_id(), attempt_id());
    }
}
