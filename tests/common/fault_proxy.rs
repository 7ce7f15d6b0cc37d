//! A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3-compatible server: each request,
//! by a seeded draw, gets a 503 SlowDown, a 500 InternalError, the real answer cut in the middle
//! of its body, the real answer after a stall, or the real answer. Counts what it did.

use safepipe_model::rng::SplitMix64;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy did, by kind.
#[derive(Default, Debug)]
pub struct Faults {
    pub requests: AtomicU64,
    pub slow_down: AtomicU64,
    pub internal_error: AtomicU64,
    pub cut: AtomicU64,
    pub stalled: AtomicU64,
}

pub struct FaultProxy {
    pub port: u16,
    pub faults: Arc<Faults>,
}

/// The chance of each fault per request.
#[derive(Clone, Copy)]
pub struct Rates {
    pub slow_down: f64,
    pub internal_error: f64,
    pub cut: f64,
    pub stall: f64,
    /// How long a stalled answer waits before it is sent.
    pub stall_for: Duration,
}

impl FaultProxy {
    /// Listens on a free port and forwards to `upstream` (a port on 127.0.0.1).
    pub fn start(upstream: u16, rates: Rates, seed: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(Faults::default());
        let rng = Arc::new(Mutex::new(SplitMix64(seed)));
        let counts = faults.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (counts, rng) = (counts.clone(), rng.clone());
                std::thread::spawn(move || serve(client, upstream, rates, &rng, &counts));
            }
        });
        FaultProxy { port, faults }
    }

    pub fn summary(&self) -> String {
        let f = &self.faults;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "{} requests: {} SlowDown, {} InternalError, {} cut mid-body, {} stalled",
            n(&f.requests),
            n(&f.slow_down),
            n(&f.internal_error),
            n(&f.cut),
            n(&f.stalled)
        )
    }
}

/// Reads one HTTP/1.1 message head and its `Content-Length` body (None at a clean end).
fn read_message(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut data = Vec::new();
    let mut buf = [0u8; 65536];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while data.len() < head_end + length {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    }
    Some(data)
}

fn error_answer(status: &str, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Forwards `request` upstream on a fresh connection and returns the whole answer.
fn forward(request: &[u8], upstream: u16) -> std::io::Result<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
    // One request per upstream connection: the answer ends where the connection does.
    let head_end = request
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(request.len(), |a| a + 2);
    let mut rewritten = request[..head_end].to_vec();
    rewritten.extend_from_slice(b"Connection: close\r\n");
    rewritten.extend_from_slice(&request[head_end..]);
    up.write_all(&rewritten)?;
    let mut answer = Vec::new();
    up.read_to_end(&mut answer)?;
    Ok(answer)
}

fn serve(mut client: TcpStream, upstream: u16, rates: Rates, rng: &Mutex<SplitMix64>, faults: &Faults) {
    while let Some(request) = read_message(&mut client) {
        faults.requests.fetch_add(1, Ordering::Relaxed);
        let draw = (rng.lock().unwrap().next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let mut edge = rates.slow_down;
        if draw < edge {
            faults.slow_down.fetch_add(1, Ordering::Relaxed);
            let _ = client.write_all(&error_answer("503 Slow Down", "SlowDown"));
            continue;
        }
        edge += rates.internal_error;
        if draw < edge {
            faults.internal_error.fetch_add(1, Ordering::Relaxed);
            let _ = client.write_all(&error_answer("500 Internal Server Error", "InternalError"));
            continue;
        }
        let Ok(answer) = forward(&request, upstream) else {
            return;
        };
        let body_at = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(answer.len(), |a| a + 4);
        edge += rates.cut;
        let cut = draw < edge;
        if cut && answer.len() - body_at > 16 {
            faults.cut.fetch_add(1, Ordering::Relaxed);
            let half = body_at + (answer.len() - body_at) / 2;
            let _ = client.write_all(&answer[..half]);
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        edge += rates.stall;
        if !cut && draw < edge {
            faults.stalled.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(rates.stall_for);
        }
        // The answer ends this connection (the client opens a new one): say so in its head.
        let mut closing = answer[..body_at.saturating_sub(2)].to_vec();
        closing.extend_from_slice(b"Connection: close\r\n\r\n");
        closing.extend_from_slice(&answer[body_at..]);
        let _ = client.write_all(&closing);
        let _ = client.shutdown(Shutdown::Write);
        return;
    }
}
