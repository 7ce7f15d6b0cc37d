//! [`TcpCollective`]: data-parallel ranks as processes (one machine or many) over TCP, a star
//! around rank 0. Rank 0 sums the buffers in rank order and sends the mean back, so results are
//! bit-identical to [`ThreadRank`](super::ThreadRank)'s. A star is plenty for the CPU reference
//! backend; the CUDA backend brings NCCL.
//!
//! ```text
//! tcp.rs        TcpCollective and Rendezvous: the group and its operations
//! handshake.rs  forming the group: rank 0 admits workers, a worker joins (HMAC challenge-response)
//! wire.rs       the preamble, frames with size limits, a link's timeouts and errors
//! ```
//!
//! # Rendezvous (protocol version 1, handshake.rs)
//! Rank 0 listens at the master address; every other rank (a worker) connects. Both sides open
//! with the preamble [`MAGIC`](super::MAGIC) + version (u32 LE), then exchange frames:
//!
//! ```text
//! worker -> rank 0   HELLO     rank u32, world u32, worker nonce [32]
//! rank 0 -> worker   CHALLENGE rank-0 nonce [32]
//! worker -> rank 0   PROOF     HMAC(secret, "worker" | transcript) [32], fingerprint text
//! rank 0 -> worker   WELCOME   HMAC(secret, "rank 0" | transcript) [32]     (or ERROR: why not)
//! transcript = MAGIC | version | rank-0 nonce | worker nonce | rank | world | SHA-256(fingerprint)
//! ```
//!
//! HMAC-SHA256 over the job secret, compared in constant time. Fresh nonces on both sides make a
//! recorded exchange useless, and the distinct labels keep one side's proof from serving as the
//! other's: a worker never takes weights from a rank 0 that did not prove it holds the secret.
//!
//! What rank 0 does with a connection:
//! - not authenticated (wrong magic or version, an oversized or ill-formed frame, a wrong proof,
//!   nothing sent for 10 s): logged with the remote address and dropped; rank 0
//!   keeps waiting for the real ranks until the rendezvous deadline;
//! - authenticated but disagreeing (world size, a rank out of range or taken twice, a different
//!   fingerprint, i.e. training config): the job itself is misconfigured, so rank 0 tells that rank
//!   why in an ERROR frame naming both sides' values, tells the ranks already joined, and fails.
//!
//! # Frames (wire.rs)
//! A header, kind (u8) + payload length (u64 LE), then the payload. The receiver checks the kind
//! and the length against what it expects before reading: handshake frames have small fixed caps,
//! a DATA frame must be exactly the buffer being exchanged (f32 LE), an ERROR frame carries a
//! message of at most 64 KiB. Nothing a peer claims is allocated beyond that.
//!
//! # Timeouts
//! Established streams read and write with the `peer_timeout` of [`Rendezvous`]: a peer that
//! sends nothing for that long fails the operation with "rank N sent nothing for T s".

use super::CollectiveError;
use super::handshake::{admit_all, join};
use super::wire::{Link, MAX_FINGERPRINT};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// Who may join a group and what its ranks must agree on.
pub struct Rendezvous {
    pub rank: usize,
    pub world: usize,
    /// Where rank 0 listens and the others connect.
    pub master: SocketAddr,
    /// How long rank 0 waits for every worker, and a worker for rank 0.
    pub join_timeout: Duration,
    /// How long an established peer may send nothing (or take nothing) before the operation fails.
    pub peer_timeout: Duration,
    /// The job secret every rank shares: the HMAC key of the handshake.
    pub secret: Vec<u8>,
    /// What every rank must agree on, as `key = value` lines; a mismatch names the differing keys
    /// with both sides' values.
    pub fingerprint: String,
}

impl std::fmt::Debug for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rendezvous")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("master", &self.master)
            .field("join_timeout", &self.join_timeout)
            .field("peer_timeout", &self.peer_timeout)
            .field("secret", &"<redacted>")
            .field("fingerprint", &self.fingerprint)
            .finish()
    }
}

/// Ranks as processes over TCP (see the module doc).
pub struct TcpCollective {
    rank: usize,
    world: usize,
    state: Mutex<State>,
}

struct State {
    /// Rank 0: the link of rank i at index i - 1. Other ranks: the link to rank 0.
    links: Vec<Link>,
    /// The first error: the group is broken from then on.
    failed: Option<CollectiveError>,
}

impl TcpCollective {
    /// Forms the group: rank 0 listens at `r.master` and admits every worker; a worker connects
    /// to it. Both wait up to `r.join_timeout`.
    pub fn connect(r: &Rendezvous) -> Result<TcpCollective, CollectiveError> {
        validate(r)?;
        if r.rank == 0 {
            let listener = TcpListener::bind(r.master).map_err(|e| {
                CollectiveError::Config(format!(
                    "rank 0 cannot listen on {}: {e} (set MASTER_ADDR / MASTER_PORT)",
                    r.master
                ))
            })?;
            Self::serve(listener, r)
        } else {
            let link = join(r)?;
            Ok(Self::formed(r, vec![link]))
        }
    }

    /// Rank 0 on a listener already bound (tests bind port 0).
    pub fn serve(listener: TcpListener, r: &Rendezvous) -> Result<TcpCollective, CollectiveError> {
        validate(r)?;
        if r.rank != 0 {
            return Err(CollectiveError::Config(format!(
                "rank {} cannot serve the rendezvous",
                r.rank
            )));
        }
        let links = admit_all(listener, r)?;
        Ok(Self::formed(r, links))
    }

    fn formed(r: &Rendezvous, links: Vec<Link>) -> TcpCollective {
        TcpCollective {
            rank: r.rank,
            world: r.world,
            state: Mutex::new(State { links, failed: None }),
        }
    }

    /// Runs `op` on the links unless the group already failed; remembers its error.
    fn with_links(&self, op: impl FnOnce(&mut [Link]) -> Result<(), CollectiveError>) -> Result<(), CollectiveError> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = &state.failed {
            return Err(e.clone());
        }
        let result = op(&mut state.links);
        if let Err(e) = &result {
            state.failed = Some(e.clone());
        }
        result
    }
}

impl super::Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let (rank, n) = (self.rank, self.world as f32);
        self.with_links(|links| {
            if rank == 0 {
                // Summed in rank order as the buffers arrive: ((x0 + x1) + x2) ..., then / n.
                for link in links.iter_mut() {
                    // cannot fail: `receive` hands out indices below the length it is given.
                    link.receive(data.len(), |i, v| data[i] += v)?;
                }
                data.iter_mut().for_each(|x| *x /= n);
                for link in links.iter_mut() {
                    link.send(data)?;
                }
                Ok(())
            } else {
                // cannot fail: a worker's group holds its one link to rank 0 (`connect`).
                links[0].send(data)?;
                links[0].receive(data.len(), |i, v| data[i] = v)
            }
        })
    }

    fn broadcast(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        let rank = self.rank;
        self.with_links(|links| {
            if rank == 0 {
                links.iter_mut().try_for_each(|link| link.send(data))
            } else {
                // cannot fail: a worker's group holds its one link to rank 0 (`connect`).
                links[0].receive(data.len(), |i, v| data[i] = v)
            }
        })
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.all_reduce_mean(&mut [0.0])
    }
}

fn validate(r: &Rendezvous) -> Result<(), CollectiveError> {
    if r.rank >= r.world {
        return Err(CollectiveError::Config(format!(
            "rank {} is not below the world size {}",
            r.rank, r.world
        )));
    }
    if r.secret.is_empty() {
        return Err(CollectiveError::Config("the job secret is empty".into()));
    }
    if r.peer_timeout.is_zero() {
        return Err(CollectiveError::Config("the peer timeout must be above 0 s".into()));
    }
    if r.fingerprint.len() > MAX_FINGERPRINT {
        return Err(CollectiveError::Config(format!(
            "the config fingerprint has {} bytes, above the limit of {MAX_FINGERPRINT}",
            r.fingerprint.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
