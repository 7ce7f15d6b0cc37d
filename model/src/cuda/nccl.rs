//! Data parallelism across GPUs with NCCL. The NCCL group forms from the job's TCP group
//! ([`crate::collective::TcpCollective`]), which has already authenticated every rank and checked
//! that they train the same thing: rank 0 makes NCCL's unique id, sends it to the others over
//! that group, and every rank joins NCCL's communicator with it. The process that made the id
//! hosts NCCL's bootstrap, which is why it is rank 0, alive for the whole job.
//!
//! NCCL sums in its own order (rings, trees), so multi-GPU results are reproducible run to run
//! for the same world size and settings, not bit-identical to the CPU backend's rank-ordered sum.

use super::CudaError;
use super::libs::{Lib, require};
use crate::collective::Collective;
use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};
use std::ffi::c_void;
use std::sync::Arc;

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

/// This rank's place in the NCCL group; its operations are queued on the stream it joined
/// with. NCCL's raw API (through cudarc's `result` layer) so that any address range of a
/// buffer (a gradient bucket) can be reduced.
pub struct NcclGroup {
    comm: cudarc::nccl::sys::ncclComm_t,
    stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

// SAFETY: the communicator is used from one thread at a time (&mut or &self methods of the one
// trainer that owns it); NCCL communicators may move between threads.
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

fn nccl_err(what: &str, e: result::NcclError) -> CudaError {
    CudaError::Driver(format!("NCCL {what}: {e:?}"))
}

impl NcclGroup {
    /// Joins the NCCL group of the ranks of `tcp` (same ranks, same world size), queuing its
    /// operations on `stream`.
    pub fn join(stream: Arc<CudaStream>, tcp: &dyn Collective) -> Result<NcclGroup, CudaError> {
        require(Lib::Nccl)?;
        let id = share_id(tcp, || {
            let id = result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
            Ok(id.internal.map(|c| c as u8))
        })?;
        let id = cudarc::nccl::sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by ncclCommInitRank before it is read; the id, rank and
        // world size are the same on every rank (the TCP group checked the world size).
        let comm = unsafe {
            result::comm_init_rank(comm.as_mut_ptr(), tcp.world_size() as i32, id, tcp.rank() as i32)
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            comm.assume_init()
        };
        Ok(NcclGroup {
            comm,
            stream,
            rank: tcp.rank(),
            world: tcp.world_size(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Replaces `count` fp32 values at device address `ptr` with rank 0's (queued).
    pub fn broadcast(&self, ptr: u64, count: usize) -> Result<(), CudaError> {
        // SAFETY: the caller gives an address holding `count` floats, alive until the stream ran.
        unsafe {
            result::broadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                0,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err("broadcast", e))
    }

    /// Replaces `count` fp32 values at device address `ptr` with their mean over the ranks
    /// (queued).
    pub fn all_reduce_mean(&self, ptr: u64, count: usize) -> Result<(), CudaError> {
        // SAFETY: as in `broadcast`.
        unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclAvg,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err("all-reduce", e))
    }
}

impl NcclGroup {
    /// Gathers every rank's `count` fp32 values into `ptr` (rank r's at `ptr + r * count`),
    /// in place: each rank's own part is already there (queued).
    pub fn all_gather(&self, ptr: u64, count: usize) -> Result<(), CudaError> {
        let own = ptr + (self.rank * count * 4) as u64;
        // SAFETY: the caller gives an address holding `world * count` floats.
        unsafe {
            result::all_gather(
                own as *const c_void,
                ptr as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                self.comm,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_err("all-gather", e))
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        // SAFETY: the communicator is not used after this; a failure at teardown cannot be acted on.
        let _ = unsafe { result::comm_destroy(self.comm) };
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
