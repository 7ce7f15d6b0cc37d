//! Listing a folder of the run directory, optionally without some of its subfolders.
//!
//! Object stores are listed through `object_store` (one recursive listing per kept subfolder).
//! Local folders are walked here: `object_store`'s local listing stats every file three times
//! and hands each chunk to a blocking task, which at 100,000 units was 2.5 million `statx` calls
//! and most of `safepipe status`'s time. This walk costs one `stat` per file (relative to its
//! folder) and yields the same [`ObjectMeta`]: the same locations, sizes, modification times
//! and ETags (inode, modification time in microseconds, size), and it skips the same names
//! (a `#` followed only by digits: `object_store`'s own staging files).

use crate::engine::snapshot::FileTag;
use crate::engine::storage::Location;
use crate::error::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;
use object_store::path::Path;

/// Every object under `at`, except those under its direct subfolders named in `skip`.
pub async fn list(at: &Location, skip: &[&str]) -> Result<Vec<ObjectMeta>> {
    if at.base.scheme() == "file" {
        let root = std::path::PathBuf::from(at.display());
        let (base, skip) = (at.path.clone(), skip.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        return tokio::task::spawn_blocking(move || walk_local(&root, &base, &skip))
            .await
            .map_err(|e| Error::Internal(format!("listing a folder: {e}")))?
            .map_err(|e| Error::Internal(format!("cannot list {}: {e}", at.display())));
    }
    if skip.is_empty() {
        return Ok(at.store.list(Some(&at.path)).try_collect().await?);
    }
    let top = at.store.list_with_delimiter(Some(&at.path)).await?;
    let kept = top
        .common_prefixes
        .into_iter()
        .filter(|p| p.filename().is_none_or(|name| !skip.contains(&name)));
    let listings: Vec<Vec<ObjectMeta>> = futures::stream::iter(kept.map(|prefix| {
        let store = at.store.clone();
        async move { store.list(Some(&prefix)).try_collect::<Vec<_>>().await }
    }))
    .buffer_unordered(8)
    .try_collect()
    .await?;
    let mut all = top.objects;
    all.extend(listings.into_iter().flatten());
    Ok(all)
}

/// The local walk of [`list`]: `root` is the folder on disk, `base` its path in the store.
fn walk_local(root: &std::path::Path, base: &Path, skip: &[String]) -> std::io::Result<Vec<ObjectMeta>> {
    let mut out = Vec::new();
    let mut folders = vec![(root.to_path_buf(), base.clone(), true)];
    while let Some((dir, path, top)) = folders.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Missing (nothing listed yet, or removed while we walk: an attempt cleaned up).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory && !top => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if top && skip.contains(&name) {
                continue;
            }
            let metadata = match entry.file_type() {
                // Links are followed, as object_store does.
                Ok(kind) if kind.is_symlink() => std::fs::metadata(entry.path()),
                Ok(kind) if kind.is_dir() => {
                    folders.push((entry.path(), child(&path, &name), false));
                    continue;
                }
                Ok(_) => entry.metadata(),
                Err(e) => Err(e),
            };
            let metadata = match metadata {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if metadata.is_dir() {
                folders.push((entry.path(), child(&path, &name), false));
                continue;
            }
            if staging_name(&name) {
                continue;
            }
            let tag = FileTag::of_local(&metadata);
            out.push(ObjectMeta {
                location: child(&path, &name),
                last_modified: metadata
                    .modified()
                    .map(chrono::DateTime::<chrono::Utc>::from)
                    .unwrap_or_default(),
                size: metadata.len(),
                e_tag: Some(tag.e_tag),
                version: None,
            });
        }
    }
    Ok(out)
}

/// The store path of `name` in the folder `parent`, as `object_store`'s local listing names it
/// (a file name is taken as it is where it is a valid path segment, e.g. `a#b`, and
/// percent-encoded otherwise).
fn child(parent: &Path, name: &str) -> Path {
    Path::parse(format!("{parent}/{name}")).unwrap_or_else(|_| parent.clone().join(name))
}

/// `object_store`'s local staging files (`name#123`), which its listing never shows.
fn staging_name(name: &str) -> bool {
    matches!(name.split_once('#'), Some((_, suffix)) if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::storage::Stores;
    use object_store::ObjectStoreExt;

    /// The local walk lists exactly what object_store's listing lists, with the same metadata.
    #[tokio::test]
    async fn the_local_walk_equals_object_stores_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("run");
        for (file, bytes) in [
            ("s/_done/unit-000001.json", "{}"),
            ("s/_leases/unit-000001/0000000000.json", "{}"),
            ("s/documents/unit-000001-f-a.parquet", "PAR1"),
            ("s/documents/staging#12", "x"),
            ("s/documents/odd#name", "xy"),
            ("s/top.json", "abc"),
        ] {
            let path = root.join(file);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
        std::fs::create_dir_all(root.join("s/empty")).unwrap();
        let at = Stores::default().resolve(root.join("s").to_str().unwrap()).unwrap();
        let sorted = |mut v: Vec<ObjectMeta>| {
            v.sort_by(|a, b| a.location.cmp(&b.location));
            v
        };
        let ours = sorted(list(&at, &[]).await.unwrap());
        let theirs = sorted(at.store.list(Some(&at.path)).try_collect().await.unwrap());
        assert_eq!(ours, theirs);
        assert_eq!(ours.len(), 5, "{ours:?}");
        let without_leases = list(&at, &["_leases"]).await.unwrap();
        assert_eq!(without_leases.len(), 4);
        assert!(without_leases.iter().all(|m| !m.location.as_ref().contains("_leases")));
        // A missing folder lists as empty, as object_store's does.
        let missing = at.child("nothing-here");
        assert!(list(&missing, &[]).await.unwrap().is_empty());
        // The ETag a GET reports is the one listed (what snapshot entries are matched by).
        let done = ours
            .iter()
            .find(|m| m.location.as_ref().ends_with("unit-000001.json"))
            .unwrap();
        let got = at.store.get(&done.location).await.unwrap();
        assert_eq!(got.meta.e_tag, done.e_tag);
    }
}
