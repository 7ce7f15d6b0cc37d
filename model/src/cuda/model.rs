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
//! head (final norm, tied embedding, cross-entropy) runs a chunk of rows at a time.

use super::blas::{Blas, Dtype, Gemm};
use super::layout::{Inputs, Layout, padded_vocab};
use super::memory::{DevBuf, download, launch, upload, zero};
use super::{CudaError, Gpu, Precision};
use crate::llama::{Batch, LlamaConfig, Params};

/// Activations of one micro-batch shape (`rows x seq_len` tokens), allocated once and reused.
struct Activations {
    rows: usize,
    seq_len: usize,
    /// Residual stream: x[0] is the embedding's output, x[L] the last layer's.
    x: Vec<DevBuf>,
    h1: Vec<DevBuf>,
    rstd1: Vec<DevBuf>,
    qkv: Vec<DevBuf>,
    attn: Vec<DevBuf>,
    lse: Vec<DevBuf>,
    xmid: Vec<DevBuf>,
    h2: Vec<DevBuf>,
    rstd2: Vec<DevBuf>,
    gu: Vec<DevBuf>,
    act: Vec<DevBuf>,
    hf: DevBuf,
    rstdf: DevBuf,
    // Scratch shared by every layer.
    logits: DevBuf,
    logits_rows: usize,
    dx: DevBuf,
    dbig: DevBuf,
    dsmall: DevBuf,
    delta: DevBuf,
    losses: DevBuf,
    partial: DevBuf,
    // Inputs.
    ids: DevBuf,
    targets: DevBuf,
    weights: DevBuf,
    segments: DevBuf,
    doc_start: DevBuf,
    group_tokens: DevBuf,
    group_starts: DevBuf,
    group_positions: DevBuf,
    cos: DevBuf,
    sin: DevBuf,
}

/// Rows a block of the RMSNorm backward sums its weight gradient over.
const NORM_ROWS_PER_BLOCK: usize = 64;
/// The most logits one chunk of the head holds (bytes).
const LOGITS_BYTES: usize = 512 << 20;

/// Rows of logits the head computes at a time for `tokens` tokens per micro-batch.
pub fn logits_rows(config: &LlamaConfig, tokens: usize, precision: Precision) -> usize {
    (LOGITS_BYTES / (padded_vocab(config.vocab_size) * precision.bytes())).clamp(1, tokens.max(1))
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
    blas: Blas,
    /// fp32 master weights, gradients and AdamW moments, all in [`Layout`].
    pub master: DevBuf,
    pub grads: DevBuf,
    pub m: DevBuf,
    pub v: DevBuf,
    /// bf16 working copy of the weights (bf16 mode only).
    pub weights16: Option<DevBuf>,
    acts: Option<Activations>,
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
        let bytes = layout.total * 4;
        let master = DevBuf::zeros(gpu, bytes)?;
        upload(gpu, master.ptr, &layout.flatten(params))?;
        let weights16 = match precision {
            Precision::Bf16 => Some(DevBuf::zeros(gpu, layout.total * 2)?),
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

    fn es(&self) -> usize {
        self.precision.bytes()
    }

    fn dtype(&self) -> Dtype {
        match self.precision {
            Precision::F32 => Dtype::F32,
            Precision::Bf16 => Dtype::Bf16,
        }
    }

    /// The working copy's address of element `offset`.
    fn w(&self, offset: usize) -> u64 {
        match &self.weights16 {
            Some(w16) => w16.at(offset, 2),
            None => self.master.at(offset, 4),
        }
    }

    /// Whether attention runs the fused tensor-core kernels (bf16, head_dim 64: every SmolLM2
    /// shape) rather than the reference ones.
    fn flash(&self) -> bool {
        self.precision == Precision::Bf16 && self.config.head_dim() == 64
    }

    fn kernel(&self, base: &str) -> String {
        format!("{base}_{}", self.precision.suffix())
    }

    /// Allocates the activations for `rows x seq_len` tokens (once per shape).
    fn activations(&mut self, gpu: &Gpu, rows: usize, seq_len: usize) -> Result<(), CudaError> {
        if self
            .acts
            .as_ref()
            .is_some_and(|a| a.rows == rows && a.seq_len == seq_len)
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
        let per_layer = |bytes: usize| -> Result<Vec<DevBuf>, CudaError> {
            (0..layers).map(|_| DevBuf::zeros(gpu, bytes)).collect()
        };
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

    /// Queues one GEMM (row-major, see [`Gemm`]) in the model's precision; `output` says
    /// whether D is the working type or fp32 (weight gradients).
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        trans_a: bool,
        b: u64,
        trans_b: bool,
        c: Option<u64>,
        d: u64,
        output: Dtype,
    ) -> Result<(), CudaError> {
        self.blas.gemm(&Gemm {
            m,
            n,
            k,
            a,
            trans_a,
            b,
            trans_b,
            c: c.unwrap_or(d),
            d,
            input: self.dtype(),
            output,
            alpha: 1.0,
            beta: if c.is_some() { 1.0 } else { 0.0 },
        })
    }

    /// Forward and backward of one micro-batch: adds its weight gradients (of the micro-batch's
    /// mean loss) to `grads`, returns its loss.
    pub fn forward_backward(&mut self, gpu: &Gpu, batch: &Batch) -> Result<MicroLoss, CudaError> {
        self.activations(gpu, batch.rows, batch.seq_len)?;
        let inputs = Inputs::of(batch, self.config.vocab_size)?;
        let acts = self.acts.take().expect("allocated above");
        let result = self.pass(gpu, &acts, &inputs);
        self.acts = Some(acts);
        result
    }

    fn pass(&self, gpu: &Gpu, a: &Activations, inputs: &Inputs) -> Result<MicroLoss, CudaError> {
        let c = &self.config;
        let (n, d, f, kv) = (a.rows * a.seq_len, c.hidden_size, c.intermediate_size, c.kv_dim());
        let (heads, kvh, hd, layers) = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim(),
            c.num_hidden_layers,
        );
        let (es, wt, f32t) = (self.es(), self.dtype(), Dtype::F32);
        let qkv_w = d + 2 * kv;
        let vocab = padded_vocab(c.vocab_size);
        let eps = c.rms_norm_eps as f32;
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let (d_i, n_i, seq_i, heads_i, kvh_i, hd_i) = (
            d as i32,
            n as i32,
            a.seq_len as i32,
            heads as i32,
            kvh as i32,
            hd as i32,
        );
        let qkv_stride = qkv_w as i64;
        let segments = if inputs.segments.is_some() {
            a.segments.ptr
        } else {
            0u64
        };

        upload(gpu, a.ids.ptr, &inputs.ids)?;
        upload(gpu, a.targets.ptr, &inputs.targets)?;
        upload(gpu, a.weights.ptr, &inputs.weights)?;
        if let Some(s) = &inputs.segments {
            upload(gpu, a.segments.ptr, s)?;
        }
        upload(gpu, a.doc_start.ptr, &inputs.doc_start)?;
        upload(gpu, a.group_tokens.ptr, &inputs.group_tokens)?;
        upload(gpu, a.group_starts.ptr, &inputs.group_starts)?;
        upload(gpu, a.group_positions.ptr, &inputs.group_positions)?;

        // Forward.
        let embed = self.layout.embed();
        launch!(gpu, self.kernel("embed_forward"), (n, 1), 256, 0; a.ids.ptr, self.w(embed), a.x[0].ptr, d_i)?;
        for l in 0..layers {
            let s = self.layout.layer(l);
            launch!(gpu, self.kernel("rmsnorm_forward"), (n, 1), 256, 0;
                a.x[l].ptr, 0u64, self.w(s.attn_norm), a.h1[l].ptr, a.rstd1[l].ptr, d_i, eps)?;
            self.gemm(
                n,
                qkv_w,
                d,
                a.h1[l].ptr,
                false,
                self.w(s.qkv),
                true,
                None,
                a.qkv[l].ptr,
                wt,
            )?;
            let (q, k, v) = (a.qkv[l].ptr, a.qkv[l].at(d, es), a.qkv[l].at(d + kv, es));
            launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; q, a.cos.ptr, a.sin.ptr, heads_i, hd_i, seq_i, qkv_stride, 1f32)?;
            launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; k, a.cos.ptr, a.sin.ptr, kvh_i, hd_i, seq_i, qkv_stride, 1f32)?;
            if self.flash() {
                launch!(gpu, "flash_forward_bf16", (a.seq_len.div_ceil(64), heads), 128, 0, a.rows;
                    q, k, v, a.attn[l].ptr, a.lse[l].ptr, a.doc_start.ptr, seq_i, heads_i, kvh_i, qkv_stride, qkv_stride, scale)?;
            } else {
                launch!(gpu, self.kernel("attention_forward"), (n, heads), 128, a.seq_len * 4;
                    q, k, v, a.attn[l].ptr, a.lse[l].ptr, segments, seq_i, heads_i, kvh_i, hd_i, qkv_stride, qkv_stride, scale)?;
            }
            self.gemm(
                n,
                d,
                d,
                a.attn[l].ptr,
                false,
                self.w(s.o),
                true,
                Some(a.x[l].ptr),
                a.xmid[l].ptr,
                wt,
            )?;
            launch!(gpu, self.kernel("rmsnorm_forward"), (n, 1), 256, 0;
                a.xmid[l].ptr, 0u64, self.w(s.mlp_norm), a.h2[l].ptr, a.rstd2[l].ptr, d_i, eps)?;
            self.gemm(
                n,
                2 * f,
                d,
                a.h2[l].ptr,
                false,
                self.w(s.gate_up),
                true,
                None,
                a.gu[l].ptr,
                wt,
            )?;
            launch!(gpu, self.kernel("swiglu_forward"), (n.min(4096), 1), 256, 0; a.gu[l].ptr, a.act[l].ptr, n as i64, f as i32)?;
            self.gemm(
                n,
                d,
                f,
                a.act[l].ptr,
                false,
                self.w(s.down),
                true,
                Some(a.xmid[l].ptr),
                a.x[l + 1].ptr,
                wt,
            )?;
        }
        let norm = self.layout.final_norm();
        launch!(gpu, self.kernel("rmsnorm_forward"), (n, 1), 256, 0;
            a.x[layers].ptr, 0u64, self.w(norm), a.hf.ptr, a.rstdf.ptr, d_i, eps)?;

        // The head, a chunk of rows at a time: logits, loss and their gradient in place, then
        // the gradient of the final norm's output (dsmall) and of the tied embedding.
        let grad = |offset: usize| self.grads.at(offset, 4);
        for start in (0..n).step_by(a.logits_rows) {
            let rows = a.logits_rows.min(n - start);
            self.gemm(
                rows,
                vocab,
                d,
                a.hf.at(start * d, es),
                false,
                self.w(embed),
                true,
                None,
                a.logits.ptr,
                wt,
            )?;
            launch!(gpu, self.kernel("cross_entropy"), (rows, 1), 1024, 0;
                a.logits.ptr, a.targets.at(start, 4), a.weights.at(start, 4), a.losses.at(start, 4),
                c.vocab_size as i32, vocab as i64)?;
            self.gemm(
                rows,
                d,
                vocab,
                a.logits.ptr,
                false,
                self.w(embed),
                false,
                None,
                a.dsmall.at(start * d, es),
                wt,
            )?;
            self.gemm(
                vocab,
                d,
                rows,
                a.logits.ptr,
                true,
                a.hf.at(start * d, es),
                false,
                Some(grad(embed)),
                grad(embed),
                f32t,
            )?;
        }
        zero(gpu, a.dx.ptr, n * d * es)?;
        self.norm_backward(gpu, a, a.x[layers].ptr, norm, a.rstdf.ptr, a.dsmall.ptr)?;

        // Backward through the layers; dx holds d loss / d x[l + 1], updated in place to d x[l].
        for l in (0..layers).rev() {
            let s = self.layout.layer(l);
            self.gemm(n, f, d, a.dx.ptr, false, self.w(s.down), false, None, a.dsmall.ptr, wt)?;
            self.gemm(
                d,
                f,
                n,
                a.dx.ptr,
                true,
                a.act[l].ptr,
                false,
                Some(grad(s.down)),
                grad(s.down),
                f32t,
            )?;
            launch!(gpu, self.kernel("swiglu_backward"), (n.min(4096), 1), 256, 0; a.gu[l].ptr, a.dsmall.ptr, a.dbig.ptr, n as i64, f as i32)?;
            self.gemm(
                n,
                d,
                2 * f,
                a.dbig.ptr,
                false,
                self.w(s.gate_up),
                false,
                None,
                a.dsmall.ptr,
                wt,
            )?;
            self.gemm(
                2 * f,
                d,
                n,
                a.dbig.ptr,
                true,
                a.h2[l].ptr,
                false,
                Some(grad(s.gate_up)),
                grad(s.gate_up),
                f32t,
            )?;
            self.norm_backward(gpu, a, a.xmid[l].ptr, s.mlp_norm, a.rstd2[l].ptr, a.dsmall.ptr)?;

            self.gemm(n, d, d, a.dx.ptr, false, self.w(s.o), false, None, a.dsmall.ptr, wt)?;
            self.gemm(
                d,
                d,
                n,
                a.dx.ptr,
                true,
                a.attn[l].ptr,
                false,
                Some(grad(s.o)),
                grad(s.o),
                f32t,
            )?;
            let (q, k, v) = (a.qkv[l].ptr, a.qkv[l].at(d, es), a.qkv[l].at(d + kv, es));
            let (dq, dk, dv) = (a.dbig.ptr, a.dbig.at(d, es), a.dbig.at(d + kv, es));
            launch!(gpu, self.kernel("attention_delta"), (n, 1), 64, 0; a.attn[l].ptr, a.dsmall.ptr, a.delta.ptr, heads_i, hd_i)?;
            if self.flash() {
                let tiles = a.seq_len.div_ceil(64);
                launch!(gpu, "flash_backward_query_bf16", (tiles, heads), 128, 0, a.rows;
                    q, k, v, a.dsmall.ptr, a.lse[l].ptr, a.delta.ptr, dq, a.doc_start.ptr, seq_i, heads_i, kvh_i, qkv_stride, qkv_stride, scale)?;
                launch!(gpu, "flash_backward_key_bf16", (tiles, kvh), 128, 0, a.rows;
                    q, k, v, a.dsmall.ptr, a.lse[l].ptr, a.delta.ptr, dk, dv, a.doc_start.ptr, seq_i, heads_i, kvh_i, qkv_stride, qkv_stride, scale)?;
            } else {
                launch!(gpu, self.kernel("attention_backward_query"), (n, heads), 64, 0;
                    q, k, v, a.dsmall.ptr, a.lse[l].ptr, a.delta.ptr, dq, segments, seq_i, heads_i, kvh_i, hd_i, qkv_stride, qkv_stride, scale)?;
                launch!(gpu, self.kernel("attention_backward_key"), (n, kvh), 64, 0;
                    q, k, v, a.dsmall.ptr, a.lse[l].ptr, a.delta.ptr, dk, dv, segments, seq_i, heads_i, kvh_i, hd_i, qkv_stride, qkv_stride, scale)?;
            }
            launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; dq, a.cos.ptr, a.sin.ptr, heads_i, hd_i, seq_i, qkv_stride, -1f32)?;
            launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; dk, a.cos.ptr, a.sin.ptr, kvh_i, hd_i, seq_i, qkv_stride, -1f32)?;
            self.gemm(
                n,
                d,
                qkv_w,
                a.dbig.ptr,
                false,
                self.w(s.qkv),
                false,
                None,
                a.dsmall.ptr,
                wt,
            )?;
            self.gemm(
                qkv_w,
                d,
                n,
                a.dbig.ptr,
                true,
                a.h1[l].ptr,
                false,
                Some(grad(s.qkv)),
                grad(s.qkv),
                f32t,
            )?;
            self.norm_backward(gpu, a, a.x[l].ptr, s.attn_norm, a.rstd1[l].ptr, a.dsmall.ptr)?;
        }
        let groups = inputs.group_tokens.len() as i32;
        if groups > 0 {
            launch!(gpu, self.kernel("embed_backward"), (groups, 1), 256, 0;
                a.group_tokens.ptr, a.group_starts.ptr, a.group_positions.ptr, a.dx.ptr, grad(embed), d_i)?;
        }
        let _ = n_i;
        let mut losses = vec![0f32; n];
        download(gpu, &mut losses, a.losses.ptr)?;
        Ok(MicroLoss {
            sum: losses.iter().map(|&x| f64::from(x)).sum(),
            counted: inputs.counted,
        })
    }

    /// RMSNorm backward: `dx += norm'(dy)` for the norm of input `x` with weight at `weight`,
    /// and the weight's gradient summed (deterministically) into `grads`.
    fn norm_backward(
        &self,
        gpu: &Gpu,
        a: &Activations,
        x: u64,
        weight: usize,
        rstd: u64,
        dy: u64,
    ) -> Result<(), CudaError> {
        let (n, d) = (a.rows * a.seq_len, self.config.hidden_size);
        let blocks = n.div_ceil(NORM_ROWS_PER_BLOCK);
        launch!(gpu, self.kernel("rmsnorm_backward"), (blocks, 1), 256, 0;
            x, self.w(weight), rstd, dy, a.dx.ptr, a.partial.ptr, n as i32, NORM_ROWS_PER_BLOCK as i32, d as i32)?;
        launch!(gpu, "column_sum", (d.div_ceil(256), 1), 256, 0;
            a.partial.ptr, self.grads.at(weight, 4), blocks as i32, d as i32, 1i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_memory_plan_of_the_presets_fits_an_80_gb_gpu_at_a_useful_micro_batch() {
        let config = LlamaConfig::preset("smollm2-1.7b").unwrap();
        let tokens = 8 * 2048;
        let plan = super::super::memory::MemoryPlan::of(
            &config,
            tokens,
            Precision::Bf16,
            logits_rows(&config, tokens, Precision::Bf16),
        );
        // 18 bytes per parameter: fp32 master, gradient, two moments, the bf16 copy.
        let params = config.parameter_count() as f64;
        assert!(
            (plan.parameters as f64 / params - 18.0).abs() < 0.1,
            "{}",
            plan.describe()
        );
        assert!(plan.total() < 80 << 30, "{}", plan.describe());
        assert!(plan.describe().contains("GiB"));
    }
}
