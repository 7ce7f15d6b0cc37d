//! `safepipe train CONFIG --nproc-per-node N`: starts the N ranks of a one-machine job (one per
//! GPU) and supervises them, as torchrun does.
//!
//! Each rank is this binary's `safepipe train CONFIG` with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR` / `MASTER_PORT` (a free loopback port unless set) and a job
//! secret (`SAFEPIPE_JOB_SECRET`, else a fresh random one), and `LD_LIBRARY_PATH` extended with
//! the directories of the CUDA libraries found (plus a `libnccl.so` link: cudarc opens NCCL by
//! that name only; see `safepipe_model::cuda::libs`). Every line a rank prints comes out
//! prefixed with `[rank R]`.
//!
//! Supervision: when a rank fails, the others are stopped at once (a rank waiting in a
//! collective for a dead peer would otherwise sit out the collective timeout), and the launcher
//! fails with the first failed rank's exit status and last error line. A signal to the launcher
//! (Ctrl-C, SIGTERM from the scheduler) stops every rank. Across machines, start one process per
//! GPU with the scheduler instead (`srun`, deploy/slurm/train.sbatch).

use crate::error::{Error, Result, exit};
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tracing::{info, warn};

/// The variables a launched rank gets from its launcher; set already, they mean this process
/// is itself a rank (of torchrun, Slurm or another launcher).
const RANK_VARIABLES: [&str; 3] = ["RANK", "WORLD_SIZE", "LOCAL_RANK"];

/// Starts `nproc` ranks of `safepipe train config` and waits for all of them; the first rank to
/// fail stops the others and its failure is returned.
pub async fn launch(config: &Path, nproc: usize, resume: bool, until: Option<u64>) -> Result<()> {
    if nproc == 0 {
        return Err(Error::Config("--nproc-per-node must be at least 1".into()));
    }
    if let Some(var) = RANK_VARIABLES.iter().find(|v| std::env::var_os(v).is_some()) {
        return Err(Error::Config(format!(
            "--nproc-per-node starts the ranks itself, but {var} is already set (this process is a rank \
             of another launcher): drop --nproc-per-node, or unset {}",
            RANK_VARIABLES.join(" / ")
        )));
    }
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("cannot find this binary: {e}")))?;
    let master_addr = std::env::var("MASTER_ADDR").unwrap_or_else(|_| "127.0.0.1".into());
    let master_port = match std::env::var("MASTER_PORT") {
        Ok(port) => port,
        Err(_) => free_port()?.to_string(),
    };
    let secret = match std::env::var("SAFEPIPE_JOB_SECRET") {
        Ok(secret) if !secret.is_empty() => secret,
        _ => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| Error::Internal(format!("no randomness for the job secret: {e}")))?;
            hex::encode(bytes)
        }
    };
    let cache = safepipe_model::cuda::nvrtc::cache_dir();
    let library_path = match safepipe_model::cuda::libs::child_library_path(&cache) {
        Ok(path) => Some(path),
        Err(e) => {
            warn!("{e}; the ranks keep this LD_LIBRARY_PATH");
            None
        }
    };
    info!(ranks = nproc, master = %format!("{master_addr}:{master_port}"), "starting the ranks");
    let mut ranks: Vec<Rank> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let mut cmd = Command::new(&exe);
        cmd.arg("train").arg(config);
        if resume {
            cmd.arg("--resume");
        }
        if let Some(step) = until {
            cmd.args(["--until", &step.to_string()]);
        }
        cmd.env("RANK", rank.to_string())
            .env("WORLD_SIZE", nproc.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", nproc.to_string())
            .env("MASTER_ADDR", &master_addr)
            .env("MASTER_PORT", &master_port)
            .env("SAFEPIPE_JOB_SECRET", &secret)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(path) = &library_path {
            cmd.env("LD_LIBRARY_PATH", path);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| Error::Internal(format!("cannot start rank {rank} ({}): {e}", exe.display())))?;
        let last_error = relay(&mut child, rank);
        ranks.push(Rank {
            rank,
            child,
            last_error,
        });
    }
    supervise(ranks).await
}

/// One started rank.
struct Rank {
    rank: usize,
    child: Child,
    /// The last line it printed that reads like an error (for the launcher's own error).
    last_error: tokio::sync::watch::Receiver<Option<String>>,
}

/// Copies the rank's stdout and stderr to ours, each line prefixed with `[rank R]`; the returned
/// receiver holds its latest error line.
fn relay(child: &mut Child, rank: usize) -> tokio::sync::watch::Receiver<Option<String>> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    if let Some(stdout) = child.stdout.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                println!("[rank {rank}] {line}");
            }
        });
    }
    if let Some(stderr) = child.stderr.take() {
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("[rank {rank}] {line}");
                let lower = line.to_ascii_lowercase();
                if lower.contains("error") || lower.contains("panicked") {
                    let _ = tx.send(Some(line));
                }
            }
        });
    }
    rx
}

/// Waits for every rank; on the first failure (or a signal to us) stops the rest.
async fn supervise(mut ranks: Vec<Rank>) -> Result<()> {
    let mut done = vec![false; ranks.len()];
    let mut failure: Option<(usize, std::process::ExitStatus)> = None;
    let stop_signal = stop_signal();
    tokio::pin!(stop_signal);
    while done.iter().any(|d| !d) && failure.is_none() {
        let waits = ranks.iter_mut().zip(&done).filter(|(_, d)| !**d).map(|(r, _)| {
            let rank = r.rank;
            Box::pin(async move { (rank, r.child.wait().await) })
        });
        let outcome = tokio::select! {
            ((rank, status), _, _) = futures::future::select_all(waits) => Ok((rank, status)),
            signal = &mut stop_signal => Err(signal),
        };
        match outcome {
            Ok((rank, status)) => {
                let status = status.map_err(|e| Error::Internal(format!("waiting for rank {rank}: {e}")))?;
                done[rank] = true;
                if !status.success() {
                    failure = Some((rank, status));
                }
            }
            Err(signal) => {
                stop(&mut ranks, &done).await;
                return Err(Error::Execution(format!(
                    "{signal}: stopped every rank (rerun with --resume)"
                )));
            }
        }
    }
    let Some((rank, status)) = failure else {
        return Ok(());
    };
    let stopped: Vec<String> = ranks
        .iter()
        .zip(&done)
        .filter(|(_, d)| !**d)
        .map(|(r, _)| r.rank.to_string())
        .collect();
    stop(&mut ranks, &done).await;
    // Let the relays print the failed rank's last lines.
    tokio::task::yield_now().await;
    let why = ranks[rank].last_error.borrow().clone().unwrap_or_default();
    let what = match status.code() {
        Some(code) => format!("exited with code {code}"),
        None => {
            use std::os::unix::process::ExitStatusExt;
            format!("was killed by signal {}", status.signal().unwrap_or(0))
        }
    };
    let others = if stopped.is_empty() {
        String::new()
    } else {
        format!("; stopped rank(s) {}", stopped.join(", "))
    };
    let message = format!(
        "rank {rank} {what}{others}{}",
        if why.is_empty() {
            String::new()
        } else {
            format!(": {why}")
        }
    );
    Err(match status.code() {
        Some(exit::USAGE) => Error::Config(message),
        Some(exit::INTERNAL) => Error::Internal(message),
        _ => Error::Execution(message),
    })
}

/// Kills the ranks still running and reaps them.
async fn stop(ranks: &mut [Rank], done: &[bool]) {
    for (r, _) in ranks.iter_mut().zip(done).filter(|(_, d)| !**d) {
        let _ = r.child.start_kill();
    }
    for (r, _) in ranks.iter_mut().zip(done).filter(|(_, d)| !**d) {
        let _ = r.child.wait().await;
    }
}

/// Resolves when this process is asked to stop (SIGINT or SIGTERM), naming the signal.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "interrupted",
            _ = term.recv() => "terminated",
        },
        // Without signal handlers the default action (exit) applies; kill_on_drop stops the ranks.
        _ => std::future::pending().await,
    }
}

/// A free loopback port for rank 0's rendezvous (bound, read, released).
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Internal(format!("no free port for the rendezvous: {e}")))
}
