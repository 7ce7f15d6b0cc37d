//! Reductions across data-parallel ranks: the [`Collective`] trait, its error, and three
//! implementations — [`Single`] (one process), [`ThreadRank`] (threads of one process: tests,
//! one machine) and [`TcpCollective`] (processes over TCP with an authenticated rendezvous).
//!
//! ```text
//! collective.rs           the trait and its contract, CollectiveError, Single, ThreadRank
//! collective/tcp.rs       TcpCollective: the group, its operations, the protocol in its doc
//! collective/handshake.rs forming the group: the authenticated rendezvous (HMAC challenge-response)
//! collective/wire.rs      the preamble, frames with size limits, timeouts, errors naming the peer
//! ```

mod handshake;
mod tcp;
mod wire;

pub use tcp::{Rendezvous, TcpCollective};
pub use wire::{MAGIC, PROTOCOL_VERSION};

use std::sync::{Arc, Barrier, Mutex, MutexGuard, PoisonError};

/// Why a collective operation (or forming the group) failed. Each variant says whose fault it is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CollectiveError {
    /// The ranks' settings are wrong or disagree (job secret, world size, rank, training config):
    /// the user's to fix; restarting as is fails the same way.
    #[error("{0}")]
    Config(String),
    /// The group did not form: ranks missing at the rendezvous deadline, rank 0 unreachable.
    #[error("{0}")]
    Rendezvous(String),
    /// Peer `rank` went away, stayed silent past the timeout or broke the protocol. The job cannot
    /// go on without it: restart every rank (from the last checkpoint).
    #[error("rank {rank} {reason}")]
    Peer { rank: usize, reason: String },
}

/// Reductions across data-parallel ranks.
///
/// The contract every implementation keeps:
/// - every rank calls the same operations in the same order, with buffers of the same length;
/// - reductions are summed in rank order, so every rank ends with bit-identical results;
/// - an operation returns an error, never panics, when a peer is lost, silent or misbehaving;
///   after an error the group is broken, and every later call on it fails too.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `data` with the mean over ranks, summed in rank order (deterministic).
    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<(), CollectiveError>;
    /// Replaces `data` with rank 0's.
    fn broadcast(&self, data: &mut [f32]) -> Result<(), CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;
}

/// One process, no peers.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_mean(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&self, _: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// Ranks as threads of one process, exchanging through shared memory: the CPU stand-in for
/// NCCL in tests and on one machine.
pub struct ThreadRank {
    rank: usize,
    shared: Arc<ThreadShared>,
}

struct ThreadShared {
    world: usize,
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl ThreadRank {
    /// The `world` ranks of one group, to hand to one thread each.
    pub fn group(world: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(ThreadShared {
            world,
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| ThreadRank {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// The slots. Nothing panics while holding the lock, so a poisoned one still holds whole data.
    fn slots(&self) -> MutexGuard<'_, Vec<Vec<f32>>> {
        self.shared.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A rank whose buffer is not `len` long (a broken contract), as an error.
    fn check_lengths(slots: &[Vec<f32>], ranks: std::ops::Range<usize>, len: usize) -> Result<(), CollectiveError> {
        match ranks.into_iter().find(|&r| slots[r].len() != len) {
            Some(rank) => Err(CollectiveError::Peer {
                rank,
                reason: format!("passed {} values where {len} were expected", slots[rank].len()),
            }),
            None => Ok(()),
        }
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_mean(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        self.slots()[self.rank] = data.to_vec();
        self.shared.barrier.wait();
        // Every rank passes both barriers, errors included, so none is left waiting.
        let result = {
            let slots = self.slots();
            // cannot fail below: every slot holds data.len() values (just checked), and there is
            // at least one slot since this rank exists.
            Self::check_lengths(&slots, 0..self.shared.world, data.len()).map(|()| {
                let n = self.shared.world as f32;
                for (i, x) in data.iter_mut().enumerate() {
                    let mut sum = slots[0][i];
                    for slot in &slots[1..] {
                        sum += slot[i];
                    }
                    *x = sum / n;
                }
            })
        };
        self.shared.barrier.wait();
        result
    }

    fn broadcast(&self, data: &mut [f32]) -> Result<(), CollectiveError> {
        if self.rank == 0 {
            self.slots()[0] = data.to_vec();
        }
        self.shared.barrier.wait();
        let result = {
            let slots = self.slots();
            Self::check_lengths(&slots, 0..1, data.len()).map(|()| data.copy_from_slice(&slots[0]))
        };
        self.shared.barrier.wait();
        result
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        self.shared.barrier.wait();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ranks_average_in_rank_order_and_report_a_length_mismatch() {
        let ranks = ThreadRank::group(3);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|comm| {
                    scope.spawn(move || {
                        let mut data = vec![comm.rank() as f32; 4];
                        comm.all_reduce_mean(&mut data).unwrap();
                        let mut root = vec![comm.rank() as f32 + 10.0; 2];
                        comm.broadcast(&mut root).unwrap();
                        // Rank 2 breaks the contract: every rank gets an error, none hangs.
                        let mut odd = vec![0.0; if comm.rank() == 2 { 3 } else { 2 }];
                        let err = comm.all_reduce_mean(&mut odd).unwrap_err();
                        (data, root, err)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (data, root, err) in results {
            assert_eq!(data, vec![1.0; 4]);
            assert_eq!(root, vec![10.0; 2]);
            assert!(matches!(err, CollectiveError::Peer { .. }), "{err}");
        }
    }
}
