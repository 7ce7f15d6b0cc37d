//! One owner per (stage, unit): leases, so two processes given the same unit (a zombie after a
//! requeue, a wrong `--world-size`, two `safepipe run` by mistake) produce one committed result.
//!
//! A lease is a small JSON file `<stage>/_leases/unit-000042/<generation>.json`, created with
//! create-if-absent (a hard link on local disk, `If-None-Match: *` on object stores). The highest
//! generation is the owner. The owner rewrites its file every third of the lease time while it is
//! still the highest; a lease whose expiry has passed, or whose holder process is gone (same
//! host and PID namespace), may be taken over by creating the next generation: only one taker can
//! create it. Generations only grow: a release leaves its file as a tombstone (expiry 0), so a
//! stalled holder's late renewal can never revive a number someone else will reuse. Before
//! publishing, the owner checks that its generation is still the highest (fencing a holder that
//! stalled past expiry; a holder that stalls between that check and its record is the one case
//! left, and its result is as valid as the other's).
//! Expiry compares wall clocks of different machines: keep their skew well below
//! `runner.lease_seconds`.

use crate::engine::records::LEASES_DIR;
use crate::engine::run_dir::{RunDir, host_name};
use crate::engine::storage::Location;
use crate::error::{Error, Result};
use futures::{StreamExt, TryStreamExt};
use object_store::{PutMode, PutOptions};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tracing::{info, warn};

/// The content of a lease file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    pub rank: u32,
    /// The attempt working under the lease (its files are under `_attempts/<attempt>/`).
    pub attempt: String,
    /// Seconds since the Unix epoch after which the lease may be taken over (0: released).
    pub expires_at: u64,
    /// The holder's PID namespace (`/proc/self/ns/pid`): a PID means the same process only
    /// within one namespace (containers on one host share its name, not its PIDs).
    #[serde(default)]
    pub pid_ns: String,
}

impl Holder {
    fn expired(&self, now: u64) -> bool {
        now > self.expires_at
    }

    /// The holder ran on this host and its process is gone (a `kill -9`, a crash): no need to
    /// wait for the expiry.
    fn gone(&self) -> bool {
        self.host == host_name()
            && !self.pid_ns.is_empty()
            && self.pid_ns == pid_namespace()
            && self.pid != std::process::id()
            && !process_alive(self.pid)
    }

    pub fn describe(&self) -> String {
        format!(
            "rank {} (host {}, pid {}) until {}",
            self.rank,
            self.host,
            self.pid,
            chrono::DateTime::from_timestamp(self.expires_at as i64, 0)
                .map(|t| t.to_rfc3339())
                .unwrap_or_default()
        )
    }
}

/// The outcome of [`acquire`].
pub enum Acquired {
    Owned(Box<Lease>),
    /// Another live process holds the unit.
    Busy(Holder),
}

/// A held lease; renewed in the background until [`Lease::release`] (or drop).
pub struct Lease {
    run_dir: RunDir,
    dir: Location,
    generation: u64,
    /// The attempt of the holder this lease replaced, if it was taken over (its files are left).
    pub took_over: Option<Holder>,
    /// Set when the lease is released or dropped: the renewer stops at its next wake-up.
    stopped: Arc<AtomicBool>,
    /// Held by the renewer while it writes, so `release` waits for a renewal under way.
    writing: Arc<tokio::sync::Mutex<()>>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// This process's PID namespace, or "" where it cannot be read (then holders wait for expiry).
fn pid_namespace() -> String {
    std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists() || !std::path::Path::new("/proc/self").exists()
}

fn generation_name(generation: u64) -> String {
    format!("{generation:010}.json")
}

/// The generations present for a unit, highest last.
async fn generations(run_dir: &RunDir, dir: &Location) -> Result<Vec<u64>> {
    let relative = run_dir
        .relative(dir)
        .ok_or_else(|| Error::Internal("a lease folder outside the run directory".into()))?;
    let mut found: Vec<u64> = run_dir
        .list(&relative)
        .await?
        .iter()
        .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// Up to this many units, [`held`] lists their lease folders one by one; above it, the
/// stage's whole lease folder at once.
const LIST_ONE_BY_ONE: usize = 256;

/// The units of a stage whose lease is held right now (not released, not expired), with their
/// holders: the units being worked on, on any rank. `among`: only these units (`None`: every
/// unit). Their leases are listed (a few unit folders one by one, else the stage's whole lease
/// folder); only the newest generation of each unit, and only if written within `recent` (a
/// live holder rewrites it every third of its lease time), is read, so a stage of many finished
/// units costs no reads.
pub async fn held(
    run_dir: &RunDir,
    stage: &str,
    among: Option<&[u32]>,
    recent: Duration,
) -> Result<Vec<(u32, Holder)>> {
    let metas = match among {
        Some(units) if units.len() <= LIST_ONE_BY_ONE => {
            let lists = units.iter().map(|&unit| {
                let dir = format!("{stage}/{LEASES_DIR}/unit-{unit:06}");
                async move { run_dir.list(&dir).await }
            });
            let lists: Vec<Vec<object_store::ObjectMeta>> =
                futures::stream::iter(lists).buffer_unordered(32).try_collect().await?;
            lists.into_iter().flatten().collect()
        }
        _ => run_dir.list(&format!("{stage}/{LEASES_DIR}")).await?,
    };
    let wanted: Option<std::collections::HashSet<u32>> = among.map(|u| u.iter().copied().collect());
    let listed: Vec<(String, object_store::ObjectMeta)> = metas
        .into_iter()
        .filter_map(|meta| {
            Some((
                run_dir.relative(&run_dir.root().with_path(meta.location.clone()))?,
                meta,
            ))
        })
        .collect();
    let mut newest: std::collections::BTreeMap<u32, (u64, &object_store::ObjectMeta, &str)> = Default::default();
    for (name, meta) in &listed {
        let Some(rest) = name.split_once(&format!("/{LEASES_DIR}/unit-")).map(|(_, r)| r) else {
            continue;
        };
        let Some((unit, generation)) = rest.split_once('/') else {
            continue;
        };
        let (Ok(unit), Some(Ok(generation))) = (
            unit.parse::<u32>(),
            generation.strip_suffix(".json").map(str::parse::<u64>),
        ) else {
            continue;
        };
        if wanted.as_ref().is_some_and(|w| !w.contains(&unit)) {
            continue;
        }
        if newest.get(&unit).is_none_or(|(g, _, _)| *g < generation) {
            newest.insert(unit, (generation, meta, name.as_str()));
        }
    }
    let since = chrono::Utc::now() - chrono::Duration::from_std(recent).unwrap_or_default();
    let mut out = Vec::new();
    for (unit, (_, meta, name)) in newest {
        if meta.last_modified < since {
            continue;
        }
        if let Some(holder) = read_holder(&run_dir.file(name)?).await
            && !holder.expired(now())
            && holder.expires_at != 0
        {
            out.push((unit, holder));
        }
    }
    Ok(out)
}

/// Tries to become the owner of (stage, unit) for `attempt`.
pub async fn acquire(
    run_dir: &RunDir,
    stage: &str,
    unit: u32,
    rank: u32,
    attempt: &str,
    ttl: Duration,
) -> Result<Acquired> {
    let dir = run_dir.lease_dir(stage, unit);
    let holder = |expires_at| Holder {
        host: host_name(),
        pid: std::process::id(),
        rank,
        attempt: attempt.to_string(),
        expires_at,
        pid_ns: pid_namespace(),
    };
    for _ in 0..8 {
        let gens = generations(run_dir, &dir).await?;
        let (next, took_over) = match gens.last() {
            None => (0, None),
            Some(&top) => {
                let current = dir.child(&generation_name(top)).read().await?;
                // An unreadable lease (a crash while creating it) counts as expired.
                let current: Option<Holder> = current.and_then(|b| serde_json::from_slice(&b).ok());
                match current {
                    Some(h) if !h.expired(now()) && !h.gone() => return Ok(Acquired::Busy(h)),
                    // A released lease (a tombstone) is no takeover.
                    Some(h) if h.expires_at == 0 => (top + 1, None),
                    other => (top + 1, other),
                }
            }
        };
        let body = serde_json::to_vec(&holder(now() + ttl.as_secs())).map_err(|e| Error::Internal(e.to_string()))?;
        let at = dir.child(&generation_name(next));
        let put = at
            .store
            .put_opts(&at.path, body.clone().into(), PutOptions::from(PutMode::Create))
            .await;
        match put {
            Ok(_) => {}
            Err(object_store::Error::AlreadyExists { .. }) => continue, // another taker won this generation
            Err(object_store::Error::NotImplemented { .. }) => {
                warn!("this object store cannot create-if-absent: leases are advisory only");
                at.write(body).await?;
            }
            Err(e) => return Err(e.into()),
        }
        if let Some(old) = &took_over {
            info!(stage, unit, from = %old.describe(), "taking over a unit whose owner is gone or expired");
        }
        let stopped = Arc::new(AtomicBool::new(false));
        let writing = Arc::new(tokio::sync::Mutex::new(()));
        tokio::spawn(renew(
            run_dir.clone(),
            (dir.clone(), next),
            holder(0),
            ttl,
            stopped.clone(),
            writing.clone(),
        ));
        return Ok(Acquired::Owned(Box::new(Lease {
            run_dir: run_dir.clone(),
            dir,
            generation: next,
            took_over,
            stopped,
            writing,
        })));
    }
    Err(Error::Internal(format!(
        "could not take the lease of {stage} unit {unit}: other processes keep racing for it"
    )))
}

/// Rewrites the lease with a new expiry every third of `ttl` while it is the highest
/// generation, each write under `writing`, so a release (which sets `stopped`, then takes the
/// lock) is never followed by a late renewal. Once another process took the unit over it stops.
async fn renew(
    run_dir: RunDir,
    (dir, generation): (Location, u64),
    mut holder: Holder,
    ttl: Duration,
    stopped: Arc<AtomicBool>,
    writing: Arc<tokio::sync::Mutex<()>>,
) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    let at = dir.child(&generation_name(generation));
    loop {
        tokio::time::sleep(every).await;
        let _writing = writing.lock().await;
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        match generations(&run_dir, &dir).await {
            Ok(gens) if gens.last() == Some(&generation) => {}
            Ok(_) => {
                warn!(lease = %at.display(), "another process took this unit over: no longer renewing");
                return;
            }
            Err(e) => {
                warn!(lease = %at.display(), error = %e, "could not check a lease before renewing");
                continue;
            }
        }
        holder.expires_at = now() + ttl.as_secs();
        let Ok(body) = serde_json::to_vec(&holder) else { return };
        if let Err(e) = at.write(body).await {
            warn!(lease = %at.display(), error = %e, "could not renew a lease");
        }
    }
}

impl Lease {
    /// Whether this lease is still the highest generation (nobody took the unit over).
    pub async fn still_held(&self) -> Result<bool> {
        Ok(generations(&self.run_dir, &self.dir).await?.last() == Some(&self.generation))
    }

    /// Stops renewing, leaves this generation as a released tombstone (if it is still the
    /// highest) and deletes older ones.
    pub async fn release(self) {
        self.stopped.store(true, Ordering::SeqCst);
        drop(self.writing.lock().await);
        let gens = generations(&self.run_dir, &self.dir).await.unwrap_or_default();
        if gens.last() == Some(&self.generation) {
            tombstone(&self.dir.child(&generation_name(self.generation))).await;
        }
        for g in gens.into_iter().filter(|g| *g < self.generation) {
            if let Err(e) = self.run_dir.delete(&self.dir.child(&generation_name(g))).await {
                warn!(lease = %self.dir.display(), error = %e, "could not delete an old lease");
            }
        }
    }
}

/// The holder a lease file names; `None` when it is missing or unreadable (a crash while it was
/// created: it counts as expired).
async fn read_holder(at: &Location) -> Option<Holder> {
    let bytes = at.read().await.ok().flatten()?;
    serde_json::from_slice(&bytes).ok()
}

/// Marks a lease file released (expiry 0), keeping its generation number taken.
async fn tombstone(at: &Location) {
    let released = read_holder(at).await.map(|h| Holder { expires_at: 0, ..h });
    if let Some(body) = released.and_then(|h| serde_json::to_vec(&h).ok())
        && let Err(e) = at.write(body).await
    {
        warn!(lease = %at.display(), error = %e, "could not release a lease");
    }
}

/// Releases the leases of (stage, unit) that this process holds: after a panic in the task
/// that held one (the task is gone, its `Lease` dropped without `release`).
pub async fn abandon(run_dir: &RunDir, stage: &str, unit: u32) {
    let dir = run_dir.lease_dir(stage, unit);
    let Some(&top) = generations(run_dir, &dir).await.unwrap_or_default().last() else {
        return;
    };
    let at = dir.child(&generation_name(top));
    let mine = read_holder(&at)
        .await
        .is_some_and(|h| h.pid == std::process::id() && h.host == host_name());
    if mine {
        tombstone(&at).await;
    }
}

impl Drop for Lease {
    /// A lease dropped without `release` (a panic in its unit) stops renewing; the runner deletes
    /// its file.
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_owner_then_release_then_takeover_of_a_dead_holder() {
        let tmp = tempfile::tempdir().unwrap();
        let run_dir = RunDir::open(tmp.path().to_str().unwrap()).unwrap();
        let ttl = Duration::from_secs(60);
        let Acquired::Owned(first) = acquire(&run_dir, "ingest", 3, 0, "a1", ttl).await.unwrap() else {
            panic!("the first taker must own the unit");
        };
        match acquire(&run_dir, "ingest", 3, 1, "a2", ttl).await.unwrap() {
            Acquired::Busy(h) => assert_eq!(h.attempt, "a1"),
            Acquired::Owned(_) => panic!("two owners"),
        }
        assert!(first.still_held().await.unwrap());
        // `held` sees the live lease whether it lists every unit, a few, or many by name.
        let recent = Duration::from_secs(60);
        let many: Vec<u32> = (0..1000).collect();
        for among in [None, Some(&[3u32][..]), Some(&many[..])] {
            let held = held(&run_dir, "ingest", among, recent).await.unwrap();
            assert_eq!(
                held.iter().map(|(u, h)| (*u, h.attempt.as_str())).collect::<Vec<_>>(),
                [(3, "a1")]
            );
        }
        assert!(held(&run_dir, "ingest", Some(&[4]), recent).await.unwrap().is_empty());
        first.release().await;
        assert!(held(&run_dir, "ingest", None, recent).await.unwrap().is_empty());
        let Acquired::Owned(second) = acquire(&run_dir, "ingest", 3, 1, "a2", ttl).await.unwrap() else {
            panic!("a released unit can be taken");
        };
        assert_eq!(second.generation, 1, "generations are never reused");
        assert!(second.took_over.is_none(), "a released lease is no takeover");
        second.stopped.store(true, Ordering::SeqCst);
        // A holder on this host whose process is gone is taken over without waiting.
        let dead = Holder {
            host: host_name(),
            pid: u32::MAX - 1,
            rank: 0,
            attempt: "dead".into(),
            expires_at: now() + 3600,
            pid_ns: pid_namespace(),
        };
        let dir = run_dir.lease_dir("ingest", 3);
        dir.child(&generation_name(second.generation + 1))
            .write(serde_json::to_vec(&dead).unwrap())
            .await
            .unwrap();
        assert!(
            !second.still_held().await.unwrap(),
            "a newer generation fences the old owner"
        );
        let Acquired::Owned(third) = acquire(&run_dir, "ingest", 3, 2, "a3", ttl).await.unwrap() else {
            panic!("a dead holder's unit is taken over");
        };
        assert_eq!(third.took_over.as_ref().map(|h| h.attempt.as_str()), Some("dead"));
        assert_eq!(third.generation, second.generation + 2);
    }
}
