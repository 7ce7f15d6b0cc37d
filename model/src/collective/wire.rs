//! The bytes between ranks: the preamble, frames checked against size limits before their payload
//! is read, and [`Link`], an established stream with its timeouts and the errors that name the
//! peer. The protocol is described in tcp.rs.

use super::CollectiveError;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The first bytes each side sends.
pub const MAGIC: [u8; 8] = *b"SAFEPIPE";
/// The rendezvous protocol spoken here; both sides must speak the same.
pub const PROTOCOL_VERSION: u32 = 1;
/// How long rank 0 gives one connection to complete the handshake.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest fingerprint a worker may send.
pub(super) const MAX_FINGERPRINT: usize = 64 * 1024;
/// The longest ERROR message either side reads.
pub(super) const MAX_MESSAGE: usize = 64 * 1024;

pub(super) const HELLO: u8 = 1;
pub(super) const CHALLENGE: u8 = 2;
pub(super) const PROOF: u8 = 3;
pub(super) const WELCOME: u8 = 4;
pub(super) const ERROR: u8 = 5;
pub(super) const DATA: u8 = 6;

pub(super) const NONCE: usize = 32;
pub(super) const TAG: usize = 32;
const HEADER: usize = 9;
/// Bytes of a DATA payload moved per read or write call.
const CHUNK: usize = 1 << 20;

pub(super) fn kind_name(kind: u8) -> &'static str {
    match kind {
        HELLO => "HELLO",
        CHALLENGE => "CHALLENGE",
        PROOF => "PROOF",
        WELCOME => "WELCOME",
        ERROR => "ERROR",
        DATA => "DATA",
        _ => "unknown",
    }
}

/// The most payload a handshake or error frame of `kind` may carry (DATA is checked against the
/// buffer being exchanged instead).
pub(super) fn handshake_cap(kind: u8) -> usize {
    match kind {
        HELLO => 8 + NONCE,
        CHALLENGE => NONCE,
        PROOF => TAG + MAX_FINGERPRINT,
        WELCOME => TAG,
        ERROR => MAX_MESSAGE,
        _ => 0,
    }
}

pub(super) fn seconds(d: Duration) -> String {
    format!("{}", d.as_secs_f64())
}

/// One established stream to peer `rank`.
pub(super) struct Link {
    stream: TcpStream,
    rank: usize,
    timeout: Duration,
}

impl Link {
    pub(super) fn new(stream: TcpStream, rank: usize, timeout: Duration) -> Result<Link, CollectiveError> {
        let setup = stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)));
        let link = Link { stream, rank, timeout };
        setup.map_err(|e| link.fail(e, false))?;
        Ok(link)
    }

    /// An I/O error on this link, as what the peer did.
    pub(super) fn fail(&self, e: io::Error, sending: bool) -> CollectiveError {
        let t = seconds(self.timeout);
        let reason = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if sending => {
                format!("took nothing for {t} s (stuck or overloaded; SAFEPIPE_COLLECTIVE_TIMEOUT)")
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut if self.rank == 0 => format!(
                "sent nothing for {t} s (SAFEPIPE_COLLECTIVE_TIMEOUT; raise it if rank 0's checkpoints take longer to save)"
            ),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                format!("sent nothing for {t} s (stuck, stopped or overloaded; SAFEPIPE_COLLECTIVE_TIMEOUT)")
            }
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => "closed the connection (it stopped or crashed; its log says why)".into(),
            _ => format!("went away ({e})"),
        };
        CollectiveError::Peer {
            rank: self.rank,
            reason,
        }
    }

    pub(super) fn send(&mut self, data: &[f32]) -> Result<(), CollectiveError> {
        let mut header = [0u8; HEADER];
        header[0] = DATA;
        header[1..].copy_from_slice(&(data.len() as u64 * 4).to_le_bytes());
        self.stream.write_all(&header).map_err(|e| self.fail(e, true))?;
        let mut bytes = Vec::with_capacity(CHUNK.min(data.len() * 4));
        for chunk in data.chunks(CHUNK / 4) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            self.stream.write_all(&bytes).map_err(|e| self.fail(e, true))?;
        }
        Ok(())
    }

    /// Reads a DATA frame of exactly `len` values, handing each to `put(index, value)`. A frame
    /// of another kind or length is refused before its payload is read.
    pub(super) fn receive(&mut self, len: usize, mut put: impl FnMut(usize, f32)) -> Result<(), CollectiveError> {
        let (kind, size) = read_header(&mut self.stream).map_err(|e| self.fail(e, false))?;
        let expected = len as u64 * 4;
        if kind == ERROR && size <= MAX_MESSAGE as u64 {
            let message = read_payload(&mut self.stream, size).map_err(|e| self.fail(e, false))?;
            let reason = format!("stopped: {}", String::from_utf8_lossy(&message));
            return Err(CollectiveError::Peer {
                rank: self.rank,
                reason,
            });
        }
        if kind != DATA || size != expected {
            let reason = format!(
                "sent a {} frame of {size} bytes where a DATA frame of {expected} was expected; refused unread \
                 (a protocol error: is every rank the same safepipe build and config?)",
                kind_name(kind)
            );
            return Err(CollectiveError::Peer {
                rank: self.rank,
                reason,
            });
        }
        // The frame's size was checked to be exactly `len` values: nothing below depends on the peer.
        let mut bytes = vec![0u8; CHUNK.min(len * 4)];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(CHUNK / 4);
            self.stream
                .read_exact(&mut bytes[..n * 4])
                .map_err(|e| self.fail(e, false))?;
            for (j, b) in bytes[..n * 4].chunks_exact(4).enumerate() {
                put(at + j, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
            at += n;
        }
        Ok(())
    }
}

pub(super) fn read_header(stream: &mut impl Read) -> io::Result<(u8, u64)> {
    let mut header = [0u8; HEADER];
    stream.read_exact(&mut header)?;
    let mut len = [0u8; 8];
    len.copy_from_slice(&header[1..]);
    Ok((header[0], u64::from_le_bytes(len)))
}

/// Reads `len` bytes; the caller has checked `len` against its cap.
pub(super) fn read_payload(stream: &mut impl Read, len: u64) -> io::Result<Vec<u8>> {
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok(payload)
}

pub(super) fn write_frame(stream: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(HEADER + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

pub(super) fn preamble() -> [u8; 12] {
    let mut p = [0u8; 12];
    p[..8].copy_from_slice(&MAGIC);
    p[8..].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p
}

/// Reads the other side's preamble: `Err` says what is wrong with it.
pub(super) fn read_preamble(stream: &mut impl Read) -> io::Result<Result<(), String>> {
    let mut p = [0u8; 12];
    stream.read_exact(&mut p)?;
    if p[..8] != MAGIC {
        return Ok(Err("it is not a safepipe rank (wrong magic bytes)".into()));
    }
    let version = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    if version != PROTOCOL_VERSION {
        return Ok(Err(format!(
            "it speaks rendezvous protocol {version}, this rank {PROTOCOL_VERSION} (run the same safepipe on every rank)"
        )));
    }
    Ok(Ok(()))
}

/// A handshake frame as received.
pub(super) enum Got {
    Frame(Vec<u8>),
    /// The other side's ERROR frame: its message.
    Error(String),
    /// Refused before or after reading: why.
    Bad(String),
}

/// Reads a handshake frame of kind `want` whose payload length passes `len_ok`. The header is
/// checked against the kind's cap before the payload is read.
pub(super) fn expect_frame(stream: &mut impl Read, want: u8, len_ok: impl Fn(usize) -> bool) -> io::Result<Got> {
    let (kind, len) = read_header(stream)?;
    let cap = handshake_cap(kind);
    if cap == 0 {
        return Ok(Got::Bad(format!(
            "it sent a frame of unknown kind {kind} during the handshake"
        )));
    }
    if len > cap as u64 {
        return Ok(Got::Bad(format!(
            "it announced a {} frame of {len} bytes, above the limit of {cap}; refused unread",
            kind_name(kind)
        )));
    }
    let payload = read_payload(stream, len)?;
    Ok(if kind == ERROR {
        Got::Error(String::from_utf8_lossy(&payload).into_owned())
    } else if kind != want {
        Got::Bad(format!(
            "it sent {} where {} was expected",
            kind_name(kind),
            kind_name(want)
        ))
    } else if !len_ok(payload.len()) {
        Got::Bad(format!(
            "it sent a {} frame of {len} bytes, which is not a valid length",
            kind_name(kind)
        ))
    } else {
        Got::Frame(payload)
    })
}

/// A stream whose reads and writes all end by `deadline`: a handshake's whole budget, so a peer
/// trickling bytes cannot hold the other side longer than that.
pub(super) struct Timed<'a> {
    pub(super) stream: &'a TcpStream,
    pub(super) deadline: Instant,
}

impl Timed<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        let mut stream = self.stream;
        stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
