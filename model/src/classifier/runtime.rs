//! ONNX Runtime, loaded at run time (`ort`'s `load-dynamic`): finding the shared library and
//! building sessions.
//!
//! The library is looked for, in order: the path given by the caller (config
//! `[score] onnxruntime`), `ORT_DYLIB_PATH`, then `models/onnxruntime/libonnxruntime.so` in the
//! executable's directory and up to four directories above it (where `make setup` puts the
//! library from the PyPI `onnxruntime` wheel, so `target/debug/safepipe` finds it in a checkout).
//! Never from the current directory (a job's working directory is not trusted to hold code).
//! Commands that never score never load it.

use super::{ClassifierError, Result};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The library file `make setup` installs, relative to a repository root.
pub const BUNDLED_LIBRARY: &str = "models/onnxruntime/libonnxruntime.so";

/// Where inference runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider (build with `--features cuda`, and a
    /// `libonnxruntime.so` built with CUDA, e.g. from the `onnxruntime-gpu` wheel).
    Cuda,
}

static ENVIRONMENT: OnceLock<std::result::Result<(Environment, PathBuf), String>> = OnceLock::new();

/// The candidate library paths, in search order (the first existing one is used).
pub fn library_candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = explicit {
        out.push(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe() {
        let mut dir = exe.parent().map(Path::to_path_buf);
        for _ in 0..5 {
            let Some(d) = dir else { break };
            out.push(d.join(BUNDLED_LIBRARY));
            dir = d.parent().map(Path::to_path_buf);
        }
    }
    out
}

/// Loads ONNX Runtime once per process and returns its environment and library path. An explicit
/// path or an `ORT_DYLIB_PATH` that does not exist is an error (no silent fallback to another
/// library).
pub fn environment(explicit: Option<&Path>) -> Result<(Environment, PathBuf)> {
    let found = ENVIRONMENT.get_or_init(|| {
        let candidates = library_candidates(explicit);
        if let Some(p) = explicit.filter(|p| !p.is_file()) {
            return Err(format!("[score] onnxruntime = {} does not exist", p.display()));
        }
        if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| explicit.is_none() && !Path::new(p).is_file()) {
            return Err(format!("ORT_DYLIB_PATH = {} does not exist", Path::new(&p).display()));
        }
        let Some(path) = candidates.iter().find(|p| p.is_file()) else {
            return Err(format!(
                "ONNX Runtime not found (looked at {}); run `make setup`, or set ORT_DYLIB_PATH to a libonnxruntime.so (1.31)",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ));
        };
        let env = ort::init_from(path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("safepipe")
            .build()
            .map_err(|e| format!("ONNX Runtime from {}: {e}", path.display()))?;
        tracing::debug!(library = %path.display(), "ONNX Runtime loaded");
        Ok((env, path.clone()))
    });
    found.clone().map_err(ClassifierError::Runtime)
}

/// A session on `model` with `threads` intra-op threads (0 = ONNX Runtime's default: one per
/// core) and all graph optimisations.
pub fn session(model: &Path, threads: usize, device: Device, library: Option<&Path>) -> Result<Session> {
    let (env, _) = environment(library)?;
    let err = |e: String| ClassifierError::Runtime(format!("{}: {e}", model.display()));
    let mut builder = Session::builder(&env)
        .map_err(|e| err(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| err(e.to_string()))?;
    if threads > 0 {
        builder = builder.with_intra_threads(threads).map_err(|e| err(e.to_string()))?;
    }
    match device {
        Device::Cpu => {}
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
                .map_err(|e| err(e.to_string()))?;
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => {
            return Err(err(
                "device = \"cuda\" needs a build with `--features cuda` (cargo build --features safepipe-model/cuda)"
                    .into(),
            ));
        }
    }
    builder.commit_from_file(model).map_err(|e| err(e.to_string()))
}
