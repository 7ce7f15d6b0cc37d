//! The Llama model on the GPU: its flat parameter layout, and one micro-batch's forward and
//! backward pass (GEMMs through cuBLASLt, everything else our kernels), accumulating fp32
//! weight gradients.
//!
//! The parameters' flat layout and the host-side inputs are in [`super::layout`].
//!
//! Dataflow of one layer (x is the residual stream; the GEMM's `+ C` fuses the residual adds):
//! ```text
//! h1 = rmsnorm(x)          qkv = h1 Wqkv^T        q, k = rope(q, k)
//! a, lse = attention(q, k, v)                      xmid = a Wo^T + x
//! h2 = rmsnorm(xmid)       gu = h2 Wgu^T           m = silu(g) * u
//! x' = m Wdown^T + xmid
//! ```
//! The backward pass runs it in reverse with one residual-gradient buffer updated in place; the
//! head (final norm, tied embedding, cross-entropy) runs a chunk of rows at a time. The passes
//! themselves are in [`super::pass`]. With `recompute`, only each layer's input is kept: the
//! backward pass reruns the layer's forward pass (same kernels, same bits) just before it.

use super::blas::{Blas, Dtype};
use super::layout::{Inputs, Layout, padded_vocab};
use super::memory::{DevBuf, launch, upload};
use super::{CudaError, Gpu, Precision};
use crate::llama::{Batch, LlamaConfig, Params};

/// Activations of one micro-batch shape (`rows x seq_len` tokens), allocated once and reused.
/// Per-layer buffers hold one layer each, or with `recompute` a single set that every layer
/// reuses ([`Activations::slot`]).
pub(super) struct Activations {
    pub(super) recompute: bool,
    pub(super) rows: usize,
    pub(super) seq_len: usize,
    /// Residual stream: x[0] is the embedding's output, x[L] the last layer's.
    pub(super) x: Vec<DevBuf>,
    pub(super) h1: Vec<DevBuf>,
    pub(super) rstd1: Vec<DevBuf>,
    pub(super) qkv: Vec<DevBuf>,
    pub(super) attn: Vec<DevBuf>,
    pub(super) lse: Vec<DevBuf>,
    pub(super) xmid: Vec<DevBuf>,
    pub(super) h2: Vec<DevBuf>,
    pub(super) rstd2: Vec<DevBuf>,
    pub(super) gu: Vec<DevBuf>,
    pub(super) act: Vec<DevBuf>,
    pub(super) hf: DevBuf,
    pub(super) rstdf: DevBuf,
    // Scratch shared by every layer.
    pub(super) logits: DevBuf,
    pub(super) logits_rows: usize,
    pub(super) dx: DevBuf,
    pub(super) dbig: DevBuf,
    pub(super) dsmall: DevBuf,
    pub(super) delta: DevBuf,
    pub(super) losses: DevBuf,
    pub(super) partial: DevBuf,
    // Inputs.
    pub(super) ids: DevBuf,
    pub(super) targets: DevBuf,
    pub(super) weights: DevBuf,
    pub(super) segments: DevBuf,
    pub(super) doc_start: DevBuf,
    pub(super) group_tokens: DevBuf,
    pub(super) group_starts: DevBuf,
    pub(super) group_positions: DevBuf,
    pub(super) cos: DevBuf,
    pub(super) sin: DevBuf,
}

impl Activations {
    /// The index of layer `l`'s buffers in the per-layer vectors.
    pub(super) fn slot(&self, l: usize) -> usize {
        if self.recompute { 0 } else { l }
    }
}

/// Dynamic shared memory a block may use without opting in: the reference attention's scores.
const REFERENCE_ATTENTION_SHARED: usize = 48 << 10;

/// Rows a block of the RMSNorm backward sums its weight gradient over.
pub(super) const NORM_ROWS_PER_BLOCK: usize = 64;
/// The most logits one chunk of the head holds (bytes).
const LOGITS_BYTES: usize = 512 << 20;

/// Rows of logits the head computes at a time for `tokens` tokens per micro-batch: a multiple
/// of 128, so every chunk's rows of the final norm's output start 256-byte aligned.
pub fn logits_rows(config: &LlamaConfig, tokens: usize, precision: Precision) -> usize {
    let fit = LOGITS_BYTES / (padded_vocab(config.vocab_size) * precision.bytes());
    (fit / 128 * 128).max(128).clamp(1, tokens.max(1))
}

/// What one micro-batch's pass gives back.
#[derive(Debug, Clone, Copy)]
pub struct MicroLoss {
    /// Sum of the counted targets' losses.
    pub sum: f64,
    pub counted: usize,
}

/// The model's weights, gradients and work buffers on one GPU.
pub struct GpuModel {
    pub config: LlamaConfig,
    pub precision: Precision,
    pub layout: Layout,
    pub(super) blas: Blas,
    /// fp32 master weights, gradients and AdamW moments, all in [`Layout`].
    pub master: DevBuf,
    pub grads: DevBuf,
    pub m: DevBuf,
    pub v: DevBuf,
    /// bf16 working copy of the weights (bf16 mode only).
    pub weights16: Option<DevBuf>,
    acts: Option<Activations>,
    /// Keep only each layer's input and recompute the rest in the backward pass.
    pub recompute: bool,
}

impl GpuModel {
    /// Uploads `params` (fp32) with zero moments.
    pub fn new(
        gpu: &Gpu,
        config: LlamaConfig,
        params: &Params<f32>,
        precision: Precision,
    ) -> Result<GpuModel, CudaError> {
        let layout = Layout::new(&config);
        // Room for equal optimiser shards (the tail stays zero and belongs to no tensor).
        let bytes = layout.capacity() * 4;
        let master = DevBuf::zeros(gpu, bytes)?;
        upload(gpu, master.ptr, &layout.flatten(params))?;
        let weights16 = match precision {
            Precision::Bf16 => Some(DevBuf::zeros(gpu, layout.capacity() * 2)?),
            Precision::F32 => None,
        };
        let model = GpuModel {
            blas: Blas::new(gpu)?,
            grads: DevBuf::zeros(gpu, bytes)?,
            m: DevBuf::zeros(gpu, bytes)?,
            v: DevBuf::zeros(gpu, bytes)?,
            master,
            weights16,
            layout,
            config,
            precision,
            acts: None,
            recompute: false,
        };
        model.refresh_working_copy(gpu)?;
        Ok(model)
    }

    /// Recasts the bf16 working copy from the master weights (after loading).
    pub fn refresh_working_copy(&self, gpu: &Gpu) -> Result<(), CudaError> {
        if let Some(w16) = &self.weights16 {
            let n = self.layout.total as i64;
            launch!(gpu, "cast_f32_bf16", (1024, 1), 256, 0; self.master.ptr, w16.ptr, n)?;
        }
        Ok(())
    }

    pub(super) fn es(&self) -> usize {
        self.precision.bytes()
    }

    pub(super) fn dtype(&self) -> Dtype {
        match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
        }
    }

    /// The working copy's address of element `offset`.
    pub(super) fn w(&self, offset: usize) -> u64 {
        match &self.weights16 {
            Some(w16) => w16.at(offset, 2),
            None => self.master.at(offset, 4),
        }
    }

    /// Whether attention runs the fused tensor-core kernels (bf16, head_dim 64: every SmolLM2
    /// shape) rather than the reference ones.
    pub(super) fn flash(&self) -> bool {
        self.precision == Precision::Bf16 && self.config.head_dim() == 64
    }

    pub(super) fn kernel(&self, base: &str) -> String {
        format!("{base}_{}", self.precision.suffix())
    }

    /// Allocates the activations for `rows x seq_len` tokens (once per shape).
    fn activations(&mut self, gpu: &Gpu, rows: usize, seq_len: usize) -> Result<(), CudaError> {
        if !self.flash() && seq_len * 4 > REFERENCE_ATTENTION_SHARED {
            return Err(CudaError::Driver(format!(
                "the reference attention (fp32, or head_dim {} != 64) holds a row of scores in 48 KiB of shared \
                 memory: seq_len {seq_len} is above its {} tokens; use precision = \"bf16\" with head_dim 64",
                self.config.head_dim(),
                REFERENCE_ATTENTION_SHARED / 4
            )));
        }
        if self.config.head_dim() > 1024 {
            return Err(CudaError::Driver(format!(
                "head_dim {} is above 1024 threads per block",
                self.config.head_dim()
            )));
        }
        if self
            .acts
            .as_ref()
            .is_some_and(|a| a.rows == rows && a.seq_len == seq_len && a.recompute == self.recompute)
        {
            return Ok(());
        }
        self.acts = None;
        let c = &self.config;
        let (n, d, f, kv, heads, layers) = (
            rows * seq_len,
            c.hidden_size,
            c.intermediate_size,
            c.kv_dim(),
            c.num_attention_heads,
            c.num_hidden_layers,
        );
        let es = self.es();
        let vocab = padded_vocab(c.vocab_size);
        let logits_rows = logits_rows(c, n, self.precision);
        let kept = if self.recompute { 1 } else { layers };
        let per_layer =
            |bytes: usize| -> Result<Vec<DevBuf>, CudaError> { (0..kept).map(|_| DevBuf::zeros(gpu, bytes)).collect() };
        let half = c.head_dim() / 2;
        let (mut cos, mut sin) = (vec![0f32; seq_len * half], vec![0f32; seq_len * half]);
        for p in 0..seq_len {
            for j in 0..half {
                // As the CPU backend: in f64, rounded once.
                let freq = c.rope_theta.powf(-2.0 * j as f64 / c.head_dim() as f64);
                let (s, co) = (p as f64 * freq).sin_cos();
                cos[p * half + j] = co as f32;
                sin[p * half + j] = s as f32;
            }
        }
        let acts = Activations {
            recompute: self.recompute,
            rows,
            seq_len,
            x: (0..=layers)
                .map(|_| DevBuf::zeros(gpu, n * d * es))
                .collect::<Result<_, _>>()?,
            h1: per_layer(n * d * es)?,
            rstd1: per_layer(n * 4)?,
            qkv: per_layer(n * (d + 2 * kv) * es)?,
            attn: per_layer(n * d * es)?,
            lse: per_layer(n * heads * 4)?,
            xmid: per_layer(n * d * es)?,
            h2: per_layer(n * d * es)?,
            rstd2: per_layer(n * 4)?,
            gu: per_layer(n * 2 * f * es)?,
            act: per_layer(n * f * es)?,
            hf: DevBuf::zeros(gpu, n * d * es)?,
            rstdf: DevBuf::zeros(gpu, n * 4)?,
            logits: DevBuf::zeros(gpu, logits_rows * vocab * es)?,
            logits_rows,
            dx: DevBuf::zeros(gpu, n * d * es)?,
            dbig: DevBuf::zeros(gpu, n * (2 * f).max(d + 2 * kv) * es)?,
            dsmall: DevBuf::zeros(gpu, n * f.max(d) * es)?,
            delta: DevBuf::zeros(gpu, n * heads * 4)?,
            losses: DevBuf::zeros(gpu, n * 4)?,
            partial: DevBuf::zeros(gpu, n.div_ceil(NORM_ROWS_PER_BLOCK) * d * 4)?,
            ids: DevBuf::zeros(gpu, n * 4)?,
            targets: DevBuf::zeros(gpu, n * 4)?,
            weights: DevBuf::zeros(gpu, n * 4)?,
            segments: DevBuf::zeros(gpu, n * 4)?,
            doc_start: DevBuf::zeros(gpu, n * 4)?,
            group_tokens: DevBuf::zeros(gpu, n * 4)?,
            group_starts: DevBuf::zeros(gpu, (n + 1) * 4)?,
            group_positions: DevBuf::zeros(gpu, n * 4)?,
            cos: DevBuf::zeros(gpu, cos.len() * 4)?,
            sin: DevBuf::zeros(gpu, sin.len() * 4)?,
        };
        upload(gpu, acts.cos.ptr, &cos)?;
        upload(gpu, acts.sin.ptr, &sin)?;
        self.acts = Some(acts);
        Ok(())
    }

    /// Forward and backward of one micro-batch: adds its weight gradients (of the micro-batch's
    /// mean loss) to `grads`, returns its loss.
    pub fn forward_backward(&mut self, gpu: &Gpu, batch: &Batch) -> Result<MicroLoss, CudaError> {
        self.forward_backward_with(gpu, batch, &mut |_| Ok(()))
    }

    /// [`GpuModel::forward_backward`], calling `layer_done(l)` once layer `l`'s weight
    /// gradients are all queued (layers in reverse order), e.g. to start their all-reduce.
    pub fn forward_backward_with(
        &mut self,
        gpu: &Gpu,
        batch: &Batch,
        layer_done: &mut dyn FnMut(usize) -> Result<(), CudaError>,
    ) -> Result<MicroLoss, CudaError> {
        self.activations(gpu, batch.rows, batch.seq_len)?;
        let inputs = Inputs::of(batch, self.config.vocab_size)?;
        let acts = self.acts.take().expect("allocated above");
        let result = self.pass(gpu, &acts, &inputs, layer_done);
        self.acts = Some(acts);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_plan_of_the_presets_fits_an_80_gb_gpu_at_a_useful_micro_batch() {
        let config = LlamaConfig::preset("smollm2-1.7b").unwrap();
        let tokens = 8 * 2048;
        let plan = super::super::memory::MemoryPlan::of(&config, tokens, Precision::Bf16, false);
        // 18 bytes per parameter: fp32 master, gradient, two moments, the bf16 copy.
        let params = config.parameter_count() as f64;
        assert!(
            (plan.parameters as f64 / params - 18.0).abs() < 0.1,
            "{}",
            plan.describe()
        );
        assert!(plan.total() < 80 << 30, "{}", plan.describe());
        assert!(plan.describe().contains("GiB"));
        // Recomputation keeps one layer's activations instead of 24.
        let lean = super::super::memory::MemoryPlan::of(&config, tokens, Precision::Bf16, true);
        assert!(
            lean.activations * 4 < plan.activations,
            "{} vs {}",
            lean.describe(),
            plan.describe()
        );
    }
}
