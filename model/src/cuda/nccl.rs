//! Data parallelism across GPUs with NCCL. The NCCL group forms from the job's TCP group
//! ([`crate::collective::TcpCollective`]), which has already authenticated every rank and checked
//! that they train the same thing: rank 0 makes NCCL's unique id, sends it to the others over
//! that group, and every rank joins NCCL's communicator with it. The process that made the id
//! hosts NCCL's bootstrap, which is why it is rank 0, alive for the whole job.
//!
//! NCCL sums in its own order (rings, trees), so multi-GPU results are reproducible run to run
//! for the same world size and settings, not bit-identical to the CPU backend's rank-ordered sum.

use super::libs::{Lib, require};
use super::{CudaError, Gpu};
use crate::collective::Collective;
use cudarc::driver::DevicePtrMut;
use cudarc::nccl::{Comm, Id, ReduceOp};

/// The size of NCCL's unique id (`ncclUniqueId`).
pub const ID_BYTES: usize = 128;

/// Rank 0's `make_id()`, known to every rank of `comm` afterwards. The bytes travel as 128 exact
/// small integers in the collective's broadcast, so no bit pattern can be altered on the way.
pub fn share_id(
    comm: &dyn Collective,
    make_id: impl FnOnce() -> Result<[u8; ID_BYTES], CudaError>,
) -> Result<[u8; ID_BYTES], CudaError> {
    let mut words = [0f32; ID_BYTES];
    if comm.rank() == 0 {
        for (w, b) in words.iter_mut().zip(make_id()?) {
            *w = f32::from(b);
        }
    }
    comm.broadcast(&mut words)
        .map_err(|e| CudaError::Driver(format!("sending NCCL's id over the TCP group: {e}")))?;
    let mut id = [0u8; ID_BYTES];
    for (b, w) in id.iter_mut().zip(words) {
        if !(0.0..=255.0).contains(&w) || w.fract() != 0.0 {
            return Err(CudaError::Driver(format!(
                "NCCL's id arrived damaged (a byte read {w})"
            )));
        }
        *b = w as u8;
    }
    Ok(id)
}

/// This rank's place in the NCCL group, on its GPU's stream.
pub struct NcclGroup {
    comm: Comm,
}

impl NcclGroup {
    /// Joins the NCCL group of the ranks of `tcp` (same ranks, same world size).
    pub fn join(gpu: &Gpu, tcp: &dyn Collective) -> Result<NcclGroup, CudaError> {
        require(Lib::Nccl)?;
        let nccl = |what: &str, e: cudarc::nccl::result::NcclError| CudaError::Driver(format!("NCCL {what}: {e:?}"));
        let id = share_id(tcp, || {
            let id = Id::new().map_err(|e| nccl("ncclGetUniqueId", e))?;
            let mut bytes = [0u8; ID_BYTES];
            for (b, c) in bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
            Ok(bytes)
        })?;
        let internal = id.map(|b| b as std::ffi::c_char);
        let comm = Comm::from_rank(gpu.stream.clone(), tcp.rank(), tcp.world_size(), Id::uninit(internal))
            .map_err(|e| nccl("ncclCommInitRank", e))?;
        Ok(NcclGroup { comm })
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// Replaces `data` with rank 0's (queued on the GPU's stream).
    pub fn broadcast(&self, data: &mut impl DevicePtrMut<f32>) -> Result<(), CudaError> {
        self.comm
            .broadcast_in_place(data, 0)
            .map(|_| ())
            .map_err(|e| CudaError::Driver(format!("NCCL broadcast: {e:?}")))
    }

    /// Replaces `data` with its mean over the ranks (queued on the GPU's stream).
    pub fn all_reduce_mean(&self, data: &mut impl DevicePtrMut<f32>) -> Result<(), CudaError> {
        self.comm
            .all_reduce_in_place(data, &ReduceOp::Avg)
            .map(|_| ())
            .map_err(|e| CudaError::Driver(format!("NCCL all-reduce: {e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{Rendezvous, TcpCollective};
    use std::time::Duration;

    /// The id exchange over the real TCP group (the path a multi-node job takes), with every
    /// byte value in the id. No NCCL library is needed: rank 0's id maker stands in for
    /// ncclGetUniqueId, whose bytes are opaque to us anyway.
    #[test]
    fn nccls_id_reaches_every_rank_over_the_tcp_group_unchanged() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let world = 3;
        let id: [u8; ID_BYTES] = std::array::from_fn(|i| (i * 2 + 255) as u8);
        let received: Vec<[u8; ID_BYTES]> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    scope.spawn(move || {
                        let comm = TcpCollective::connect(&Rendezvous {
                            rank,
                            world,
                            master: format!("127.0.0.1:{port}").parse().unwrap(),
                            join_timeout: Duration::from_secs(60),
                            peer_timeout: Duration::from_secs(60),
                            secret: b"test secret".to_vec(),
                            fingerprint: "same".into(),
                        })
                        .unwrap();
                        share_id(&comm, || {
                            assert_eq!(rank, 0, "only rank 0 makes the id");
                            Ok(id)
                        })
                        .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(received.iter().all(|r| *r == id));
    }

    #[test]
    fn a_failing_id_maker_fails_rank_0_with_its_error() {
        let err = share_id(&crate::collective::Single, || Err(CudaError::NoDevice("test".into()))).unwrap_err();
        assert!(err.to_string().contains("test"), "{err}");
    }
}
