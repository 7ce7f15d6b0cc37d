//! `safepipe gpu info|compile|check`: what the CUDA backend finds on this machine, its kernels
//! compiled ahead of time, and every kernel checked against the CPU backend on a GPU
//! (docs/training.md, "The GPU backend").

use crate::error::{Error, Result};
use safepipe_model::cuda::{Arch, Gpu, Lib, check, kernels, libs, nvrtc};
use std::path::PathBuf;

#[derive(Debug, clap::Subcommand)]
pub enum GpuCommand {
    /// Where each CUDA library was found, NVRTC's version, and the GPUs (or why there are none).
    Info,
    /// Compile every kernel for the given architectures into the kernel cache (no GPU needed).
    Compile {
        /// Architectures, e.g. sm_80,sm_90.
        #[arg(long, value_delimiter = ',', default_value = "sm_80,sm_90")]
        arch: Vec<String>,
    },
    /// Run every kernel on a GPU against the CPU backend; fails if one is out of tolerance.
    Check {
        /// The GPU to use.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Training throughput on random tokens: tokens/s and MFU of one GPU for a model preset.
    Bench {
        /// A model preset (smollm2-135m, smollm2-360m, smollm2-1.7b, tiny, micro).
        #[arg(long, default_value = "smollm2-135m")]
        model: String,
        #[arg(long, default_value_t = 8)]
        micro_batch: usize,
        #[arg(long, default_value_t = 2048)]
        seq_len: usize,
        /// Timed steps (after 2 warm-up steps).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// bf16 or fp32.
        #[arg(long, default_value = "bf16")]
        precision: String,
        /// Keep only each layer's input; recompute the rest in the backward pass.
        #[arg(long)]
        recompute: bool,
        /// The GPU's dense bf16 peak, FLOP/s, for MFU (989e12: H100/H200 SXM).
        #[arg(long, default_value_t = 989e12)]
        peak_flops: f64,
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Also write the result as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write DIR/init (the initial checkpoint), DIR/batch.json (the first batch) and
        /// DIR/after (the checkpoint after the run, reloaded on the CPU to check it), for
        /// scripts/gpu_pytorch_loss.py's comparison with `transformers`.
        #[arg(long, value_name = "DIR")]
        save: Option<PathBuf>,
    },
}

/// Set in a process restarted by [`reexec_for_nccl`], so it restarts at most once.
const REEXEC: &str = "SAFEPIPE_NCCL_REEXEC";

/// NCCL must open as `libnccl.so`, which the system's loader only finds through
/// `LD_LIBRARY_PATH` read at process start. When NCCL is found elsewhere (a wheel's
/// `libnccl.so.2`), restarts this process once with a link to it on that path; a restart
/// replaces the process image, so the caller sees nothing of it. A missing NCCL is left to the
/// group's join to report.
pub fn reexec_for_nccl() -> Result<()> {
    if std::env::var_os(REEXEC).is_some() || libs::require(Lib::Nccl).is_ok() || libs::locate(Lib::Nccl).is_none() {
        return Ok(());
    }
    let path = libs::child_library_path(&nvrtc::cache_dir())?;
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("cannot find this binary: {e}")))?;
    tracing::info!("restarting with NCCL's directory on LD_LIBRARY_PATH");
    use std::os::unix::process::CommandExt;
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("LD_LIBRARY_PATH", path)
        .env(REEXEC, "1")
        .exec();
    Err(Error::Internal(format!(
        "restarting with NCCL on LD_LIBRARY_PATH: {err}"
    )))
}

pub fn run(command: GpuCommand) -> Result<()> {
    match command {
        GpuCommand::Bench {
            model,
            micro_batch,
            seq_len,
            steps,
            precision,
            peak_flops,
            device,
            json,
            save,
            recompute,
        } => {
            let shape = BenchShape {
                model,
                micro_batch,
                seq_len,
                steps,
                recompute,
            };
            let result = bench(&shape, &precision, peak_flops, device, save.as_deref())?;
            println!("{}", serde_json::to_string(&result).expect("serialisable"));
            if let Some(path) = json {
                std::fs::write(&path, serde_json::to_string_pretty(&result).expect("serialisable"))
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            }
            Ok(())
        }
        GpuCommand::Info => {
            for (lib, path) in libs::report() {
                let at = path.map_or_else(|| "not found".to_string(), |p| p.display().to_string());
                println!("{:<32} {at}", lib.name());
            }
            match nvrtc::version() {
                Ok((major, minor)) => println!("NVRTC version                    {major}.{minor}"),
                Err(e) => println!("NVRTC version                    unavailable ({e})"),
            }
            println!("kernel cache                     {}", nvrtc::cache_dir().display());
            match Gpu::open(0, &nvrtc::cache_dir()) {
                Ok(gpu) => {
                    let memory = gpu.context.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
                    println!(
                        "GPU 0                            {} ({}, {memory:.0} GiB)",
                        gpu.name,
                        gpu.arch.sm()
                    );
                }
                Err(e) => println!("GPU                              none usable: {e}"),
            }
            Ok(())
        }
        GpuCommand::Compile { arch } => {
            let cache = nvrtc::cache_dir();
            for name in &arch {
                let arch = Arch::parse(name)
                    .ok_or_else(|| Error::Config(format!("--arch {name}: expected sm_XY, e.g. sm_90")))?;
                for kernel in kernels::SOURCES {
                    let cubin = nvrtc::cubin(kernel, arch, &cache)?;
                    println!("{:<14} {:<6} {:>8} bytes", kernel.name, arch.sm(), cubin.len());
                }
            }
            eprintln!("gpu compile: every kernel compiled into {}", cache.display());
            Ok(())
        }
        GpuCommand::Check { device, json } => {
            libs::require(Lib::Driver)?;
            // The check runs NCCL with one rank.
            reexec_for_nccl()?;
            let gpu = Gpu::open(device, &nvrtc::cache_dir())?;
            let results = check::run(&gpu)?;
            println!(
                "{:<48} {:>5} {:>12} {:>10}  ok",
                "kernel", "", "rel. error", "tolerance"
            );
            for r in &results {
                println!(
                    "{:<48} {:>5} {:>12.3e} {:>10.1e}  {}",
                    r.kernel,
                    format!("{:?}", r.precision).to_lowercase(),
                    r.relative_error,
                    r.tolerance,
                    if r.ok { "yes" } else { "NO" }
                );
            }
            if let Some(path) = json {
                let body = serde_json::json!({ "device": gpu.name, "arch": gpu.arch.sm(), "kernels": results });
                std::fs::write(&path, serde_json::to_string_pretty(&body).expect("serialisable"))
                    .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            }
            let failed: Vec<&str> = results.iter().filter(|r| !r.ok).map(|r| r.kernel.as_str()).collect();
            if failed.is_empty() {
                eprintln!(
                    "gpu check: {} kernel checks within tolerance on {}",
                    results.len(),
                    gpu.name
                );
                Ok(())
            } else {
                Err(Error::Execution(format!("out of tolerance: {}", failed.join(", "))))
            }
        }
    }
}

/// What `gpu bench` trains.
struct BenchShape {
    model: String,
    micro_batch: usize,
    seq_len: usize,
    steps: usize,
    recompute: bool,
}

/// Trains the shape's model on random tokens for `steps` timed steps after two warm-up steps.
fn bench(
    shape: &BenchShape,
    precision: &str,
    peak_flops: f64,
    device: usize,
    save: Option<&std::path::Path>,
) -> Result<serde_json::Value> {
    let BenchShape {
        model,
        micro_batch,
        seq_len,
        steps,
        recompute,
    } = shape;
    let recompute = *recompute;
    let (model, micro_batch, seq_len, steps) = (model.as_str(), *micro_batch, *seq_len, *steps);
    use safepipe_model::cuda::memory::MemoryPlan;
    use safepipe_model::cuda::trainer::GpuTrainer;
    use safepipe_model::llama::{Batch, LlamaConfig, Params};
    use safepipe_model::train::{OptimConfig, Single, Trainer};
    let config = LlamaConfig::preset(model)
        .ok_or_else(|| Error::Config(format!("--model {model}: use one of {:?}", LlamaConfig::PRESETS)))?;
    let precision = safepipe_model::cuda::Precision::parse(precision)
        .ok_or_else(|| Error::Config(format!("--precision {precision}: use bf16 or fp32")))?;
    if micro_batch == 0 || seq_len == 0 || steps == 0 {
        return Err(Error::Config(
            "--micro-batch, --seq-len and --steps must be at least 1".into(),
        ));
    }
    let gpu = Gpu::open(device, &nvrtc::cache_dir())?;
    let name = gpu.name.clone();
    let tokens = micro_batch * seq_len;
    let plan = MemoryPlan::of(&config, tokens, precision, recompute);
    eprintln!("gpu bench: {model} on {name}, memory plan {}", plan.describe());
    let optim = OptimConfig {
        total_steps: (steps + 2) as u64,
        ..OptimConfig::default()
    };
    let start = Trainer::new(config.clone(), Params::init(&config, 0), optim).map_err(Error::Config)?;
    let mut trainer = GpuTrainer::from_cpu(gpu, &start, precision)?;
    trainer.model.recompute = recompute;
    if let Some(dir) = save {
        start
            .save(&dir.join("init"), 0, 0, serde_json::json!({}))
            .map_err(Error::Config)?;
    }
    drop(start);
    let mut random = safepipe_model::rng::SplitMix64(0);
    let mut batch = || {
        let ids = (0..micro_batch * (seq_len + 1))
            .map(|_| (random.next_u64() % config.vocab_size as u64) as u32)
            .collect();
        Batch {
            rows: micro_batch,
            seq_len,
            tokens: ids,
            segments: None,
            loss_mask: None,
        }
    };
    let mut first_loss = None;
    for _ in 0..2 {
        let b = batch();
        if let (Some(dir), None) = (save, first_loss) {
            let body = serde_json::json!({ "rows": b.rows, "seq_len": b.seq_len, "tokens": b.tokens });
            std::fs::write(dir.join("batch.json"), body.to_string())
                .map_err(|e| Error::Config(format!("{}: {e}", dir.display())))?;
        }
        let stats = trainer.train_step(&[b], &Single)?;
        first_loss.get_or_insert(stats.loss);
    }
    let clock = std::time::Instant::now();
    let mut last = None;
    for _ in 0..steps {
        last = Some(trainer.train_step(&[batch()], &Single)?);
    }
    let seconds = clock.elapsed().as_secs_f64();
    let tokens_per_second = (steps * tokens) as f64 / seconds;
    let flops = config.flops_per_token(seq_len);
    // The GPU's checkpoint, reloaded by the CPU backend: the same weights bit for bit.
    let reloaded = match save {
        Some(dir) => {
            let after = trainer.to_cpu()?;
            after
                .save(&dir.join("after"), 0, 0, serde_json::json!({}))
                .map_err(Error::Config)?;
            let (back, _) = Trainer::load(&dir.join("after"), after.optim.clone()).map_err(Error::Config)?;
            Some(back.params == after.params)
        }
        None => None,
    };
    Ok(serde_json::json!({
        "checkpoint_reloads_identically": reloaded,
        "model": model,
        "device": name,
        "precision": format!("{precision:?}").to_lowercase(),
        "micro_batch": micro_batch,
        "seq_len": seq_len,
        "steps": steps,
        "tokens_per_second": tokens_per_second,
        "flops_per_token": flops,
        "mfu": tokens_per_second * flops / peak_flops,
        "first_loss": first_loss,
        "last_loss": last.map(|s| s.loss),
        "memory_plan_gib": plan.total() as f64 / (1u64 << 30) as f64,
        "recompute": recompute,
    }))
}
