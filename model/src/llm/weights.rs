//! The weights of the one Llama forward ([`super::engine`]), whatever file they came from: a
//! GGUF's quantised blocks ([`super::load_gguf`]) or a Hugging Face safetensors checkpoint in
//! f32 (or quantised to Q8_0 at load; [`super::checkpoint`]).
//!
//! RoPE in the forward rotates adjacent pairs (GGUF's convention): a loader of rotate-half
//! weights (Hugging Face) permutes the rows of Q and K within each head so the two agree.

use super::quant::{QActivations, QMatrix};
use rayon::prelude::*;

/// A `rows x cols` weight matrix (`out[r][o] = sum_c x[r][c] * w[o][c]`).
#[derive(Debug, Clone)]
pub enum Matrix {
    /// Quantised blocks: activations are quantised per row (Q8_1) and products run on integers.
    Quantized(QMatrix),
    /// Plain f32, row-major: every product is one fixed-order f32 dot product.
    Dense { rows: usize, cols: usize, w: Vec<f32> },
}

impl Matrix {
    pub fn rows(&self) -> usize {
        match self {
            Matrix::Quantized(q) => q.rows,
            Matrix::Dense { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            Matrix::Quantized(q) => q.cols,
            Matrix::Dense { cols, .. } => *cols,
        }
    }

    /// Row `row` as f32 values (the embedding lookup).
    pub fn row(&self, row: usize, out: &mut [f32]) {
        match self {
            Matrix::Quantized(q) => q.dequantize_row(row, out),
            Matrix::Dense { cols, w, .. } => out.copy_from_slice(&w[row * cols..(row + 1) * cols]),
        }
    }

    /// `out = x W^T` for the row-major activation rows of `x`; `out` is `rows(x) x
    /// self.rows()`, row-major. Rows never influence each other: a row's result is the same in
    /// any batch.
    pub fn matmul(&self, x: &Input<'_>, out: &mut [f32]) {
        if x.values.is_empty() {
            return;
        }
        match self {
            Matrix::Quantized(q) => q.matmul(x.quantized(q.cols), out),
            Matrix::Dense { rows, cols, w } => dense_matmul(w, *rows, *cols, x.values, out),
        }
    }
}

/// Activation rows fed to one or more matrices: quantised (per row, Q8_1) once, on first use
/// by a quantised matrix, and shared by the others (Q, K and V read the same input).
pub struct Input<'a> {
    values: &'a [f32],
    quantized: std::sync::OnceLock<QActivations>,
}

impl<'a> Input<'a> {
    pub fn new(values: &'a [f32]) -> Input<'a> {
        Input {
            values,
            quantized: std::sync::OnceLock::new(),
        }
    }

    fn quantized(&self, cols: usize) -> &QActivations {
        self.quantized.get_or_init(|| QActivations::quantize(self.values, cols))
    }
}

/// Dense `out = x W^T`: each task takes a run of weight rows and streams each row once for all
/// activation rows (the weights dominate the memory traffic when decoding a few rows).
fn dense_matmul(w: &[f32], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
    let n = x.len() / cols;
    assert_eq!(out.len(), n * rows, "output size");
    let chunk = (rows / (rayon::current_num_threads() * 4)).clamp(8, 512);
    let mut transposed = vec![0f32; rows * n];
    transposed
        .par_chunks_mut(chunk * n)
        .enumerate()
        .for_each(|(task, part)| {
            for (k, column) in part.chunks_exact_mut(n).enumerate() {
                let o = task * chunk + k;
                let wo = &w[o * cols..(o + 1) * cols];
                for (r, y) in column.iter_mut().enumerate() {
                    *y = dot(&x[r * cols..(r + 1) * cols], wo);
                }
            }
        });
    for (o, column) in transposed.chunks_exact(n).enumerate() {
        for (r, &v) in column.iter().enumerate() {
            out[r * rows + o] = v;
        }
    }
}

/// A dot product with eight partial sums: a fixed order the compiler can vectorise.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub q: Matrix,
    pub k: Matrix,
    pub v: Matrix,
    pub o: Matrix,
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

/// Every weight of a model.
#[derive(Debug, Clone)]
pub struct Weights {
    pub embed: Matrix,
    /// The output projection when not tied to the embedding.
    pub output: Option<Matrix>,
    pub norm: Vec<f32>,
    pub layers: Vec<Layer>,
}

/// Reorders the rows of a rotate-half Q or K projection (`[heads * head_dim, cols]`, Hugging
/// Face) for adjacent-pair RoPE: in each head, row `i` moves to `2i` and row `i + head_dim / 2`
/// to `2i + 1`. Q and K get the same order, so their dot products are unchanged.
pub fn interleave_rope_rows(w: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; w.len()];
    for (src, dst) in w
        .chunks_exact(head_dim * cols)
        .zip(out.chunks_exact_mut(head_dim * cols))
    {
        for i in 0..half {
            dst[2 * i * cols..(2 * i + 1) * cols].copy_from_slice(&src[i * cols..(i + 1) * cols]);
            dst[(2 * i + 1) * cols..(2 * i + 2) * cols].copy_from_slice(&src[(i + half) * cols..(i + half + 1) * cols]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_products_are_row_independent_and_equal_plain_sums() {
        let (rows, cols) = (37, 19);
        let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
        let x: Vec<f32> = (0..5 * cols).map(|i| ((i * 17 % 89) as f32 - 44.0) / 40.0).collect();
        let m = Matrix::Dense {
            rows,
            cols,
            w: w.clone(),
        };
        let mut all = vec![0f32; 5 * rows];
        m.matmul(&Input::new(&x), &mut all);
        for r in 0..5 {
            let mut one = vec![0f32; rows];
            m.matmul(&Input::new(&x[r * cols..(r + 1) * cols]), &mut one);
            assert_eq!(&all[r * rows..(r + 1) * rows], &one[..], "row {r} depends on the batch");
            for o in 0..rows {
                let plain: f32 = (0..cols).map(|c| x[r * cols + c] * w[o * cols + c]).sum();
                assert!((one[o] - plain).abs() < 1e-5, "{o}: {} vs {plain}", one[o]);
            }
        }
    }

    #[test]
    fn interleaving_pairs_each_row_with_its_rotate_half_partner() {
        // Two heads of dimension 4, one column: rows 0..8 hold their own index.
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(
            interleave_rope_rows(&w, 4, 1),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }
}
