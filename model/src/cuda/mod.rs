//! The CUDA backend's foundation: finding the CUDA libraries (no GPU, driver or library is an
//! error naming what is missing, never a panic), compiling our kernels with NVRTC for the GPU's
//! architecture, and opening a device with every kernel loaded. Built into every binary: the
//! libraries are opened at run time, so one build serves CPU-only and GPU machines.
//!
//! ```text
//! cuda/mod.rs       CudaError, KernelSource, Gpu (a device with its kernels loaded)
//! cuda/libs.rs      where the CUDA libraries are found, and the check before cudarc opens one
//! cuda/nvrtc.rs     run-time compilation to CUBIN per architecture, cached on disk
//! cuda/kernels.rs   the kernel sources and their entry points
//! cuda/kernels/     the CUDA C sources (listed in kernels.rs)
//! cuda/blas.rs      cuBLASLt GEMMs in row-major terms, descriptors and algorithm cached per shape
//! cuda/check/       `safepipe gpu check`: every kernel and a small model on the GPU against the
//!                   CPU backend, determinism and resume (its own module map)
//! cuda/memory.rs    device buffers, raw-pointer kernel launches, the memory plan
//! cuda/layout.rs    the flat parameter layout (fused projections, padded vocabulary); inputs
//! cuda/model.rs     the Llama model on the GPU: weights, activations (all kept, or recomputed)
//! cuda/pass.rs      one micro-batch's forward + backward: layers, head, the named GEMMs
//! cuda/trainer.rs   the optimiser step (NCCL average, global norm, fused AdamW), checkpoints
//! cuda/tests.rs     CPU-side tests: every kernel compiles for sm_80/sm_90, NVRTC's log, no-GPU errors
//! cuda/nccl.rs      the NCCL group: its id sent from rank 0 over the TCP group, device all-reduce
//! ```
// The CUDA libraries are C APIs reached through cudarc's raw layers where its safe API falls
// short (NVRTC's CUBIN, cuBLASLt's cached descriptors): unsafe code is allowed in this module
// only, and every block says why it is sound.
#![allow(unsafe_code)]

pub mod blas;
pub mod check;
pub mod kernels;
pub mod layout;
pub mod libs;
pub mod memory;
pub mod model;
pub mod nccl;
pub mod nvrtc;
mod pass;
pub mod trainer;

pub use libs::Lib;
pub use nvrtc::Arch;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Why the CUDA backend cannot run; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("{} is not available: {detail}. To get it: {}", .lib.name(), .lib.remedy())]
    Library { lib: Lib, detail: String },
    #[error("no usable NVIDIA GPU: {0}")]
    NoDevice(String),
    #[error("kernel {kernel} does not compile for {arch}: {log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("CUDA: {0}")]
    Driver(String),
}

/// How activations and the weights' working copy are stored (master weights, gradients and
/// AdamW moments are fp32 in both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything fp32: slow, for checks against the CPU backend.
    F32,
    /// bf16 weights and activations, fp32 accumulation: the training mode.
    Bf16,
}

impl Precision {
    /// The kernels' symbol suffix.
    pub fn suffix(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }

    pub fn parse(text: &str) -> Option<Precision> {
        match text {
            "fp32" | "f32" => Some(Precision::F32),
            "bf16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// One CUDA C source of the backend.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    pub name: &'static str,
    pub source: &'static str,
    /// Entry points (`_T`: one per storage type, see [`KernelSource::symbols`]).
    pub entries: &'static [&'static str],
}

fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// A GPU opened for work: its context, a stream, and every kernel loaded.
pub struct Gpu {
    pub context: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub arch: Arch,
    pub name: String,
    functions: HashMap<String, CudaFunction>,
}

impl Gpu {
    /// Opens GPU `ordinal` and loads every kernel (compiled for its architecture, cached in
    /// `cache`). Fails with a clear error when the driver, a GPU or NVRTC is missing.
    pub fn open(ordinal: usize, cache: &Path) -> Result<Gpu, CudaError> {
        libs::require(Lib::Driver)?;
        let count = CudaContext::device_count().map_err(|e| CudaError::NoDevice(format!("{e:?}")))?;
        if count <= 0 {
            return Err(CudaError::NoDevice("the driver reports no GPU".into()));
        }
        if ordinal >= count as usize {
            return Err(CudaError::NoDevice(format!(
                "GPU {ordinal} was asked for but this machine has {count} (ordinals 0..{})",
                count - 1
            )));
        }
        let context = CudaContext::new(ordinal).map_err(driver)?;
        let (major, minor) = context.compute_capability().map_err(driver)?;
        let arch = Arch {
            major: major as u32,
            minor: minor as u32,
        };
        if arch.major < 8 {
            return Err(CudaError::NoDevice(format!(
                "GPU {ordinal} is {}: the backend needs bf16 tensor cores (sm_80 or newer)",
                arch.sm()
            )));
        }
        let name = context.name().map_err(driver)?;
        // A stream of our own (not the legacy default stream, which would serialise with the
        // NCCL stream and defeat the overlap of the gradient all-reduce).
        let stream = context.new_stream().map_err(driver)?;
        let mut functions = HashMap::new();
        for kernel in kernels::SOURCES {
            let cubin = nvrtc::cubin(kernel, arch, cache)?;
            let module = context
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
                .map_err(driver)?;
            for symbol in kernel.symbols() {
                let function = module.load_function(&symbol).map_err(driver)?;
                functions.insert(symbol, function);
            }
        }
        Ok(Gpu {
            context,
            stream,
            arch,
            name,
            functions,
        })
    }

    /// A loaded kernel by its symbol name.
    pub fn function(&self, symbol: &str) -> Result<&CudaFunction, CudaError> {
        self.functions
            .get(symbol)
            .ok_or_else(|| CudaError::Driver(format!("no kernel named {symbol} is loaded")))
    }
}

#[cfg(test)]
mod tests;
