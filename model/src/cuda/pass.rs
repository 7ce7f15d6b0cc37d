//! One micro-batch's forward and backward pass on the GPU (the dataflow is in
//! [`super::model`]'s doc): the inputs uploaded, each layer forward, the head, the head's and
//! each layer's backward (after recomputing the layer when activations are not all kept), the
//! embedding's backward. Weight gradients accumulate in fp32 in the model's `grads`.

use super::blas::{Dtype, Gemm};
use super::layout::{Inputs, padded_vocab};
use super::memory::{download, launch, upload, zero};
use super::model::{Activations, GpuModel, MicroLoss, NORM_ROWS_PER_BLOCK};
use super::{CudaError, Gpu};

/// Sizes and scalar kernel arguments shared by every launch of one pass.
struct Dims {
    n: usize,
    d: usize,
    f: usize,
    kv: usize,
    heads: usize,
    kvh: usize,
    layers: usize,
    es: usize,
    qkv_w: usize,
    vocab: usize,
    eps: f32,
    scale: f32,
    d_i: i32,
    seq_i: i32,
    heads_i: i32,
    kvh_i: i32,
    hd_i: i32,
    /// Threads of the reference attention's blocks: at least head_dim (each thread owns a
    /// column), a multiple of 32.
    attention_block: usize,
    qkv_stride: i64,
    /// Each token's document (0: no document masks), for the reference attention.
    segments: u64,
}

impl GpuModel {
    /// `y[rows, out] = x[rows, inp] W^T (+ residual)`, W stored `[out, inp]`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        rows: usize,
        out: usize,
        inp: usize,
        x: u64,
        w: u64,
        residual: Option<u64>,
        y: u64,
    ) -> Result<(), CudaError> {
        self.product(rows, out, inp, (x, false), (w, true), residual, y, self.dtype())
    }

    /// `dx[rows, inp] = dy[rows, out] W`.
    fn linear_grad_input(
        &self,
        rows: usize,
        out: usize,
        inp: usize,
        dy: u64,
        w: u64,
        dx: u64,
    ) -> Result<(), CudaError> {
        self.product(rows, inp, out, (dy, false), (w, false), None, dx, self.dtype())
    }

    /// `dW[out, inp] += dy[rows, out]^T x[rows, inp]`, in fp32.
    fn linear_grad_weight(
        &self,
        rows: usize,
        out: usize,
        inp: usize,
        dy: u64,
        x: u64,
        dw: u64,
    ) -> Result<(), CudaError> {
        self.product(out, inp, rows, (dy, true), (x, false), Some(dw), dw, Dtype::F32)
    }

    /// One row-major GEMM, `d = op(a) op(b) (+ c)` (see [`Gemm`]).
    #[allow(clippy::too_many_arguments)]
    fn product(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: (u64, bool),
        b: (u64, bool),
        c: Option<u64>,
        d: u64,
        output: Dtype,
    ) -> Result<(), CudaError> {
        self.blas.gemm(&Gemm {
            m,
            n,
            k,
            a: a.0,
            trans_a: a.1,
            b: b.0,
            trans_b: b.1,
            c: c.unwrap_or(d),
            d,
            input: self.dtype(),
            output,
            alpha: 1.0,
            beta: if c.is_some() { 1.0 } else { 0.0 },
        })
    }

    fn dims(&self, a: &Activations, inputs: &Inputs) -> Dims {
        let c = &self.config;
        let (d, kv, heads, kvh, hd) = (
            c.hidden_size,
            c.kv_dim(),
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim(),
        );
        Dims {
            n: a.rows * a.seq_len,
            d,
            f: c.intermediate_size,
            kv,
            heads,
            kvh,
            layers: c.num_hidden_layers,
            es: self.es(),
            qkv_w: d + 2 * kv,
            vocab: padded_vocab(c.vocab_size),
            eps: c.rms_norm_eps as f32,
            scale: (1.0 / (hd as f64).sqrt()) as f32,
            d_i: d as i32,
            seq_i: a.seq_len as i32,
            heads_i: heads as i32,
            kvh_i: kvh as i32,
            hd_i: hd as i32,
            attention_block: hd.next_multiple_of(32).max(64),
            qkv_stride: (d + 2 * kv) as i64,
            segments: if inputs.segments.is_some() { a.segments.ptr } else { 0 },
        }
    }

    pub(super) fn pass(
        &self,
        gpu: &Gpu,
        a: &Activations,
        inputs: &Inputs,
        layer_done: &mut dyn FnMut(usize) -> Result<(), CudaError>,
    ) -> Result<MicroLoss, CudaError> {
        let m = self.dims(a, inputs);
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

        let embed = self.layout.embed();
        launch!(gpu, self.kernel("embed_forward"), (m.n, 1), 256, 0; a.ids.ptr, self.w(embed), a.x[0].ptr, m.d_i)?;
        for l in 0..m.layers {
            self.layer_forward(gpu, a, &m, l)?;
        }
        self.head(gpu, a, &m)?;
        for l in (0..m.layers).rev() {
            if a.recompute {
                self.layer_forward(gpu, a, &m, l)?;
            }
            self.layer_backward(gpu, a, &m, l)?;
            layer_done(l)?;
        }
        let groups = inputs.group_tokens.len() as i32;
        if groups > 0 {
            launch!(gpu, self.kernel("embed_backward"), (groups, 1), 256, 0;
                a.group_tokens.ptr, a.group_starts.ptr, a.group_positions.ptr, a.dx.ptr, self.grads.at(embed, 4), m.d_i)?;
        }
        let mut losses = vec![0f32; m.n];
        download(gpu, &mut losses, a.losses.ptr)?;
        Ok(MicroLoss {
            sum: losses.iter().map(|&x| f64::from(x)).sum(),
            counted: inputs.counted,
        })
    }

    /// Layer `l` forward, from `x[l]` to `x[l + 1]`, keeping what its backward pass reads.
    fn layer_forward(&self, gpu: &Gpu, a: &Activations, m: &Dims, l: usize) -> Result<(), CudaError> {
        let (s, j, n) = (self.layout.layer(l), a.slot(l), m.n);
        launch!(gpu, self.kernel("rmsnorm_forward"), (n, 1), 256, 0;
            a.x[l].ptr, 0u64, self.w(s.attn_norm), a.h1[j].ptr, a.rstd1[j].ptr, m.d_i, m.eps)?;
        self.linear(n, m.qkv_w, m.d, a.h1[j].ptr, self.w(s.qkv), None, a.qkv[j].ptr)?;
        let (q, k, v) = (a.qkv[j].ptr, a.qkv[j].at(m.d, m.es), a.qkv[j].at(m.d + m.kv, m.es));
        launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; q, a.cos.ptr, a.sin.ptr, m.heads_i, m.hd_i, m.seq_i, m.qkv_stride, 1f32)?;
        launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; k, a.cos.ptr, a.sin.ptr, m.kvh_i, m.hd_i, m.seq_i, m.qkv_stride, 1f32)?;
        if self.flash() {
            launch!(gpu, "flash_forward_bf16", (a.seq_len.div_ceil(64), m.heads), 128, 0, a.rows;
                q, k, v, a.attn[j].ptr, a.lse[j].ptr, a.doc_start.ptr, m.seq_i, m.heads_i, m.kvh_i, m.qkv_stride, m.qkv_stride, m.scale)?;
        } else {
            launch!(gpu, self.kernel("attention_forward"), (n, m.heads), m.attention_block.max(128), a.seq_len * 4;
                q, k, v, a.attn[j].ptr, a.lse[j].ptr, m.segments, m.seq_i, m.heads_i, m.kvh_i, m.hd_i, m.qkv_stride, m.qkv_stride, m.scale)?;
        }
        self.linear(n, m.d, m.d, a.attn[j].ptr, self.w(s.o), Some(a.x[l].ptr), a.xmid[j].ptr)?;
        launch!(gpu, self.kernel("rmsnorm_forward"), (n, 1), 256, 0;
            a.xmid[j].ptr, 0u64, self.w(s.mlp_norm), a.h2[j].ptr, a.rstd2[j].ptr, m.d_i, m.eps)?;
        self.linear(n, 2 * m.f, m.d, a.h2[j].ptr, self.w(s.gate_up), None, a.gu[j].ptr)?;
        launch!(gpu, self.kernel("swiglu_forward"), (n.min(4096), 1), 256, 0; a.gu[j].ptr, a.act[j].ptr, n as i64, m.f as i32)?;
        self.linear(
            n,
            m.d,
            m.f,
            a.act[j].ptr,
            self.w(s.down),
            Some(a.xmid[j].ptr),
            a.x[l + 1].ptr,
        )
    }

    /// The final norm, the tied vocabulary projection and the loss, a chunk of rows at a time
    /// (logits, loss and their gradient in place), then the gradients back to the last
    /// layer's output in `dx`, and the embedding's gradient as the output projection.
    fn head(&self, gpu: &Gpu, a: &Activations, m: &Dims) -> Result<(), CudaError> {
        let (embed, norm, n, d) = (self.layout.embed(), self.layout.final_norm(), m.n, m.d);
        launch!(gpu, self.kernel("rmsnorm_forward"), (n, 1), 256, 0;
            a.x[m.layers].ptr, 0u64, self.w(norm), a.hf.ptr, a.rstdf.ptr, m.d_i, m.eps)?;
        let dembed = self.grads.at(embed, 4);
        for start in (0..n).step_by(a.logits_rows) {
            let rows = a.logits_rows.min(n - start);
            let h = a.hf.at(start * d, m.es);
            self.linear(rows, m.vocab, d, h, self.w(embed), None, a.logits.ptr)?;
            launch!(gpu, self.kernel("cross_entropy"), (rows, 1), 1024, 0;
                a.logits.ptr, a.targets.at(start, 4), a.weights.at(start, 4), a.losses.at(start, 4),
                self.config.vocab_size as i32, m.vocab as i64)?;
            self.linear_grad_input(
                rows,
                m.vocab,
                d,
                a.logits.ptr,
                self.w(embed),
                a.dsmall.at(start * d, m.es),
            )?;
            self.linear_grad_weight(rows, m.vocab, d, a.logits.ptr, h, dembed)?;
        }
        zero(gpu, a.dx.ptr, n * d * m.es)?;
        self.norm_backward(gpu, a, a.x[m.layers].ptr, norm, a.rstdf.ptr, a.dsmall.ptr)
    }

    /// Layer `l` backward: `dx` holds d loss / d x[l + 1] and becomes d loss / d x[l].
    fn layer_backward(&self, gpu: &Gpu, a: &Activations, m: &Dims, l: usize) -> Result<(), CudaError> {
        let (s, j, n, d, f) = (self.layout.layer(l), a.slot(l), m.n, m.d, m.f);
        let grad = |offset: usize| self.grads.at(offset, 4);
        // MLP: x' = m Wdown^T + xmid.
        self.linear_grad_input(n, d, f, a.dx.ptr, self.w(s.down), a.dsmall.ptr)?;
        self.linear_grad_weight(n, d, f, a.dx.ptr, a.act[j].ptr, grad(s.down))?;
        launch!(gpu, self.kernel("swiglu_backward"), (n.min(4096), 1), 256, 0;
            a.gu[j].ptr, a.dsmall.ptr, a.dbig.ptr, n as i64, f as i32)?;
        self.linear_grad_input(n, 2 * f, d, a.dbig.ptr, self.w(s.gate_up), a.dsmall.ptr)?;
        self.linear_grad_weight(n, 2 * f, d, a.dbig.ptr, a.h2[j].ptr, grad(s.gate_up))?;
        self.norm_backward(gpu, a, a.xmid[j].ptr, s.mlp_norm, a.rstd2[j].ptr, a.dsmall.ptr)?;
        // Attention: xmid = attn Wo^T + x.
        self.linear_grad_input(n, d, d, a.dx.ptr, self.w(s.o), a.dsmall.ptr)?;
        self.linear_grad_weight(n, d, d, a.dx.ptr, a.attn[j].ptr, grad(s.o))?;
        let (q, k, v) = (a.qkv[j].ptr, a.qkv[j].at(d, m.es), a.qkv[j].at(d + m.kv, m.es));
        let (dq, dk, dv) = (a.dbig.ptr, a.dbig.at(d, m.es), a.dbig.at(d + m.kv, m.es));
        launch!(gpu, self.kernel("attention_delta"), (n, 1), 64, 0; a.attn[j].ptr, a.dsmall.ptr, a.delta.ptr, m.heads_i, m.hd_i)?;
        if self.flash() {
            let tiles = a.seq_len.div_ceil(64);
            launch!(gpu, "flash_backward_query_bf16", (tiles, m.heads), 128, 0, a.rows;
                q, k, v, a.dsmall.ptr, a.lse[j].ptr, a.delta.ptr, dq, a.doc_start.ptr, m.seq_i, m.heads_i, m.kvh_i, m.qkv_stride, m.qkv_stride, m.scale)?;
            launch!(gpu, "flash_backward_key_bf16", (tiles, m.kvh), 128, 0, a.rows;
                q, k, v, a.dsmall.ptr, a.lse[j].ptr, a.delta.ptr, dk, dv, a.doc_start.ptr, m.seq_i, m.heads_i, m.kvh_i, m.qkv_stride, m.qkv_stride, m.scale)?;
        } else {
            launch!(gpu, self.kernel("attention_backward_query"), (n, m.heads), m.attention_block, 0;
                q, k, v, a.dsmall.ptr, a.lse[j].ptr, a.delta.ptr, dq, m.segments, m.seq_i, m.heads_i, m.kvh_i, m.hd_i, m.qkv_stride, m.qkv_stride, m.scale)?;
            launch!(gpu, self.kernel("attention_backward_key"), (n, m.kvh), m.attention_block, 0;
                q, k, v, a.dsmall.ptr, a.lse[j].ptr, a.delta.ptr, dk, dv, m.segments, m.seq_i, m.heads_i, m.kvh_i, m.hd_i, m.qkv_stride, m.qkv_stride, m.scale)?;
        }
        launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; dq, a.cos.ptr, a.sin.ptr, m.heads_i, m.hd_i, m.seq_i, m.qkv_stride, -1f32)?;
        launch!(gpu, self.kernel("rope"), (n, 1), 128, 0; dk, a.cos.ptr, a.sin.ptr, m.kvh_i, m.hd_i, m.seq_i, m.qkv_stride, -1f32)?;
        self.linear_grad_input(n, m.qkv_w, d, a.dbig.ptr, self.w(s.qkv), a.dsmall.ptr)?;
        self.linear_grad_weight(n, m.qkv_w, d, a.dbig.ptr, a.h1[j].ptr, grad(s.qkv))?;
        self.norm_backward(gpu, a, a.x[l].ptr, s.attn_norm, a.rstd1[j].ptr, a.dsmall.ptr)
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
