//! Device memory for the GPU model: raw buffers addressed by pointer arithmetic, kernel
//! launches with raw-pointer arguments, and the memory plan printed before training.

use super::{CudaError, Gpu, Precision};
use crate::llama::LlamaConfig;
use cudarc::driver::{CudaSlice, DevicePtr};

pub(crate) fn driver(e: cudarc::driver::DriverError) -> CudaError {
    CudaError::Driver(format!("{e:?}"))
}

/// A device allocation and its address. Everything on the model's one stream, so raw
/// addresses need no event tracking.
pub struct DevBuf {
    _slice: CudaSlice<u8>,
    pub ptr: u64,
    pub bytes: usize,
}

impl DevBuf {
    /// `bytes` zeroed bytes (at least 1, so every buffer has an address).
    pub fn zeros(gpu: &Gpu, bytes: usize) -> Result<DevBuf, CudaError> {
        let slice = gpu.stream.alloc_zeros::<u8>(bytes.max(1)).map_err(|e| {
            let free = gpu.context.mem_get_info().map(|(f, _)| f).unwrap_or(0);
            CudaError::Driver(format!(
                "cannot allocate {:.2} GiB on the GPU ({:.2} GiB free): {e:?}; lower train.micro_batch",
                bytes as f64 / GIB,
                free as f64 / GIB
            ))
        })?;
        let ptr = slice.device_ptr(&gpu.stream).0;
        Ok(DevBuf {
            _slice: slice,
            ptr,
            bytes,
        })
    }

    /// The address of element `index` of `element_bytes`-sized elements.
    pub fn at(&self, index: usize, element_bytes: usize) -> u64 {
        self.ptr + (index * element_bytes) as u64
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// Copies `src` to device address `dst` and waits (inputs are small; weights load once).
pub fn upload<T>(gpu: &Gpu, dst: u64, src: &[T]) -> Result<(), CudaError> {
    // SAFETY: the caller gives an address with room for `src`; the copy finishes before return.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, gpu.stream.cu_stream()) }.map_err(driver)?;
    gpu.stream.synchronize().map_err(driver)
}

/// Copies device address `src` into `dst`, waiting for the stream first.
pub fn download<T>(gpu: &Gpu, dst: &mut [T], src: u64) -> Result<(), CudaError> {
    // SAFETY: the caller gives an address holding `dst.len()` elements; the copy finishes before return.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, gpu.stream.cu_stream()) }.map_err(driver)?;
    gpu.stream.synchronize().map_err(driver)
}

/// Copies `bytes` from device address `src` to `dst` (queued).
pub fn copy(gpu: &Gpu, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
    // SAFETY: the caller gives addresses with `bytes` of room.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dst, src, bytes, gpu.stream.cu_stream()) }.map_err(driver)
}

/// Zeroes `bytes` at `ptr` (queued).
pub fn zero(gpu: &Gpu, ptr: u64, bytes: usize) -> Result<(), CudaError> {
    // SAFETY: the caller gives an address with `bytes` of room.
    unsafe { cudarc::driver::result::memset_d8_async(ptr, 0, bytes, gpu.stream.cu_stream()) }.map_err(driver)
}

/// Launches kernel `$name` on `$gpu`'s stream: grid (x, y), block, dynamic shared bytes, an
/// optional grid z, then the arguments (device addresses as `u64`, sizes as the kernel's C types).
macro_rules! launch {
    ($gpu:expr, $name:expr, ($gx:expr, $gy:expr), $block:expr, $shared:expr; $($arg:expr),* $(,)?) => {
        $crate::cuda::memory::launch!($gpu, $name, ($gx, $gy), $block, $shared, 1; $($arg),*)
    };
    ($gpu:expr, $name:expr, ($gx:expr, $gy:expr), $block:expr, $shared:expr, $gz:expr; $($arg:expr),* $(,)?) => {{
        let name: &str = &$name;
        let func = $gpu.function(name)?;
        let mut builder = $gpu.stream.launch_builder(func);
        $(
            let value = $arg;
            cudarc::driver::PushKernelArg::arg(&mut builder, &value);
        )*
        let config = cudarc::driver::LaunchConfig {
            grid_dim: (($gx) as u32, ($gy) as u32, ($gz) as u32),
            block_dim: (($block) as u32, 1, 1),
            shared_mem_bytes: ($shared) as u32,
        };
        // SAFETY: the argument list follows the kernel's signature in kernels/*.cu, and every
        // address points into a live buffer of the size the kernel reads or writes.
        unsafe { builder.launch(config) }.map(|_| ()).map_err($crate::cuda::memory::driver)
    }};
}
pub(crate) use launch;

/// What training one model needs on one GPU, in bytes, printed before a run starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryPlan {
    /// fp32 master weights, gradients, two AdamW moments, plus the bf16 copy.
    pub parameters: usize,
    /// Activations kept for the backward pass, all layers.
    pub activations: usize,
    /// Logits of one chunk of rows, gradients flowing back, small per-token buffers.
    pub scratch: usize,
}

impl MemoryPlan {
    /// With `recompute`, one layer's activations are kept (plus every layer's input).
    pub fn of(config: &LlamaConfig, tokens: usize, precision: Precision, recompute: bool) -> MemoryPlan {
        let logits_rows = super::model::logits_rows(config, tokens, precision);
        let es = precision.bytes();
        let (d, f, kv, layers) = (
            config.hidden_size,
            config.intermediate_size,
            config.kv_dim(),
            config.num_hidden_layers,
        );
        let heads = config.num_attention_heads;
        let params = super::layout::Layout::new(config).total;
        let copy = if precision == Precision::Bf16 { 2 } else { 0 };
        let per_layer =
            tokens * es * (d /* h1 */ + (d + 2 * kv) + d /* attn */ + d /* xmid */ + d /* h2 */ + 2 * f + f)
                + tokens * 4 * (2 + heads);
        let vocab = super::layout::padded_vocab(config.vocab_size);
        MemoryPlan {
            parameters: params * (16 + copy),
            activations: per_layer * if recompute { 1 } else { layers } + tokens * es * d * (layers + 2),
            scratch: logits_rows * vocab * es
                + tokens * es * (d + (2 * f).max(d + 2 * kv) + f.max(d))
                + tokens * 4 * (heads + 8)
                + (32 << 20),
        }
    }

    pub fn total(&self) -> usize {
        self.parameters + self.activations + self.scratch
    }

    /// `parameters 1.2 GiB + activations 30.1 GiB + scratch 1.0 GiB = 32.3 GiB`.
    pub fn describe(&self) -> String {
        format!(
            "parameters {:.1} GiB + activations {:.1} GiB + scratch {:.1} GiB = {:.1} GiB",
            self.parameters as f64 / GIB,
            self.activations as f64 / GIB,
            self.scratch as f64 / GIB,
            self.total() as f64 / GIB
        )
    }
}
