//! `safepipe gpu check`: every kernel run on the GPU against the CPU backend on small random
//! shapes, in fp32 (tight) and bf16 storage (loose), one [`KernelCheck`] per kernel and
//! precision. The references are the CPU backend's own ops ([`crate::llama::cpu`]) and the
//! trainer's AdamW ([`crate::train::AdamStep`]), in f64, on the inputs as the GPU sees them
//! (rounded to bf16 in bf16 mode), so a check measures the kernel's error alone.
//!
//! Needs a GPU: on a machine without one, [`run`]'s caller fails at [`Gpu::open`] with the reason.
//!
//! ```text
//! check/mod.rs        KernelCheck, the comparison, device buffers in the check's precision, run()
//! check/ops.rs        embedding, RMSNorm, RoPE, SwiGLU, cross-entropy, global norm, AdamW
//! check/attention.rs  reference and flash attention, forward and backward
//! check/model.rs      a 2-layer model's loss and gradients; determinism and resume of the trainer
//! ```

mod attention;
mod model;
mod ops;

use super::memory::{self, DevBuf, launch};
use super::{CudaError, Gpu, Precision};
use crate::llama::LlamaConfig;
use serde::Serialize;

/// The largest error allowed, relative to the largest reference value: fp32 storage is limited
/// by fp32 arithmetic, bf16 storage by its 8-bit mantissa (2^-8 = 0.4% per rounding).
fn tolerance(precision: Precision) -> f64 {
    match precision {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 2e-2,
    }
}

/// One kernel's result.
#[derive(Debug, Clone, Serialize)]
pub struct KernelCheck {
    pub kernel: String,
    pub precision: Precision,
    pub max_abs_error: f64,
    pub max_abs_reference: f64,
    /// max_abs_error / max_abs_reference.
    pub relative_error: f64,
    pub tolerance: f64,
    pub ok: bool,
}

/// bf16 bits of `x`, rounded to nearest even (the kernels' rounding).
pub fn to_bf16(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 0x40) as u16;
    }
    ((u + 0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// A device buffer and the number of values it holds (in the check's storage precision, or as
/// uploaded by [`Bench::raw`]). Kernels are launched with the model's own [`launch!`] on its
/// address.
struct Buf {
    dev: DevBuf,
    len: usize,
}

impl Buf {
    fn ptr(&self) -> u64 {
        self.dev.ptr
    }
}

/// The GPU and the precision of the checks being run.
struct Bench<'g> {
    gpu: &'g Gpu,
    precision: Precision,
}

impl Bench<'_> {
    /// `values` as the GPU stores them: rounded to bf16 in bf16 mode.
    fn stored(&self, values: &[f32]) -> Vec<f32> {
        match self.precision {
            Precision::F32 => values.to_vec(),
            Precision::Bf16 => values.iter().map(|&x| from_bf16(to_bf16(x))).collect(),
        }
    }

    /// `values` on the device in the check's storage precision.
    fn upload(&self, values: &[f32]) -> Result<Buf, CudaError> {
        match self.precision {
            Precision::F32 => self.raw(values),
            Precision::Bf16 => self.raw(&values.iter().map(|&x| to_bf16(x)).collect::<Vec<u16>>()),
        }
    }

    /// A buffer [`Bench::upload`] made, back as fp32.
    fn download(&self, buf: &Buf) -> Result<Vec<f32>, CudaError> {
        match self.precision {
            Precision::F32 => self.fetch(buf),
            Precision::Bf16 => Ok(self.fetch::<u16>(buf)?.into_iter().map(from_bf16).collect()),
        }
    }

    /// `values` on the device as they are (indices, fp32 or fp64 scratch).
    fn raw<T: Copy>(&self, values: &[T]) -> Result<Buf, CudaError> {
        let dev = DevBuf::zeros(self.gpu, std::mem::size_of_val(values))?;
        memory::upload(self.gpu, dev.ptr, values)?;
        Ok(Buf { dev, len: values.len() })
    }

    /// A buffer's values as `T`.
    fn fetch<T: Copy + Default>(&self, buf: &Buf) -> Result<Vec<T>, CudaError> {
        let mut out = vec![T::default(); buf.len];
        memory::download(self.gpu, &mut out, buf.ptr())?;
        Ok(out)
    }

    fn name(&self, base: &str) -> String {
        format!("{base}_{}", self.precision.suffix())
    }

    fn compare(&self, kernel: &str, got: &[f32], want: &[f64]) -> KernelCheck {
        compare(kernel, self.precision, got, want)
    }
}

/// Compares `got` with `want` under `precision`'s tolerance.
pub fn compare(kernel: &str, precision: Precision, got: &[f32], want: &[f64]) -> KernelCheck {
    let max_abs_reference = want.iter().fold(0f64, |a, b| a.max(b.abs()));
    let max_abs_error = if got.len() == want.len() {
        got.iter().zip(want).fold(0f64, |a, (g, w)| {
            let e = (f64::from(*g) - w).abs();
            if e.is_nan() { f64::INFINITY } else { a.max(e) }
        })
    } else {
        f64::INFINITY
    };
    let relative_error = max_abs_error / max_abs_reference.max(1e-30);
    let tolerance = tolerance(precision);
    KernelCheck {
        kernel: kernel.to_string(),
        precision,
        max_abs_error,
        max_abs_reference,
        relative_error,
        tolerance,
        ok: relative_error.is_finite() && relative_error <= tolerance,
    }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

/// The small model shape every check uses: GQA (4 heads over 2 key/value heads), head_dim 64
/// (every SmolLM2 shape's), two rows of 24 tokens with document boundaries.
fn shape() -> LlamaConfig {
    let mut c = LlamaConfig::preset("tiny").expect("the tiny preset exists");
    c.hidden_size = 256;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.intermediate_size = 96;
    c.vocab_size = 1000;
    c
}

const ROWS: usize = 2;
const SEQ: usize = 24;

/// Runs every check on `gpu`.
pub fn run(gpu: &Gpu) -> Result<Vec<KernelCheck>, CudaError> {
    let mut results = Vec::new();
    for precision in [Precision::F32, Precision::Bf16] {
        let bench = Bench { gpu, precision };
        results.extend(ops::elementwise(&bench)?);
        results.extend(ops::cross_entropy(&bench)?);
        results.extend(attention::attention(&bench)?);
    }
    results.extend(ops::optimizer(gpu)?);
    results.extend(model::model_checks(gpu)?);
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_to_nearest_even_and_keeps_nans() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between two bf16 values: rounds to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
    }

    #[test]
    fn a_check_passes_within_its_tolerance_and_fails_outside_it() {
        assert!(compare("k", Precision::F32, &[1.0, 2.0], &[1.0, 2.0 + 1e-5]).ok);
        assert!(!compare("k", Precision::F32, &[1.0, 2.1], &[1.0, 2.0]).ok);
        assert!(compare("k", Precision::Bf16, &[1.0, 2.01], &[1.0, 2.0]).ok);
        assert!(
            !compare("k", Precision::Bf16, &[1.0], &[1.0, 2.0]).ok,
            "a length mismatch fails"
        );
        assert!(!compare("k", Precision::F32, &[f32::NAN], &[1.0]).ok, "a NaN fails");
    }
}
