//! The TCP group over real loopback sockets: results equal the thread ranks', and every way a
//! peer can be wrong (secret, world size, config, frames, silence, impostor rank 0) ends in an
//! error naming it, never a panic or a hang.

use super::super::wire::{Link, MAGIC, PROTOCOL_VERSION};
use super::super::{Collective, CollectiveError, ThreadRank};
use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

fn rendezvous(rank: usize, world: usize, master: SocketAddr) -> Rendezvous {
    Rendezvous {
        rank,
        world,
        master,
        join_timeout: Duration::from_secs(20),
        peer_timeout: Duration::from_secs(20),
        secret: b"test secret".to_vec(),
        fingerprint: "model = micro\nmicro_batch = 2\n".into(),
    }
}

/// Rank 0 serving on a fresh loopback port, in a thread.
fn rank0(
    world: usize,
    tweak: impl FnOnce(&mut Rendezvous) + Send + 'static,
) -> (
    SocketAddr,
    std::thread::JoinHandle<Result<TcpCollective, CollectiveError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let master = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let mut r = rendezvous(0, world, master);
        tweak(&mut r);
        TcpCollective::serve(listener, &r)
    });
    (master, handle)
}

fn worker(
    rank: usize,
    world: usize,
    master: SocketAddr,
    tweak: impl FnOnce(&mut Rendezvous),
) -> Result<TcpCollective, CollectiveError> {
    let mut r = rendezvous(rank, world, master);
    tweak(&mut r);
    TcpCollective::connect(&r)
}

fn exchange(comm: &dyn Collective) -> (Vec<f32>, Vec<f32>) {
    let r = comm.rank() as f32;
    let mut data: Vec<f32> = (0..5).map(|i| 0.1 * i as f32 + r * 1.7).collect();
    comm.all_reduce_mean(&mut data).unwrap();
    let mut root = vec![r + 3.0; 3];
    comm.broadcast(&mut root).unwrap();
    comm.barrier().unwrap();
    (data, root)
}

#[test]
fn tcp_ranks_match_thread_ranks_bit_for_bit() {
    let (master, zero) = rank0(3, |_| ());
    let workers: Vec<_> = (1..3)
        .map(|rank| std::thread::spawn(move || exchange(&worker(rank, 3, master, |_| ()).unwrap())))
        .collect();
    let zero = zero.join().unwrap().unwrap();
    let mut tcp = vec![exchange(&zero)];
    tcp.extend(workers.into_iter().map(|w| w.join().unwrap()));
    let threads: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadRank::group(3)
            .into_iter()
            .map(|comm| s.spawn(move || exchange(&comm)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(tcp, threads);
}

#[test]
fn a_wrong_secret_is_refused_and_the_real_rank_still_joins() {
    let (master, zero) = rank0(2, |_| ());
    let err = worker(1, 2, master, |r| r.secret = b"guess".to_vec()).err().unwrap();
    assert!(
        matches!(&err, CollectiveError::Config(m) if m.contains("refused rank 1: authentication failed")),
        "{err}"
    );
    let one = std::thread::spawn(move || exchange(&worker(1, 2, master, |_| ()).unwrap()));
    let zero = zero.join().unwrap().unwrap();
    assert_eq!(exchange(&zero), one.join().unwrap());
}

#[test]
fn world_size_and_config_mismatches_name_both_values_on_both_ends() {
    let (master, zero) = rank0(2, |_| ());
    let err = worker(1, 3, master, |_| ()).err().unwrap().to_string();
    assert!(err.contains("rank 1 has world size 3, rank 0 has 2"), "{err}");
    let err = zero.join().unwrap().err().unwrap().to_string();
    assert!(err.contains("rank 1 has world size 3, rank 0 has 2"), "{err}");

    let (master, zero) = rank0(2, |_| ());
    let err = worker(1, 2, master, |r| r.fingerprint = r.fingerprint.replace("= 2", "= 4"))
        .err()
        .unwrap()
        .to_string();
    let want = "micro_batch = 4 on rank 1, 2 on rank 0";
    assert!(err.contains(want), "{err}");
    let zero = zero.join().unwrap().err().unwrap();
    assert!(
        matches!(&zero, CollectiveError::Config(m) if m.contains(want)),
        "{zero}"
    );
}

/// A client that is not a rank: what rank 0 sends it before hanging up.
fn probe(master: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(master).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn preamble() -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p
}

#[test]
fn oversized_frames_garbage_and_impostors_are_dropped_while_rank_0_waits() {
    let (master, zero) = rank0(2, |_| ());
    // Not safepipe at all (12 bytes: all of it is read, so the close is clean).
    assert_eq!(probe(master, b"GET / HTTP/1"), preamble());
    // A HELLO header announcing 2^62 bytes: refused unread (nothing of that size is allocated).
    let mut huge = preamble();
    huge.push(1);
    huge.extend_from_slice(&(1u64 << 62).to_le_bytes());
    assert_eq!(probe(master, &huge), preamble());
    // A client that claims rank 1 with a made-up proof: told authentication failed, given nothing.
    let mut s = TcpStream::connect(master).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = preamble();
    hello.push(1);
    hello.extend_from_slice(&40u64.to_le_bytes());
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&2u32.to_le_bytes());
    hello.extend_from_slice(&[7u8; 32]);
    s.write_all(&hello).unwrap();
    let mut answer = [0u8; 12 + 9 + 32];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(answer[12], 2, "a CHALLENGE");
    let mut proof = vec![3u8];
    proof.extend_from_slice(&32u64.to_le_bytes());
    proof.extend_from_slice(&[0u8; 32]);
    s.write_all(&proof).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert_eq!(rest[0], 5, "an ERROR frame");
    assert!(String::from_utf8_lossy(&rest[9..]).contains("authentication failed"));
    // The real rank 1 still joins.
    let one = std::thread::spawn(move || exchange(&worker(1, 2, master, |_| ()).unwrap()));
    let zero = zero.join().unwrap().unwrap();
    assert_eq!(exchange(&zero), one.join().unwrap());
}

#[test]
fn a_worker_refuses_an_impostor_rank_0() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let master = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 12 + 9 + 40];
        s.read_exact(&mut hello).unwrap();
        let mut reply = preamble();
        reply.push(2);
        reply.extend_from_slice(&32u64.to_le_bytes());
        reply.extend_from_slice(&[9u8; 32]);
        s.write_all(&reply).unwrap();
        let mut header = [0u8; 9];
        s.read_exact(&mut header).unwrap();
        let mut proof = vec![0u8; u64::from_le_bytes(header[1..].try_into().unwrap()) as usize];
        s.read_exact(&mut proof).unwrap();
        let mut welcome = vec![4u8];
        welcome.extend_from_slice(&32u64.to_le_bytes());
        welcome.extend_from_slice(&[0u8; 32]);
        s.write_all(&welcome).unwrap();
    });
    let err = worker(1, 2, master, |_| ()).err().unwrap().to_string();
    assert!(err.contains("did not prove it holds the job secret"), "{err}");
    fake.join().unwrap();
}

#[test]
fn a_silent_then_vanished_peer_is_an_error_naming_its_rank() {
    let (master, zero) = rank0(2, |r| r.peer_timeout = Duration::from_millis(300));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let one = std::thread::spawn(move || {
        let comm = worker(1, 2, master, |_| ()).unwrap();
        // Joined, then silent until told, then gone.
        rx.recv().unwrap();
        drop(comm);
    });
    let zero = zero.join().unwrap().unwrap();
    let err = zero.all_reduce_mean(&mut [1.0, 2.0]).unwrap_err();
    assert_eq!(
        err,
        CollectiveError::Peer {
            rank: 1,
            reason: "sent nothing for 0.3 s (stuck, stopped or overloaded; SAFEPIPE_COLLECTIVE_TIMEOUT)".into()
        }
    );
    assert!(err.to_string().starts_with("rank 1 sent nothing for 0.3 s"));
    // The group is broken from then on.
    assert_eq!(zero.barrier().unwrap_err(), err);
    tx.send(()).unwrap();
    one.join().unwrap();

    // A peer that goes away.
    let (master, zero) = rank0(2, |_| ());
    std::thread::spawn(move || drop(worker(1, 2, master, |_| ()).unwrap()))
        .join()
        .unwrap();
    let err = zero.join().unwrap().unwrap().broadcast(&mut [0.0]).err();
    // Sending to a closed socket may still succeed once (the kernel buffers it); receiving cannot.
    if let Some(err) = err {
        assert!(matches!(&err, CollectiveError::Peer { rank: 1, .. }), "{err}");
    }
}

#[test]
fn a_peer_that_vanishes_mid_reduce_is_reported_by_the_other() {
    let (master, zero) = rank0(2, |_| ());
    let one = std::thread::spawn(move || drop(worker(1, 2, master, |_| ()).unwrap()));
    let zero = zero.join().unwrap().unwrap();
    one.join().unwrap();
    let err = zero.all_reduce_mean(&mut [1.0]).unwrap_err();
    assert!(
        matches!(&err, CollectiveError::Peer { rank: 1, reason } if reason.starts_with("closed the connection")),
        "{err}"
    );
}

/// A linked pair of sockets: our end as a [`Link`] to "rank 4", and the raw other end.
fn linked() -> (Link, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let raw = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (ours, _) = listener.accept().unwrap();
    (Link::new(ours, 4, Duration::from_secs(20)).unwrap(), raw)
}

#[test]
fn data_frames_of_another_size_or_kind_are_refused_unread() {
    let (mut link, mut raw) = linked();
    // Announces 2^60 bytes where 16 are expected: an error, no allocation of the claim.
    let mut header = vec![6u8];
    header.extend_from_slice(&(1u64 << 60).to_le_bytes());
    raw.write_all(&header).unwrap();
    let err = link.receive(4, |_, _| ()).unwrap_err().to_string();
    assert!(
        err.starts_with("rank 4 sent a DATA frame of 1152921504606846976 bytes where a DATA frame of 16"),
        "{err}"
    );

    let (mut link, mut raw) = linked();
    let mut error = vec![5u8];
    error.extend_from_slice(&(13u64).to_le_bytes());
    error.extend_from_slice(b"disk is full!");
    raw.write_all(&error).unwrap();
    let err = link.receive(4, |_, _| ()).unwrap_err().to_string();
    assert_eq!(err, "rank 4 stopped: disk is full!");

    // A well-formed frame round-trips.
    let (mut link, raw) = linked();
    let mut other = Link::new(raw, 0, Duration::from_secs(20)).unwrap();
    other.send(&[1.5, -2.0, 3.25]).unwrap();
    let mut got = vec![0f32; 3];
    link.receive(3, |i, v| got[i] = v).unwrap();
    assert_eq!(got, vec![1.5, -2.0, 3.25]);
}

#[test]
fn rank_0_gives_up_at_the_deadline_and_tells_the_ranks_that_joined() {
    let (master, zero) = rank0(3, |r| r.join_timeout = Duration::from_millis(500));
    let one = worker(1, 3, master, |_| ()).unwrap();
    let err = zero.join().unwrap().err().unwrap();
    assert!(
        matches!(&err, CollectiveError::Rendezvous(m) if m.contains("ranks [2] did not join")),
        "{err}"
    );
    // A worker's first operation receives (the weights' broadcast): it reads rank 0's reason.
    let err = one.broadcast(&mut [0.0]).unwrap_err().to_string();
    assert!(
        err.starts_with("rank 0 stopped: rank 0 stopped the rendezvous: ranks [2]"),
        "{err}"
    );
}

#[test]
fn a_worker_without_rank_0_gives_up_at_the_deadline() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let err = worker(1, 2, port, |r| r.join_timeout = Duration::from_millis(300))
        .err()
        .unwrap();
    assert!(
        matches!(&err, CollectiveError::Rendezvous(m) if m.contains("cannot reach rank 0")),
        "{err}"
    );
}

#[test]
fn the_secret_stays_out_of_debug_output() {
    let r = rendezvous(0, 2, "127.0.0.1:1".parse().unwrap());
    assert!(!format!("{r:?}").contains("test secret"));
}
