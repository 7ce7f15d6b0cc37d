//! Forming a group (the protocol is described in tcp.rs): rank 0 admits workers one connection
//! at a time ([`admit_all`]), a worker connects and proves itself ([`join`]). Both sides prove
//! they hold the job secret with HMAC-SHA256 over a transcript of fresh nonces, rank, world size
//! and the config fingerprint.

use super::CollectiveError;
use super::tcp::Rendezvous;
use super::wire::*;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};
use tracing::{info, warn};

fn nonce() -> Result<[u8; NONCE], CollectiveError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n)
        .map_err(|e| CollectiveError::Rendezvous(format!("the operating system gave no random bytes: {e}")))?;
    Ok(n)
}

/// What both proofs cover.
struct Transcript {
    nonce0: [u8; NONCE],
    nonce_w: [u8; NONCE],
    rank: u32,
    world: u32,
    fingerprint: [u8; 32],
}

const WORKER_LABEL: &[u8; 8] = b"worker  ";
const RANK0_LABEL: &[u8; 8] = b"rank 0  ";

impl Transcript {
    fn mac(&self, secret: &[u8], label: &[u8; 8]) -> Result<Hmac<Sha256>, CollectiveError> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
            .map_err(|e| CollectiveError::Config(format!("the job secret cannot key HMAC-SHA256: {e}")))?;
        mac.update(label);
        mac.update(&preamble());
        mac.update(&self.nonce0);
        mac.update(&self.nonce_w);
        mac.update(&self.rank.to_le_bytes());
        mac.update(&self.world.to_le_bytes());
        mac.update(&self.fingerprint);
        Ok(mac)
    }

    fn prove(&self, secret: &[u8], label: &[u8; 8]) -> Result<Vec<u8>, CollectiveError> {
        Ok(self.mac(secret, label)?.finalize().into_bytes().to_vec())
    }

    /// Constant-time check of the other side's proof.
    fn verify(&self, secret: &[u8], label: &[u8; 8], tag: &[u8]) -> Result<bool, CollectiveError> {
        Ok(self.mac(secret, label)?.verify_slice(tag).is_ok())
    }
}

fn fingerprint_hash(fingerprint: &[u8]) -> [u8; 32] {
    Sha256::digest(fingerprint).into()
}

/// The keys whose values differ between two `key = value` fingerprints, with both values.
fn describe_mismatch(peer: usize, theirs: &str, ours: &str) -> String {
    let parse = |s: &str| -> std::collections::BTreeMap<String, String> {
        s.lines()
            .filter_map(|l| l.split_once(" = "))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    };
    let (t, o) = (parse(theirs), parse(ours));
    let keys: std::collections::BTreeSet<&String> = t.keys().chain(o.keys()).collect();
    let absent = "(absent)".to_string();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter_map(|k| {
            let (a, b) = (t.get(k).unwrap_or(&absent), o.get(k).unwrap_or(&absent));
            (a != b).then(|| format!("{k} = {a} on rank {peer}, {b} on rank 0"))
        })
        .collect();
    let detail = if diffs.is_empty() {
        format!(
            "fingerprint {} on rank {peer}, {} on rank 0",
            hex::encode(fingerprint_hash(theirs.as_bytes())),
            hex::encode(fingerprint_hash(ours.as_bytes()))
        )
    } else {
        diffs.join("; ")
    };
    format!(
        "rank {peer} trains with a different setup than rank 0: {detail} (start every rank with the same config and flags)"
    )
}

/// What became of one connection to rank 0.
enum Admission {
    Joined(usize, TcpStream),
    /// Not (yet) a rank of this job: log and drop.
    Refused(String),
    /// A rank of this job that disagrees with rank 0: the job cannot go on.
    Fatal(CollectiveError),
}

impl From<io::Error> for Admission {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Admission::Refused(format!(
                "it did not complete the handshake within {} s",
                seconds(HANDSHAKE_TIMEOUT)
            )),
            _ => Admission::Refused(format!("the handshake failed: {e}")),
        }
    }
}

/// Rank 0: accepts connections until every worker has joined or the deadline passes.
pub(super) fn admit_all(listener: TcpListener, r: &Rendezvous) -> Result<Vec<Link>, CollectiveError> {
    let master = listener.local_addr().unwrap_or(r.master);
    let deadline = Instant::now() + r.join_timeout;
    let fail = |e: io::Error| CollectiveError::Rendezvous(format!("accepting connections on {master}: {e}"));
    listener.set_nonblocking(true).map_err(fail)?;
    let mut slots: Vec<Option<TcpStream>> = (1..r.world).map(|_| None).collect();
    let ours = fingerprint_hash(r.fingerprint.as_bytes());
    while slots.iter().any(Option::is_none) {
        let (stream, from) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<usize> = (1..r.world).filter(|i| slots[i - 1].is_none()).collect();
                    let e = CollectiveError::Rendezvous(format!(
                        "ranks {missing:?} did not join at {master} within {} s (SAFEPIPE_RENDEZVOUS_TIMEOUT)",
                        seconds(r.join_timeout)
                    ));
                    abort(&mut slots, &e);
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            // A client that hung up before being accepted: its doing, not rank 0's.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                ) =>
            {
                continue;
            }
            Err(e) => return Err(fail(e)),
        };
        match admit(stream, from, r, &ours, &slots).unwrap_or_else(Admission::Fatal) {
            Admission::Joined(rank, stream) => {
                info!(rank, from = %from, "rank {rank} joined the data-parallel group");
                slots[rank - 1] = Some(stream);
            }
            Admission::Refused(why) => {
                warn!(from = %from, "rank 0 refused a connection: {why}");
            }
            Admission::Fatal(e) => {
                abort(&mut slots, &e);
                return Err(e);
            }
        }
    }
    slots
        .into_iter()
        .enumerate()
        .filter_map(|(i, s)| s.map(|s| (i + 1, s)))
        .map(|(rank, stream)| Link::new(stream, rank, r.peer_timeout))
        .collect()
}

/// Tells the ranks already joined that the group will not form (best effort).
fn abort(slots: &mut [Option<TcpStream>], e: &CollectiveError) {
    let message = format!("rank 0 stopped the rendezvous: {e}");
    for stream in slots.iter_mut().flatten() {
        let _ = write_frame(stream, ERROR, message.as_bytes());
    }
}

/// What a connection claims: its HELLO and PROOF.
struct Claim {
    rank: u32,
    world: u32,
    nonce_w: [u8; NONCE],
    tag: Vec<u8>,
    fingerprint: Vec<u8>,
}

/// Rank 0's side up to the proof: preamble, HELLO, CHALLENGE, PROOF. `Ok(Err(why))`: refused.
fn read_claim(stream: &mut Timed<'_>, nonce0: &[u8; NONCE]) -> io::Result<Result<Claim, String>> {
    stream.write_all(&preamble())?;
    if let Err(why) = read_preamble(stream)? {
        return Ok(Err(why));
    }
    let hello = match expect_frame(stream, HELLO, |n| n == 8 + NONCE)? {
        Got::Frame(p) => p,
        Got::Error(message) => return Ok(Err(format!("it sent an error: {message}"))),
        Got::Bad(why) => return Ok(Err(why)),
    };
    write_frame(stream, CHALLENGE, nonce0)?;
    let mut proof = match expect_frame(stream, PROOF, |n| n >= TAG)? {
        Got::Frame(p) => p,
        Got::Error(message) => return Ok(Err(format!("it sent an error: {message}"))),
        Got::Bad(why) => return Ok(Err(why)),
    };
    // cannot fail: `expect_frame` checked the lengths (PROOF at least TAG, HELLO 8 + NONCE).
    let fingerprint = proof.split_off(TAG);
    let mut nonce_w = [0u8; NONCE];
    nonce_w.copy_from_slice(&hello[8..]);
    Ok(Ok(Claim {
        rank: u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]]),
        world: u32::from_le_bytes([hello[4], hello[5], hello[6], hello[7]]),
        nonce_w,
        tag: proof,
        fingerprint,
    }))
}

/// Rank 0's side of one handshake. `Err` only for a failure of rank 0 itself.
fn admit(
    stream: TcpStream,
    from: SocketAddr,
    r: &Rendezvous,
    ours: &[u8; 32],
    slots: &[Option<TcpStream>],
) -> Result<Admission, CollectiveError> {
    if let Err(e) = stream.set_nonblocking(false).and_then(|()| stream.set_nodelay(true)) {
        return Ok(e.into());
    }
    let mut timed = Timed {
        stream: &stream,
        deadline: Instant::now() + HANDSHAKE_TIMEOUT,
    };
    let nonce0 = nonce()?;
    let claim = match read_claim(&mut timed, &nonce0) {
        Err(e) => return Ok(e.into()),
        Ok(Err(why)) => return Ok(Admission::Refused(why)),
        Ok(Ok(claim)) => claim,
    };
    let transcript = Transcript {
        nonce0,
        nonce_w: claim.nonce_w,
        rank: claim.rank,
        world: claim.world,
        fingerprint: fingerprint_hash(&claim.fingerprint),
    };
    if !transcript.verify(&r.secret, WORKER_LABEL, &claim.tag)? {
        let _ = write_frame(
            &mut timed,
            ERROR,
            b"authentication failed: this rank's job secret differs from rank 0's (set the same \
              SAFEPIPE_JOB_SECRET on every rank, or run every rank in the same scheduler job)",
        );
        return Ok(Admission::Refused(format!(
            "it claimed rank {} but failed authentication (a wrong job secret)",
            claim.rank
        )));
    }
    // Authenticated: a rank of this job. From here on a disagreement is the job's to fix.
    let (rank, world) = (claim.rank as usize, claim.world as usize);
    let disagreement = if world != r.world {
        Some(format!(
            "rank {rank} has world size {world}, rank 0 has {} (start every rank with the same WORLD_SIZE)",
            r.world
        ))
    } else if rank == 0 || rank >= r.world {
        Some(format!(
            "a process at {from} claims rank {rank}, but the workers are ranks 1..{} (check RANK / SLURM_PROCID)",
            r.world - 1
        ))
    } else if slots[rank - 1].is_some() {
        Some(format!(
            "two processes claim rank {rank} (the second from {from}; check RANK / SLURM_PROCID)"
        ))
    } else if transcript.fingerprint != *ours {
        Some(describe_mismatch(
            rank,
            &String::from_utf8_lossy(&claim.fingerprint),
            &r.fingerprint,
        ))
    } else {
        None
    };
    if let Some(message) = disagreement {
        let _ = write_frame(&mut timed, ERROR, message.as_bytes());
        return Ok(Admission::Fatal(CollectiveError::Config(message)));
    }
    let welcome = transcript.prove(&r.secret, RANK0_LABEL)?;
    if let Err(e) = write_frame(&mut timed, WELCOME, &welcome) {
        return Ok(e.into());
    }
    Ok(Admission::Joined(rank, stream))
}

/// A worker's side: connects to rank 0 (retrying until the deadline) and runs the handshake.
pub(super) fn join(r: &Rendezvous) -> Result<Link, CollectiveError> {
    let deadline = Instant::now() + r.join_timeout;
    let (rank, master) = (r.rank, r.master);
    let stream = loop {
        match TcpStream::connect_timeout(&master, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(CollectiveError::Rendezvous(format!(
                    "cannot reach rank 0 at {master} within {} s (SAFEPIPE_RENDEZVOUS_TIMEOUT): {e}",
                    seconds(r.join_timeout)
                )));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    // Rank 0 admits one connection at a time: wait for it until the deadline.
    let mut timed = Timed {
        stream: &stream,
        deadline: deadline.max(Instant::now() + Duration::from_secs(1)),
    };
    let io = |e: io::Error| {
        let what = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!(
                    "it did not answer within {} s (SAFEPIPE_RENDEZVOUS_TIMEOUT)",
                    seconds(r.join_timeout)
                )
            }
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => {
                "it closed the connection (its log says why)".to_string()
            }
            _ => e.to_string(),
        };
        CollectiveError::Rendezvous(format!("the handshake with rank 0 at {master} failed: {what}"))
    };
    stream.set_nodelay(true).map_err(io)?;
    let refused = |why: String| CollectiveError::Config(format!("rank 0 at {master} refused rank {rank}: {why}"));
    let not_rank0 = |why: String| {
        CollectiveError::Config(format!(
            "what answers at {master} is not rank 0 of this job: {why} (check MASTER_ADDR / MASTER_PORT)"
        ))
    };
    let nonce_w = nonce()?;
    let mut hello = Vec::with_capacity(8 + NONCE);
    hello.extend_from_slice(&(rank as u32).to_le_bytes());
    hello.extend_from_slice(&(r.world as u32).to_le_bytes());
    hello.extend_from_slice(&nonce_w);
    timed.write_all(&preamble()).map_err(io)?;
    write_frame(&mut timed, HELLO, &hello).map_err(io)?;
    read_preamble(&mut timed).map_err(io)?.map_err(not_rank0)?;
    let expect = |want: u8, stream: &mut Timed<'_>| -> Result<Vec<u8>, CollectiveError> {
        match expect_frame(stream, want, |n| n == handshake_cap(want)).map_err(io)? {
            Got::Frame(p) => Ok(p),
            Got::Error(message) => Err(refused(message)),
            Got::Bad(why) => Err(not_rank0(why)),
        }
    };
    let challenge = expect(CHALLENGE, &mut timed)?;
    let mut nonce0 = [0u8; NONCE];
    // cannot fail: `expect` took only a CHALLENGE of exactly NONCE bytes.
    nonce0.copy_from_slice(&challenge);
    let transcript = Transcript {
        nonce0,
        nonce_w,
        rank: rank as u32,
        world: r.world as u32,
        fingerprint: fingerprint_hash(r.fingerprint.as_bytes()),
    };
    let mut proof = transcript.prove(&r.secret, WORKER_LABEL)?;
    proof.extend_from_slice(r.fingerprint.as_bytes());
    write_frame(&mut timed, PROOF, &proof).map_err(io)?;
    let welcome = expect(WELCOME, &mut timed)?;
    if !transcript.verify(&r.secret, RANK0_LABEL, &welcome)? {
        return Err(not_rank0(
            "it did not prove it holds the job secret; its weights are refused".into(),
        ));
    }
    info!(rank, master = %master, "joined the data-parallel group");
    Link::new(stream, 0, r.peer_timeout)
}
