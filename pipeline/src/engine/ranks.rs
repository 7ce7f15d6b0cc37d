//! Which rank this process is and how many there are: from `--rank/--world-size`, else Slurm
//! array variables, else Slurm step variables, else a Kubernetes Indexed Job's index (world
//! size from `--world-size` or `SAFEPIPE_WORLD_SIZE`), else rank 0 of 1.

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: u32,
    pub world_size: u32,
    /// Where the numbers came from, for the log.
    pub source: &'static str,
}

/// Resolves the rank from flags and an environment lookup (injected for tests).
pub fn resolve(rank: Option<u32>, world: Option<u32>, env: impl Fn(&str) -> Option<String>) -> Result<RankInfo> {
    let num = |name: &str| -> Result<Option<u32>> {
        env(name)
            .map(|v| {
                v.trim()
                    .parse::<u32>()
                    .map_err(|_| Error::Config(format!("{name}={v:?} is not a whole number")))
            })
            .transpose()
    };
    let info = if let (Some(rank), Some(world_size)) = (rank, world) {
        RankInfo {
            rank,
            world_size,
            source: "flags",
        }
    } else if rank.is_some() || (world.is_some() && num("JOB_COMPLETION_INDEX")?.is_none()) {
        return Err(Error::Config("give --rank and --world-size together".into()));
    } else if let (Some(id), Some(count)) = (num("SLURM_ARRAY_TASK_ID")?, num("SLURM_ARRAY_TASK_COUNT")?) {
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        RankInfo {
            rank: id.saturating_sub(min),
            world_size: count,
            source: "Slurm array",
        }
    } else if let (Some(rank), Some(world_size)) = (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
        RankInfo {
            rank,
            world_size,
            source: "Slurm tasks",
        }
    } else if let Some(rank) = num("JOB_COMPLETION_INDEX")? {
        let world_size = world.or(num("SAFEPIPE_WORLD_SIZE")?).ok_or_else(|| {
            Error::Config(
                "JOB_COMPLETION_INDEX is set but the world size is unknown; set SAFEPIPE_WORLD_SIZE or --world-size"
                    .into(),
            )
        })?;
        RankInfo {
            rank,
            world_size,
            source: "Kubernetes indexed job",
        }
    } else {
        RankInfo {
            rank: 0,
            world_size: 1,
            source: "default",
        }
    };
    if info.world_size == 0 || info.rank >= info.world_size {
        return Err(Error::Config(format!(
            "rank {} of world size {} (from {}): the rank must be below the world size",
            info.rank, info.world_size, info.source
        )));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn precedence_and_sources() {
        let slurm = env(&[
            ("SLURM_ARRAY_TASK_ID", "5"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_COUNT", "8"),
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "1"),
        ]);
        assert_eq!(resolve(Some(1), Some(2), &slurm).unwrap().rank, 1);
        let r = resolve(None, None, &slurm).unwrap();
        assert_eq!((r.rank, r.world_size, r.source), (4, 8, "Slurm array"));
        let r = resolve(None, None, env(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "4")])).unwrap();
        assert_eq!((r.rank, r.world_size), (3, 4));
        let r = resolve(
            None,
            None,
            env(&[("JOB_COMPLETION_INDEX", "2"), ("SAFEPIPE_WORLD_SIZE", "3")]),
        )
        .unwrap();
        assert_eq!((r.rank, r.world_size), (2, 3));
        let r = resolve(None, Some(5), env(&[("JOB_COMPLETION_INDEX", "4")])).unwrap();
        assert_eq!((r.rank, r.world_size), (4, 5));
        assert_eq!(resolve(None, None, env(&[])).unwrap().world_size, 1);
    }

    #[test]
    fn errors_are_clear() {
        assert!(
            resolve(Some(2), Some(2), env(&[]))
                .unwrap_err()
                .to_string()
                .contains("below the world size")
        );
        assert!(
            resolve(Some(0), None, env(&[]))
                .unwrap_err()
                .to_string()
                .contains("together")
        );
        assert!(
            resolve(None, None, env(&[("JOB_COMPLETION_INDEX", "1")]))
                .unwrap_err()
                .to_string()
                .contains("SAFEPIPE_WORLD_SIZE")
        );
        assert!(
            resolve(None, None, env(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "2")]))
                .unwrap_err()
                .to_string()
                .contains("SLURM_PROCID")
        );
    }
}
