//! The CPU reference backend: forward and backward of the Llama model in plain Rust, generic over
//! `f32` (training) and `f64` (gradient checks).
//!
//! Every output element is computed by one thread in a fixed order, so results are bit-identical
//! across runs and thread counts (what `train --resume` relies on). The matrix products are the
//! reference loops or blocked SIMD GEMM ([`super::gemm`], `CpuModel::kernels`); the rest (norms,
//! RoPE, attention, the loss) is plain Rust. Rayon parallelises over rows. Attention is recomputed in the backward pass from the saved
//! log-sum-exp of each row (no T x T matrix is stored), and the vocabulary projection is done in
//! chunks of rows (no N x V logits matrix is stored).

use super::config::LlamaConfig;
use super::gemm::{Kernels, add_into, axpy, dot, linear, linear_grad_input, linear_grad_weight};
use rayon::prelude::*;

/// The float type of a backend instance.
pub trait Scalar: num_traits::Float + std::iter::Sum + Send + Sync + std::fmt::Debug + 'static {
    /// `c = a b + beta c` for strided `m x k` and `k x n` operands (`matrixmultiply`'s GEMM).
    ///
    /// # Safety
    /// Every element the strides address must lie inside its allocation, and `c`'s must not
    /// overlap `a`'s or `b`'s or any other writer's.
    #[allow(clippy::too_many_arguments, unsafe_code)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        a: *const Self,
        rsa: usize,
        csa: usize,
        b: *const Self,
        rsb: usize,
        csb: usize,
        beta: Self,
        c: *mut Self,
        rsc: usize,
        csc: usize,
    );
}

/// Strides as `matrixmultiply` takes them (they fit: buffers are far below `isize::MAX`).
fn s(stride: usize) -> isize {
    stride as isize
}

/// `Scalar` for a float type whose GEMM is `matrixmultiply::$gemm`.
macro_rules! scalar_with_gemm {
    ($t:ty, $gemm:ident) => {
        #[allow(unsafe_code)]
        impl Scalar for $t {
            unsafe fn gemm(
                m: usize,
                k: usize,
                n: usize,
                a: *const $t,
                rsa: usize,
                csa: usize,
                b: *const $t,
                rsb: usize,
                csb: usize,
                beta: $t,
                c: *mut $t,
                rsc: usize,
                csc: usize,
            ) {
                // SAFETY: the caller's contract is the GEMM's.
                unsafe {
                    matrixmultiply::$gemm(
                        m,
                        k,
                        n,
                        1.0,
                        a,
                        s(rsa),
                        s(csa),
                        b,
                        s(rsb),
                        s(csb),
                        beta,
                        c,
                        s(rsc),
                        s(csc),
                    )
                }
            }
        }
    };
}

scalar_with_gemm!(f32, sgemm);
scalar_with_gemm!(f64, dgemm);

fn c<T: Scalar>(x: f64) -> T {
    T::from(x).expect("representable")
}

/// The weights of one decoder layer (Hugging Face shapes: linear weights are `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerParams<T> {
    pub attn_norm: Vec<T>,
    pub q: Vec<T>,
    pub k: Vec<T>,
    pub v: Vec<T>,
    pub o: Vec<T>,
    pub mlp_norm: Vec<T>,
    pub gate: Vec<T>,
    pub up: Vec<T>,
    pub down: Vec<T>,
}

/// All weights; the output projection is `embed` (tied).
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    pub embed: Vec<T>,
    pub layers: Vec<LayerParams<T>>,
    pub norm: Vec<T>,
}

impl<T: Scalar> Params<T> {
    pub fn zeros(c: &LlamaConfig) -> Self {
        let (d, f, kv, v) = (c.hidden_size, c.intermediate_size, c.kv_dim(), c.vocab_size);
        let z = |n: usize| vec![T::zero(); n];
        Params {
            embed: z(v * d),
            layers: (0..c.num_hidden_layers)
                .map(|_| LayerParams {
                    attn_norm: z(d),
                    q: z(d * d),
                    k: z(kv * d),
                    v: z(kv * d),
                    o: z(d * d),
                    mlp_norm: z(d),
                    gate: z(f * d),
                    up: z(f * d),
                    down: z(d * f),
                })
                .collect(),
            norm: z(d),
        }
    }

    /// Seeded init: N(0, 0.02) for matrices, 1 for norm weights.
    pub fn init(config: &LlamaConfig, seed: u64) -> Self {
        let mut p = Self::zeros(config);
        let mut rng = crate::rng::Normal::new(seed);
        for (name, t, _) in p.tensors_mut() {
            if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
                t.iter_mut().for_each(|x| *x = T::one());
            } else {
                t.iter_mut().for_each(|x| *x = c(rng.sample() * 0.02));
            }
        }
        p
    }

    /// The names and shapes [`Params::tensors`] gives for `config`, without allocating.
    pub fn shapes(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
        let (d, f, kv) = (c.hidden_size, c.intermediate_size, c.kv_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, d])];
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![d, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![d, d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![d, f]));
        }
        out.push(("model.norm.weight".to_string(), vec![d]));
        out
    }

    /// Every tensor with its Hugging Face name and shape, in a fixed order.
    pub fn tensors(&self) -> Vec<(String, &[T], Vec<usize>)> {
        let mut out: Vec<(String, &[T], Vec<usize>)> = Vec::new();
        let d = self.norm.len();
        out.push((
            "model.embed_tokens.weight".into(),
            &self.embed,
            vec![self.embed.len() / d, d],
        ));
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let f = l.gate.len() / d;
            let kv = l.k.len() / d;
            out.push((format!("{p}.input_layernorm.weight"), &l.attn_norm, vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), &l.q, vec![d, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), &l.k, vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), &l.v, vec![kv, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), &l.o, vec![d, d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), &l.mlp_norm, vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), &l.gate, vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), &l.up, vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), &l.down, vec![d, f]));
        }
        out.push(("model.norm.weight".into(), &self.norm, vec![d]));
        out
    }

    /// [`Params::tensors`], mutable.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut [T], Vec<usize>)> {
        let d = self.norm.len();
        let mut out: Vec<(String, &mut [T], Vec<usize>)> = Vec::new();
        let rows = self.embed.len() / d;
        out.push(("model.embed_tokens.weight".into(), &mut self.embed, vec![rows, d]));
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            let f = l.gate.len() / d;
            let kv = l.k.len() / d;
            out.push((format!("{p}.input_layernorm.weight"), &mut l.attn_norm, vec![d]));
            out.push((format!("{p}.self_attn.q_proj.weight"), &mut l.q, vec![d, d]));
            out.push((format!("{p}.self_attn.k_proj.weight"), &mut l.k, vec![kv, d]));
            out.push((format!("{p}.self_attn.v_proj.weight"), &mut l.v, vec![kv, d]));
            out.push((format!("{p}.self_attn.o_proj.weight"), &mut l.o, vec![d, d]));
            out.push((format!("{p}.post_attention_layernorm.weight"), &mut l.mlp_norm, vec![d]));
            out.push((format!("{p}.mlp.gate_proj.weight"), &mut l.gate, vec![f, d]));
            out.push((format!("{p}.mlp.up_proj.weight"), &mut l.up, vec![f, d]));
            out.push((format!("{p}.mlp.down_proj.weight"), &mut l.down, vec![d, f]));
        }
        out.push(("model.norm.weight".into(), &mut self.norm, vec![d]));
        out
    }

    /// Converts every element (f32 <-> f64).
    pub fn cast<U: Scalar>(&self, c: &LlamaConfig) -> Params<U> {
        let mut out = Params::<U>::zeros(c);
        for ((_, dst, _), (_, src, _)) in out.tensors_mut().into_iter().zip(self.tensors()) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = U::from(s.to_f64().expect("finite")).expect("representable");
            }
        }
        out
    }
}

/// One training batch: `rows` sequences of `seq_len + 1` token ids (inputs are the first
/// `seq_len`, targets the last `seq_len`).
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub tokens: Vec<u32>,
    /// Per input position, a document number: attention never crosses documents when given.
    pub segments: Option<Vec<u32>>,
    /// Per target position, whether it counts in the loss (all when `None`).
    pub loss_mask: Option<Vec<bool>>,
}

impl Batch {
    fn input(&self, n: usize) -> usize {
        let (b, t) = (n / self.seq_len, n % self.seq_len);
        self.tokens[b * (self.seq_len + 1) + t] as usize
    }

    fn target(&self, n: usize) -> usize {
        let (b, t) = (n / self.seq_len, n % self.seq_len);
        self.tokens[b * (self.seq_len + 1) + t + 1] as usize
    }

    fn counts(&self, n: usize) -> bool {
        self.loss_mask.as_ref().is_none_or(|m| m[n])
    }

    /// Whether position `t` may attend to position `s` of the same row (`n = b * seq_len + t`).
    fn visible(&self, n: usize, m: usize) -> bool {
        m <= n && self.segments.as_ref().is_none_or(|seg| seg[n] == seg[m])
    }
}

/// Activations of one layer kept for the backward pass.
struct LayerCache<T> {
    x_in: Vec<T>,
    r1: Vec<T>,
    h1: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    lse: Vec<T>,
    attn: Vec<T>,
    x_mid: Vec<T>,
    r2: Vec<T>,
    h2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    act: Vec<T>,
}

/// What attention's backward pass reads: its inputs (after the rotary embedding), the saved
/// log-sum-exp and its output. Public, with the ops it feeds, as the GPU kernels' oracle.
#[derive(Clone, Copy)]
pub struct AttentionSaved<'a, T> {
    pub q: &'a [T],
    pub k: &'a [T],
    pub v: &'a [T],
    pub lse: &'a [T],
    pub out: &'a [T],
}

impl<'a, T> AttentionSaved<'a, T> {
    fn of(c: &'a LayerCache<T>) -> Self {
        AttentionSaved {
            q: &c.q,
            k: &c.k,
            v: &c.v,
            lse: &c.lse,
            out: &c.attn,
        }
    }
}

/// What the forward pass keeps: per layer caches, the last residual and the final norm.
struct Forward<T> {
    layers: Vec<LayerCache<T>>,
    x_last: Vec<T>,
    r_final: Vec<T>,
    h_final: Vec<T>,
}

/// Loss of one batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loss {
    /// Mean cross-entropy over the counted targets (0 when none counts).
    pub mean: f64,
    /// Targets counted.
    pub tokens: usize,
}

/// The CPU model.
pub struct CpuModel {
    pub config: LlamaConfig,
    /// The matrix products' implementation ([`Kernels::Reference`] unless set).
    pub kernels: Kernels,
}

impl CpuModel {
    pub fn new(config: LlamaConfig) -> Result<Self, String> {
        config.validate()?;
        Ok(CpuModel {
            config,
            kernels: Kernels::Reference,
        })
    }

    /// The mean loss of `batch`.
    pub fn loss<T: Scalar>(&self, params: &Params<T>, batch: &Batch) -> Loss {
        let fwd = self.forward(params, batch);
        self.head(params, batch, &fwd.h_final, None).0
    }

    /// Next-token logits `[rows * seq_len, vocab]` (for evaluation and parity checks; the
    /// training path never materialises them).
    pub fn logits<T: Scalar>(&self, params: &Params<T>, batch: &Batch) -> Vec<T> {
        let fwd = self.forward(params, batch);
        linear(
            self.kernels,
            &fwd.h_final,
            &params.embed,
            self.config.hidden_size,
            self.config.vocab_size,
        )
    }

    /// The mean loss and its gradient, **added** into `grads` (zero it, or accumulate).
    pub fn loss_and_grad<T: Scalar>(&self, params: &Params<T>, batch: &Batch, grads: &mut Params<T>) -> Loss {
        let fwd = self.forward(params, batch);
        let (loss, dh) = self.head(params, batch, &fwd.h_final, Some(&mut grads.embed));
        let d = self.config.hidden_size;
        let mut dx = rmsnorm_backward(&fwd.x_last, &fwd.r_final, &params.norm, &dh, &mut grads.norm, d);
        for (i, cache) in fwd.layers.iter().enumerate().rev() {
            dx = self.layer_backward(&params.layers[i], cache, batch, dx, &mut grads.layers[i]);
        }
        // The embedding lookup: scatter-add in position order (deterministic).
        for n in 0..batch.rows * batch.seq_len {
            let tok = batch.input(n);
            add_into(&mut grads.embed[tok * d..(tok + 1) * d], &dx[n * d..(n + 1) * d]);
        }
        loss
    }

    fn forward<T: Scalar>(&self, p: &Params<T>, batch: &Batch) -> Forward<T> {
        let d = self.config.hidden_size;
        let n = batch.rows * batch.seq_len;
        let mut x = vec![T::zero(); n * d];
        x.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let tok = batch.input(i);
            row.copy_from_slice(&p.embed[tok * d..(tok + 1) * d]);
        });
        let mut layers = Vec::with_capacity(p.layers.len());
        for layer in &p.layers {
            let (next, cache) = self.layer_forward(layer, batch, x);
            layers.push(cache);
            x = next;
        }
        let (h_final, r_final) = rmsnorm(&x, &p.norm, d, self.config.rms_norm_eps);
        Forward {
            layers,
            x_last: x,
            r_final,
            h_final,
        }
    }

    fn layer_forward<T: Scalar>(&self, l: &LayerParams<T>, batch: &Batch, x_in: Vec<T>) -> (Vec<T>, LayerCache<T>) {
        let cfg = &self.config;
        let (d, kv, f) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size);
        let (h1, r1) = rmsnorm(&x_in, &l.attn_norm, d, cfg.rms_norm_eps);
        let mut q = linear(self.kernels, &h1, &l.q, d, d);
        let mut k = linear(self.kernels, &h1, &l.k, d, kv);
        let v = linear(self.kernels, &h1, &l.v, d, kv);
        self.rope(&mut q, d, batch.seq_len, false);
        self.rope(&mut k, kv, batch.seq_len, false);
        let (attn, lse) = self.attention(&q, &k, &v, batch);
        let o = linear(self.kernels, &attn, &l.o, d, d);
        let x_mid: Vec<T> = x_in.iter().zip(&o).map(|(a, b)| *a + *b).collect();
        let (h2, r2) = rmsnorm(&x_mid, &l.mlp_norm, d, cfg.rms_norm_eps);
        let gate = linear(self.kernels, &h2, &l.gate, d, f);
        let up = linear(self.kernels, &h2, &l.up, d, f);
        let act: Vec<T> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * *u).collect();
        let down = linear(self.kernels, &act, &l.down, f, d);
        let x_out = x_mid.iter().zip(&down).map(|(a, b)| *a + *b).collect();
        let cache = LayerCache {
            x_in,
            r1,
            h1,
            q,
            k,
            v,
            lse,
            attn,
            x_mid,
            r2,
            h2,
            gate,
            up,
            act,
        };
        (x_out, cache)
    }

    fn layer_backward<T: Scalar>(
        &self,
        l: &LayerParams<T>,
        c: &LayerCache<T>,
        batch: &Batch,
        dx_out: Vec<T>,
        g: &mut LayerParams<T>,
    ) -> Vec<T> {
        let cfg = &self.config;
        let (d, kv, f) = (cfg.hidden_size, cfg.kv_dim(), cfg.intermediate_size);
        // MLP: x_out = x_mid + down(silu(gate) * up).
        let dact = linear_grad_input(self.kernels, &dx_out, &l.down, f, d);
        linear_grad_weight(self.kernels, &dx_out, &c.act, &mut g.down, f, d);
        let (dgate, dup): (Vec<T>, Vec<T>) = dact
            .iter()
            .zip(c.gate.iter().zip(&c.up))
            .map(|(da, (gt, u))| (*da * *u * silu_grad(*gt), *da * silu(*gt)))
            .unzip();
        let mut dh2 = linear_grad_input(self.kernels, &dgate, &l.gate, d, f);
        add_into(&mut dh2, &linear_grad_input(self.kernels, &dup, &l.up, d, f));
        linear_grad_weight(self.kernels, &dgate, &c.h2, &mut g.gate, d, f);
        linear_grad_weight(self.kernels, &dup, &c.h2, &mut g.up, d, f);
        let mut dx_mid = rmsnorm_backward(&c.x_mid, &c.r2, &l.mlp_norm, &dh2, &mut g.mlp_norm, d);
        add_into(&mut dx_mid, &dx_out);
        // Attention: x_mid = x_in + o(attention(rope(q), rope(k), v)).
        let dattn = linear_grad_input(self.kernels, &dx_mid, &l.o, d, d);
        linear_grad_weight(self.kernels, &dx_mid, &c.attn, &mut g.o, d, d);
        let (mut dq, mut dk, dv) = self.attention_backward(AttentionSaved::of(c), &dattn, batch);
        self.rope(&mut dq, d, batch.seq_len, true);
        self.rope(&mut dk, kv, batch.seq_len, true);
        let mut dh1 = linear_grad_input(self.kernels, &dq, &l.q, d, d);
        add_into(&mut dh1, &linear_grad_input(self.kernels, &dk, &l.k, d, kv));
        add_into(&mut dh1, &linear_grad_input(self.kernels, &dv, &l.v, d, kv));
        linear_grad_weight(self.kernels, &dq, &c.h1, &mut g.q, d, d);
        linear_grad_weight(self.kernels, &dk, &c.h1, &mut g.k, d, kv);
        linear_grad_weight(self.kernels, &dv, &c.h1, &mut g.v, d, kv);
        let mut dx_in = rmsnorm_backward(&c.x_in, &c.r1, &l.attn_norm, &dh1, &mut g.attn_norm, d);
        add_into(&mut dx_in, &dx_mid);
        dx_in
    }

    /// Rotary embedding in place on rows of `width` = heads x head_dim (Hugging Face's
    /// rotate-half layout, positions 0..seq_len within each row of the batch). `inverse`
    /// applies the transposed rotation (the backward pass).
    pub fn rope<T: Scalar>(&self, x: &mut [T], width: usize, seq_len: usize, inverse: bool) {
        let hd = self.config.head_dim();
        let half = hd / 2;
        let theta = self.config.rope_theta;
        x.par_chunks_mut(width).enumerate().for_each(|(n, row)| {
            let pos = (n % seq_len) as f64;
            for j in 0..half {
                let freq = theta.powf(-2.0 * j as f64 / hd as f64);
                let (sin, cos) = (pos * freq).sin_cos();
                let (sin, cos): (T, T) = (c(if inverse { -sin } else { sin }), c(cos));
                for head in row.chunks_mut(hd) {
                    let (a, b) = (head[j], head[j + half]);
                    head[j] = a * cos - b * sin;
                    head[j + half] = b * cos + a * sin;
                }
            }
        });
    }

    /// Causal (and, with segments, document-masked) grouped-query attention. Returns the output
    /// `[n, heads * head_dim]` and the log-sum-exp of every (position, head) row of scores.
    pub fn attention<T: Scalar>(&self, q: &[T], k: &[T], v: &[T], batch: &Batch) -> (Vec<T>, Vec<T>) {
        let cfg = &self.config;
        let (d, hd, heads, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_dim());
        let group = heads / cfg.num_key_value_heads;
        let scale: T = c(1.0 / (hd as f64).sqrt());
        let n_all = batch.rows * batch.seq_len;
        let mut out = vec![T::zero(); n_all * d];
        let mut lse = vec![T::zero(); n_all * heads];
        out.par_chunks_mut(d)
            .zip(lse.par_chunks_mut(heads))
            .enumerate()
            .for_each(|(n, (row, lse_row))| {
                let start = n - n % batch.seq_len;
                let mut scores = Vec::with_capacity(n - start + 1);
                for h in 0..heads {
                    let qh = &q[n * d + h * hd..n * d + (h + 1) * hd];
                    let kvh = (h / group) * hd;
                    scores.clear();
                    let mut max = T::neg_infinity();
                    for m in start..=n {
                        let s = if batch.visible(n, m) {
                            dot(qh, &k[m * kv + kvh..m * kv + kvh + hd]) * scale
                        } else {
                            T::neg_infinity()
                        };
                        max = max.max(s);
                        scores.push(s);
                    }
                    let sum: T = scores.iter().map(|s| (*s - max).exp()).sum();
                    let log_sum = max + sum.ln();
                    lse_row[h] = log_sum;
                    let o = &mut row[h * hd..(h + 1) * hd];
                    for (i, m) in (start..=n).enumerate() {
                        let p = (scores[i] - log_sum).exp();
                        if p > T::zero() {
                            axpy(o, p, &v[m * kv + kvh..m * kv + kvh + hd]);
                        }
                    }
                }
            });
        (out, lse)
    }

    /// Gradients of q, k and v (before the rotary embedding is undone) from the gradient of the
    /// attention output. Probabilities are recomputed from the saved log-sum-exp.
    pub fn attention_backward<T: Scalar>(
        &self,
        saved: AttentionSaved<'_, T>,
        dout: &[T],
        batch: &Batch,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let cfg = &self.config;
        let (d, hd, heads, kv) = (cfg.hidden_size, cfg.head_dim(), cfg.num_attention_heads, cfg.kv_dim());
        let group = heads / cfg.num_key_value_heads;
        let scale: T = c(1.0 / (hd as f64).sqrt());
        let AttentionSaved { q, k, v, lse, out } = saved;
        let n_all = batch.rows * batch.seq_len;
        let t_len = batch.seq_len;
        // delta[n, h] = dout . out (the softmax backward's row term).
        let delta: Vec<T> = (0..n_all * heads)
            .into_par_iter()
            .map(|i| {
                let (n, h) = (i / heads, i % heads);
                dot(
                    &dout[n * d + h * hd..n * d + (h + 1) * hd],
                    &out[n * d + h * hd..n * d + (h + 1) * hd],
                )
            })
            .collect();
        let prob = |n: usize, m: usize, h: usize| -> T {
            let kvh = (h / group) * hd;
            let s = dot(
                &q[n * d + h * hd..n * d + (h + 1) * hd],
                &k[m * kv + kvh..m * kv + kvh + hd],
            ) * scale;
            (s - lse[n * heads + h]).exp()
        };
        // dq: rows are independent.
        let mut dq = vec![T::zero(); n_all * d];
        dq.par_chunks_mut(d).enumerate().for_each(|(n, row)| {
            let start = n - n % t_len;
            for h in 0..heads {
                let kvh = (h / group) * hd;
                let dqh = &mut row[h * hd..(h + 1) * hd];
                let doh = &dout[n * d + h * hd..n * d + (h + 1) * hd];
                for m in start..=n {
                    if !batch.visible(n, m) {
                        continue;
                    }
                    let p = prob(n, m, h);
                    let dp = dot(doh, &v[m * kv + kvh..m * kv + kvh + hd]);
                    let ds = p * (dp - delta[n * heads + h]) * scale;
                    axpy(dqh, ds, &k[m * kv + kvh..m * kv + kvh + hd]);
                }
            }
        });
        // dk, dv: each key/value row gathers from the later positions of its row that see it.
        let mut dk = vec![T::zero(); n_all * kv];
        let mut dv = vec![T::zero(); n_all * kv];
        dk.par_chunks_mut(kv)
            .zip(dv.par_chunks_mut(kv))
            .enumerate()
            .for_each(|(m, (dk_row, dv_row))| {
                let end = m - m % t_len + t_len;
                for h in 0..heads {
                    let kvh = (h / group) * hd;
                    for n in m..end {
                        if !batch.visible(n, m) {
                            continue;
                        }
                        let p = prob(n, m, h);
                        let doh = &dout[n * d + h * hd..n * d + (h + 1) * hd];
                        let dp = dot(doh, &v[m * kv + kvh..m * kv + kvh + hd]);
                        let ds = p * (dp - delta[n * heads + h]) * scale;
                        axpy(&mut dk_row[kvh..kvh + hd], ds, &q[n * d + h * hd..n * d + (h + 1) * hd]);
                        axpy(&mut dv_row[kvh..kvh + hd], p, doh);
                    }
                }
            });
        (dq, dk, dv)
    }

    /// The tied output projection and the cross-entropy, in chunks of rows. With `grad_embed`,
    /// also returns the gradient of the final hidden states and adds the projection's gradient
    /// into the embedding's.
    fn head<T: Scalar>(
        &self,
        p: &Params<T>,
        batch: &Batch,
        h: &[T],
        mut grad_embed: Option<&mut Vec<T>>,
    ) -> (Loss, Vec<T>) {
        let (d, vocab) = (self.config.hidden_size, self.config.vocab_size);
        let n_all = batch.rows * batch.seq_len;
        let counted = (0..n_all).filter(|&n| batch.counts(n)).count();
        let mut dh = vec![T::zero(); if grad_embed.is_some() { n_all * d } else { 0 }];
        let mut total = 0f64;
        // Rows per vocabulary-projection chunk: blocked GEMM packs the whole embedding once per
        // chunk, so it takes bigger chunks (512 x 49153 logits: 100 MB in f32).
        let chunk = match self.kernels {
            Kernels::Reference => 64,
            Kernels::Blocked => 512,
        };
        for start in (0..n_all).step_by(chunk) {
            let rows = chunk.min(n_all - start);
            let mut logits = linear(self.kernels, &h[start * d..(start + rows) * d], &p.embed, d, vocab);
            let losses: Vec<f64> = logits
                .par_chunks_mut(vocab)
                .enumerate()
                .map(|(i, row)| {
                    let n = start + i;
                    let max = row.iter().fold(T::neg_infinity(), |a, b| a.max(*b));
                    let target = batch.target(n);
                    let target_logit = row[target];
                    // One exp per logit: the row becomes exp(x - max), then the softmax.
                    let mut sum = T::zero();
                    for x in row.iter_mut() {
                        *x = (*x - max).exp();
                        sum = sum + *x;
                    }
                    let log_sum = max + sum.ln();
                    let loss = (log_sum - target_logit).to_f64().expect("finite");
                    // Turn the row into d loss / d logits (softmax - one-hot) / counted.
                    let weight: T = if batch.counts(n) && counted > 0 {
                        c(1.0 / counted as f64)
                    } else {
                        T::zero()
                    };
                    let scale = weight / sum;
                    for x in row.iter_mut() {
                        *x = *x * scale;
                    }
                    row[target] = row[target] - weight;
                    if batch.counts(n) { loss } else { 0.0 }
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some(ge) = grad_embed.as_deref_mut() {
                let dh_chunk = linear_grad_input(self.kernels, &logits, &p.embed, d, vocab);
                dh[start * d..(start + rows) * d].copy_from_slice(&dh_chunk);
                linear_grad_weight(self.kernels, &logits, &h[start * d..(start + rows) * d], ge, d, vocab);
            }
        }
        let mean = if counted == 0 { 0.0 } else { total / counted as f64 };
        (Loss { mean, tokens: counted }, dh)
    }
}

pub fn silu<T: Scalar>(z: T) -> T {
    z / (T::one() + (-z).exp())
}

pub fn silu_grad<T: Scalar>(z: T) -> T {
    let s = T::one() / (T::one() + (-z).exp());
    s * (T::one() + z * (T::one() - s))
}

/// RMSNorm of rows of width `d`: returns the output and each row's `1 / rms`.
pub fn rmsnorm<T: Scalar>(x: &[T], g: &[T], d: usize, eps: f64) -> (Vec<T>, Vec<T>) {
    let mut y = vec![T::zero(); x.len()];
    let mut r = vec![T::zero(); x.len() / d];
    y.par_chunks_mut(d)
        .zip(r.par_iter_mut())
        .enumerate()
        .for_each(|(n, (row, rn))| {
            let xr = &x[n * d..(n + 1) * d];
            let ms = dot(xr, xr) / c(d as f64);
            *rn = T::one() / (ms + c(eps)).sqrt();
            for ((y, x), g) in row.iter_mut().zip(xr).zip(g) {
                *y = *x * *rn * *g;
            }
        });
    (y, r)
}

/// Backward of [`rmsnorm`]: returns dx, adds dg.
pub fn rmsnorm_backward<T: Scalar>(x: &[T], r: &[T], g: &[T], dy: &[T], dg: &mut [T], d: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(d).enumerate().for_each(|(n, row)| {
        let (xr, dyr, rn) = (&x[n * d..(n + 1) * d], &dy[n * d..(n + 1) * d], r[n]);
        // xhat = x * r; dx = r * (dy*g - xhat * mean(dy*g*xhat)).
        let mean: T = xr
            .iter()
            .zip(dyr)
            .zip(g)
            .map(|((x, dy), g)| *dy * *g * *x * rn)
            .sum::<T>()
            / c(d as f64);
        for (((dx, x), dy), g) in row.iter_mut().zip(xr).zip(dyr).zip(g) {
            *dx = rn * (*dy * *g - *x * rn * mean);
        }
    });
    for n in 0..x.len() / d {
        for i in 0..d {
            dg[i] = dg[i] + dy[n * d + i] * x[n * d + i] * r[n];
        }
    }
    dx
}

#[cfg(test)]
mod tests {
    use super::super::gemm::{reference_grad_input, reference_grad_weight, reference_linear};
    use super::*;

    fn batch(rows: usize, seq_len: usize, vocab: usize, seed: u64, documents: bool) -> Batch {
        let mut rng = crate::rng::Normal::new(seed);
        let tokens = (0..rows * (seq_len + 1))
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect();
        let segments = documents.then(|| (0..rows * seq_len).map(|n| ((n % seq_len) / 3) as u32).collect());
        let loss_mask = documents.then(|| (0..rows * seq_len).map(|n| n % 5 != 1).collect());
        Batch {
            rows,
            seq_len,
            tokens,
            segments,
            loss_mask,
        }
    }

    /// Central finite differences in f64 against the analytic gradient, for entries of every
    /// tensor: covers every op's backward (embedding, RMSNorm, q/k/v/o, RoPE, GQA attention with
    /// causal and document masks, SwiGLU, the tied head and the loss mask).
    #[test]
    fn gradients_match_finite_differences() {
        let cfg = LlamaConfig::preset("micro").unwrap();
        let model = CpuModel::new(cfg.clone()).unwrap();
        for documents in [false, true] {
            let params: Params<f64> = Params::<f32>::init(&cfg, 3).cast(&cfg);
            let b = batch(2, 7, cfg.vocab_size, 11, documents);
            let mut grads = Params::<f64>::zeros(&cfg);
            model.loss_and_grad(&params, &b, &mut grads);
            let mut rng = crate::rng::Normal::new(5);
            let names: Vec<(String, usize)> = params.tensors().iter().map(|(n, t, _)| (n.clone(), t.len())).collect();
            for (ti, (name, len)) in names.iter().enumerate() {
                for _ in 0..4 {
                    let i = (rng.next_u64() % *len as u64) as usize;
                    let eps = 1e-5;
                    let mut plus = params.clone();
                    plus.tensors_mut()[ti].1[i] += eps;
                    let mut minus = params.clone();
                    minus.tensors_mut()[ti].1[i] -= eps;
                    let numeric = (model.loss(&plus, &b).mean - model.loss(&minus, &b).mean) / (2.0 * eps);
                    let analytic = grads.tensors()[ti].1[i];
                    let tolerance = 1e-6 + 1e-4 * numeric.abs().max(analytic.abs());
                    assert!(
                        (numeric - analytic).abs() < tolerance,
                        "{name}[{i}] (documents {documents}): numeric {numeric} analytic {analytic}"
                    );
                }
            }
        }
    }

    fn random(n: usize, rng: &mut crate::rng::Normal) -> Vec<f64> {
        (0..n).map(|_| rng.sample()).collect()
    }

    /// Checks `grad` (the analytic gradient of `f` at `x`) against central differences.
    fn check(name: &str, x: &[f64], grad: &[f64], f: &dyn Fn(&[f64]) -> f64) {
        for i in 0..x.len() {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[i] += 1e-6;
            minus[i] -= 1e-6;
            let numeric = (f(&plus) - f(&minus)) / 2e-6;
            assert!(
                (numeric - grad[i]).abs() < 1e-6 + 1e-5 * numeric.abs(),
                "{name}[{i}]: numeric {numeric} analytic {}",
                grad[i]
            );
        }
    }

    /// Each op on its own: the scalar `sum(op(x) * r)` for a fixed random `r`, differentiated.
    #[test]
    fn every_op_matches_finite_differences() {
        let mut rng = crate::rng::Normal::new(17);
        let (n, d, out) = (3, 8, 5);
        let (x, w, g) = (random(n * d, &mut rng), random(out * d, &mut rng), random(d, &mut rng));
        let r_out = random(n * out, &mut rng);
        let r_d = random(n * d, &mut rng);
        let weigh = |y: &[f64], r: &[f64]| y.iter().zip(r).map(|(a, b)| a * b).sum::<f64>();
        // linear: d/dx and d/dw.
        let dx = reference_grad_input(&r_out, &w, d, out);
        check("linear x", &x, &dx, &|x| {
            weigh(&reference_linear(x, &w, d, out), &r_out)
        });
        let mut dw = vec![0.0; out * d];
        reference_grad_weight(&r_out, &x, &mut dw, d, out);
        check("linear w", &w, &dw, &|w| {
            weigh(&reference_linear(&x, w, d, out), &r_out)
        });
        // RMSNorm: d/dx and d/dg.
        let (_, r) = rmsnorm(&x, &g, d, 1e-5);
        let mut dg = vec![0.0; d];
        let dxn = rmsnorm_backward(&x, &r, &g, &r_d, &mut dg, d);
        check("rmsnorm x", &x, &dxn, &|x| weigh(&rmsnorm(x, &g, d, 1e-5).0, &r_d));
        check("rmsnorm g", &g, &dg, &|g| weigh(&rmsnorm(&x, g, d, 1e-5).0, &r_d));
        // SiLU.
        let z: Vec<f64> = random(6, &mut rng);
        let dz: Vec<f64> = z.iter().map(|z| silu_grad(*z)).collect();
        check("silu", &z, &dz, &|z| z.iter().map(|z| silu(*z)).sum());
        // RoPE: the backward is the transposed rotation.
        let cfg = LlamaConfig::preset("micro").unwrap();
        let model = CpuModel::new(cfg.clone()).unwrap();
        let (seq, width) = (5, cfg.hidden_size);
        let q = random(seq * width, &mut rng);
        let rq = random(seq * width, &mut rng);
        let mut dq = rq.clone();
        model.rope(&mut dq, width, seq, true);
        let rotated = |q: &[f64]| {
            let mut q = q.to_vec();
            model.rope(&mut q, width, seq, false);
            weigh(&q, &rq)
        };
        check("rope", &q, &dq, &rotated);
        // Attention (GQA, causal + documents): d/dq, d/dk, d/dv through the saved log-sum-exp.
        let kv = cfg.kv_dim();
        let b = Batch {
            rows: 1,
            seq_len: seq,
            tokens: vec![0; seq + 1],
            segments: Some(vec![0, 0, 0, 1, 1]),
            loss_mask: None,
        };
        let (k, v) = (random(seq * kv, &mut rng), random(seq * kv, &mut rng));
        let (attn, lse) = model.attention(&q, &k, &v, &b);
        let cache = LayerCache {
            x_in: vec![],
            r1: vec![],
            h1: vec![],
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            lse,
            attn,
            x_mid: vec![],
            r2: vec![],
            h2: vec![],
            gate: vec![],
            up: vec![],
            act: vec![],
        };
        let (gq, gk, gv) = model.attention_backward(AttentionSaved::of(&cache), &rq, &b);
        check("attention q", &q, &gq, &|q| {
            weigh(&model.attention(q, &k, &v, &b).0, &rq)
        });
        check("attention k", &k, &gk, &|k| {
            weigh(&model.attention(&q, k, &v, &b).0, &rq)
        });
        check("attention v", &v, &gv, &|v| {
            weigh(&model.attention(&q, &k, v, &b).0, &rq)
        });
    }

    /// The whole model with blocked kernels: the reference's loss and gradients (f64, to
    /// rounding), on a shape whose vocabulary projection takes the column split.
    #[test]
    fn blocked_kernels_give_the_reference_loss_and_gradients() {
        let cfg = LlamaConfig {
            vocab_size: 3000,
            ..LlamaConfig::preset("micro").unwrap()
        };
        let mut reference = CpuModel::new(cfg.clone()).unwrap();
        let p = Params::<f64>::init(&cfg, 4);
        let b = batch(3, 17, cfg.vocab_size, 5, true);
        let mut g_ref = Params::<f64>::zeros(&cfg);
        let l_ref = reference.loss_and_grad(&p, &b, &mut g_ref);
        reference.kernels = Kernels::Blocked;
        let mut g_blk = Params::<f64>::zeros(&cfg);
        let l_blk = reference.loss_and_grad(&p, &b, &mut g_blk);
        assert!(
            (l_ref.mean - l_blk.mean).abs() < 1e-12,
            "{} vs {}",
            l_ref.mean,
            l_blk.mean
        );
        for ((name, a, _), (_, b, _)) in g_ref.tensors().into_iter().zip(g_blk.tensors()) {
            let scale = a.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-10 * scale, "{name}: {x} vs {y}");
            }
        }
    }

    #[test]
    fn loss_starts_near_log_vocab_and_f32_matches_f64() {
        let cfg = LlamaConfig::preset("micro").unwrap();
        let model = CpuModel::new(cfg.clone()).unwrap();
        let p32 = Params::<f32>::init(&cfg, 1);
        let b = batch(3, 9, cfg.vocab_size, 2, false);
        let l32 = model.loss(&p32, &b);
        let l64 = model.loss(&p32.cast::<f64>(&cfg), &b);
        assert_eq!(l32.tokens, 27);
        assert!((l32.mean - (cfg.vocab_size as f64).ln()).abs() < 0.1, "{l32:?}");
        assert!((l32.mean - l64.mean).abs() < 1e-5, "{l32:?} {l64:?}");
    }
}
