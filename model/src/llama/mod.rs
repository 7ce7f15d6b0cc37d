//! The SmolLM2 / Llama model family for pretraining: configuration and the CPU backend
//! (forward + backward, deterministic), whose matrix products are the reference loops or
//! blocked SIMD GEMM (`gemm`). A CUDA backend over cudarc comes next behind the same parameter
//! layout.

pub mod config;
pub mod cpu;
pub mod gemm;

pub use config::LlamaConfig;
pub use cpu::{Batch, CpuModel, Loss, Params};
pub use gemm::Kernels;
