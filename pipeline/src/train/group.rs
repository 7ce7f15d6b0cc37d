//! The data-parallel group of `safepipe train`, from the environment: rank and world size, where
//! rank 0 listens, the timeouts, the job secret that authenticates the ranks to each other, and
//! the fingerprint of what they must agree on (checked in the rendezvous handshake).
//!
//! | variable | meaning |
//! |---|---|
//! | `RANK` / `WORLD_SIZE`, else `SLURM_PROCID` / `SLURM_NTASKS` | this rank and the world size (else one rank) |
//! | `MASTER_ADDR` / `MASTER_PORT` | where rank 0 listens (127.0.0.1:29500) |
//! | `SAFEPIPE_RENDEZVOUS_TIMEOUT` | seconds to wait for the group to form (300) |
//! | `SAFEPIPE_COLLECTIVE_TIMEOUT` | seconds a joined rank may send nothing before the run fails (1800) |
//! | `SAFEPIPE_JOB_SECRET` | the shared secret; else derived from `SLURM_JOB_ID` / `TORCHELASTIC_RUN_ID` (weaker, warned) |

use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::pack::Manifest;
use safepipe_model::llama::LlamaConfig;
use safepipe_model::train::{Collective, CollectiveError, OptimConfig, Rendezvous, Single, TcpCollective};
use std::net::SocketAddr;
use std::time::Duration;
use tracing::{info, warn};

/// Seconds the group has to form, unless `SAFEPIPE_RENDEZVOUS_TIMEOUT` says otherwise.
const RENDEZVOUS_TIMEOUT: u64 = 300;
/// Seconds a joined rank may stay silent: generous, as workers wait while rank 0 saves checkpoints.
const COLLECTIVE_TIMEOUT: u64 = 1800;

/// This process's place in the group, read and checked before any work.
pub struct Group {
    pub rank: usize,
    pub world: usize,
    /// Set when `world > 1`.
    tcp: Option<Tcp>,
}

struct Tcp {
    master: SocketAddr,
    join_timeout: Duration,
    peer_timeout: Duration,
    secret: Vec<u8>,
}

impl Group {
    /// The group the process environment describes.
    pub fn from_env() -> Result<Group> {
        Group::from_vars(|k| std::env::var(k).ok())
    }

    /// The group that `var` (a variable's value, if set) describes; empty values count as unset.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Group> {
        let var = |k: &str| var(k).filter(|v| !v.is_empty());
        let number = |k: &str, v: String| {
            v.parse::<usize>()
                .map_err(|_| Error::Config(format!("{k} = {v:?} is not a number")))
        };
        let (rank, world) = match (var("RANK"), var("WORLD_SIZE"), var("SLURM_PROCID"), var("SLURM_NTASKS")) {
            (Some(r), Some(w), _, _) => (number("RANK", r)?, number("WORLD_SIZE", w)?),
            (_, _, Some(r), Some(w)) => (number("SLURM_PROCID", r)?, number("SLURM_NTASKS", w)?),
            _ => (0, 1),
        };
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "rank {rank} of world size {world}: the rank must be below the world size (RANK / WORLD_SIZE)"
            )));
        }
        if world == 1 {
            return Ok(Group { rank, world, tcp: None });
        }
        let host = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = var("MASTER_PORT").unwrap_or_else(|| "29500".into());
        let seconds = |k: &str, default: u64| -> Result<Duration> {
            let s = var(k).map_or(Ok(default as usize), |v| number(k, v))?;
            if s == 0 {
                return Err(Error::Config(format!("{k} must be at least 1 (seconds)")));
            }
            Ok(Duration::from_secs(s as u64))
        };
        let join_timeout = seconds("SAFEPIPE_RENDEZVOUS_TIMEOUT", RENDEZVOUS_TIMEOUT)?;
        let peer_timeout = seconds("SAFEPIPE_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT)?;
        let secret = job_secret(&var, world)?;
        let master = std::net::ToSocketAddrs::to_socket_addrs(&format!("{host}:{port}"))
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Error::Config(format!("MASTER_ADDR:MASTER_PORT = {host}:{port} does not resolve")))?;
        Ok(Group {
            rank,
            world,
            tcp: Some(Tcp {
                master,
                join_timeout,
                peer_timeout,
                secret,
            }),
        })
    }

    /// Forms the group; every rank must pass the same `fingerprint` (see [`fingerprint`]).
    pub fn connect(&self, fingerprint: String) -> Result<Box<dyn Collective>> {
        let Some(tcp) = &self.tcp else {
            return Ok(Box::new(Single));
        };
        info!(rank = self.rank, world_size = self.world, master = %tcp.master, "joining the data-parallel group");
        let rendezvous = Rendezvous {
            rank: self.rank,
            world: self.world,
            master: tcp.master,
            join_timeout: tcp.join_timeout,
            peer_timeout: tcp.peer_timeout,
            secret: tcp.secret.clone(),
            fingerprint,
        };
        let comm = TcpCollective::connect(&rendezvous).map_err(|e| self.error(e))?;
        Ok(Box::new(comm))
    }

    /// A collective's error as the run's: settings that disagree are the config's fault (exit 2),
    /// a lost or silent rank fails the run (exit 3: restart every rank with `--resume`).
    pub fn error(&self, e: CollectiveError) -> Error {
        let me = format!("rank {} of {}", self.rank, self.world);
        match e {
            CollectiveError::Config(m) => Error::Config(format!("data-parallel group ({me}): {m}")),
            e @ (CollectiveError::Rendezvous(_) | CollectiveError::Peer { .. }) => Error::Execution(format!(
                "data-parallel group ({me}): {e}; the job cannot go on without every rank: restart them all \
                 (with --resume to continue from the last checkpoint)"
            )),
        }
    }
}

/// The shared secret: `SAFEPIPE_JOB_SECRET`, else the scheduler's job id (with a warning), else a
/// config error.
fn job_secret(var: &impl Fn(&str) -> Option<String>, world: usize) -> Result<Vec<u8>> {
    if let Some(secret) = var("SAFEPIPE_JOB_SECRET") {
        return Ok(secret.into_bytes());
    }
    // torchrun's run id defaults to "none": the same for every job, so no secret at all.
    let job_id = ["SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"]
        .into_iter()
        .find_map(|k| var(k).filter(|v| v != "none").map(|v| (k, v)));
    match job_id {
        Some((k, id)) => {
            warn!(
                "SAFEPIPE_JOB_SECRET is not set: the ranks authenticate with a secret derived from {k} ({id}), \
                 which anyone who can list the jobs knows; set SAFEPIPE_JOB_SECRET to the same random value on \
                 every rank"
            );
            Ok(format!("safepipe job {k}={id}").into_bytes())
        }
        None => Err(Error::Config(format!(
            "{world} ranks need a shared secret to authenticate each other: set SAFEPIPE_JOB_SECRET to the same \
             random value on every rank (e.g. `export SAFEPIPE_JOB_SECRET=$(openssl rand -hex 32)` where the \
             launcher starts them)"
        ))),
    }
}

/// What every rank must agree on, as `key = value` lines: the code, the group, the model, the
/// optimiser, the batch, the data and the steps (a mismatch names the differing keys).
#[allow(clippy::too_many_arguments)]
pub fn fingerprint(
    t: &TrainConfig,
    model: &LlamaConfig,
    optim: &OptimConfig,
    manifest: &Manifest,
    rows: usize,
    world: usize,
    start_step: u64,
    stop_step: u64,
) -> String {
    let json = |v: serde_json::Result<String>| v.unwrap_or_else(|e| format!("unserialisable: {e}"));
    [
        ("safepipe", env!("CARGO_PKG_VERSION").to_string()),
        ("world_size", world.to_string()),
        ("model", json(serde_json::to_string(model))),
        ("optim", json(serde_json::to_string(optim))),
        ("micro_batch", t.micro_batch.to_string()),
        ("grad_accum", t.grad_accum.to_string()),
        ("seed", t.seed.to_string()),
        ("document_mask", t.document_mask.to_string()),
        // The CUDA ranks must agree on the collectives they take part in, and on precision.
        ("backend", format!("{} {} zero1={}", t.backend, t.precision, t.zero1)),
        (
            "shards",
            format!(
                "{} rows of {} (pack attempt {})",
                rows,
                manifest.seq_len + 1,
                manifest.attempt
            ),
        ),
        ("tokenizer", manifest.tokenizer.sha256.clone()),
        ("start_step", start_step.to_string()),
        ("stop_step", stop_step.to_string()),
    ]
    .iter()
    .map(|(k, v)| format!("{k} = {v}\n"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn group(vars: &[(&str, &str)]) -> Result<Group> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Group::from_vars(|k| vars.get(k).cloned())
    }

    #[test]
    fn the_secret_comes_from_the_variable_else_the_job_id_else_a_config_error() {
        let two = [("RANK", "1"), ("WORLD_SIZE", "2")];
        let g = group(&[two.as_slice(), &[("SAFEPIPE_JOB_SECRET", "s3cret")]].concat()).unwrap();
        assert_eq!(g.tcp.as_ref().unwrap().secret, b"s3cret");
        let g = group(&[two.as_slice(), &[("SLURM_JOB_ID", "4242")]].concat()).unwrap();
        assert_eq!(g.tcp.unwrap().secret, b"safepipe job SLURM_JOB_ID=4242");
        let e = group(&[two.as_slice(), &[("TORCHELASTIC_RUN_ID", "none")]].concat())
            .err()
            .unwrap();
        assert!(
            matches!(&e, Error::Config(m) if m.contains("set SAFEPIPE_JOB_SECRET")),
            "{e}"
        );
        // One rank needs no secret.
        assert!(group(&[]).unwrap().tcp.is_none());
    }

    #[test]
    fn timeouts_and_ranks_are_checked() {
        let base = [("RANK", "0"), ("WORLD_SIZE", "2"), ("SAFEPIPE_JOB_SECRET", "x")];
        let g = group(&base).unwrap().tcp.unwrap();
        // The configured limit, read from the environment (no clock involved).
        let limit = g.peer_timeout.as_secs();
        assert_eq!(limit, COLLECTIVE_TIMEOUT);
        let g = group(&[base.as_slice(), &[("SAFEPIPE_COLLECTIVE_TIMEOUT", "2")]].concat())
            .unwrap()
            .tcp
            .unwrap();
        let limit = g.peer_timeout.as_secs();
        assert_eq!(limit, 2);
        for bad in [
            ("SAFEPIPE_COLLECTIVE_TIMEOUT", "0"),
            ("SAFEPIPE_RENDEZVOUS_TIMEOUT", "soon"),
        ] {
            assert!(group(&[base.as_slice(), &[bad]].concat()).is_err(), "{bad:?}");
        }
        assert!(group(&[("RANK", "2"), ("WORLD_SIZE", "2")]).is_err());
    }
}
