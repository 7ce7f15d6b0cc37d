//! `safepipe gpu info|compile|check`: what the CUDA backend finds on this machine, its kernels
//! compiled ahead of time, and every kernel checked against the CPU backend on a GPU
//! (docs/training.md, "The GPU backend").

use crate::error::{Error, Result};
use safepipe_model::cuda::{Arch, CudaError, Gpu, Lib, check, kernels, libs, nvrtc};
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
}

/// A CUDA error as the command's: a missing GPU or library is the user's setup (exit 2).
fn setup(e: CudaError) -> Error {
    match e {
        CudaError::Library { .. } | CudaError::NoDevice(_) => Error::Config(e.to_string()),
        other => Error::Execution(other.to_string()),
    }
}

pub fn run(command: GpuCommand) -> Result<()> {
    match command {
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
                    let cubin = nvrtc::cubin(kernel, arch, &cache).map_err(setup)?;
                    println!("{:<14} {:<6} {:>8} bytes", kernel.name, arch.sm(), cubin.len());
                }
            }
            eprintln!("gpu compile: every kernel compiled into {}", cache.display());
            Ok(())
        }
        GpuCommand::Check { device, json } => {
            libs::require(Lib::Driver).map_err(setup)?;
            let gpu = Gpu::open(device, &nvrtc::cache_dir()).map_err(setup)?;
            let results = check::run(&gpu).map_err(setup)?;
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
