//! The three matrix products of the CPU backend, in two implementations:
//!
//! - **reference**: plain loops, every output element one fixed-order dot product (or sum of
//!   fixed parts): machine-independent and the oracle;
//! - **blocked**: cache-blocked SIMD GEMM from the `matrixmultiply` crate (`sgemm` / `dgemm`),
//!   the output split into fixed blocks across rayon's threads. An element's sum runs in the
//!   crate's fixed k-blocking whatever the split, so results are deterministic and do not depend
//!   on the thread count (bit-exact `--resume` holds), but they depend on the CPU's instruction
//!   set and differ from the reference by float rounding (tests bound it).
//!
//! Shapes follow Hugging Face: a weight `w` is `[out, inp]`, row-major.

use super::cpu::Scalar;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Which implementation the CPU backend's matrix products use (`train.kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Plain loops: exact, machine-independent, slow.
    #[default]
    Reference,
    /// Blocked SIMD GEMM (`matrixmultiply`): several times faster, deterministic per machine.
    Blocked,
}

impl Kernels {
    pub fn parse(name: &str) -> Result<Kernels, String> {
        match name {
            "reference" => Ok(Kernels::Reference),
            "blocked" => Ok(Kernels::Blocked),
            other => Err(format!("kernels {other:?}: expected \"blocked\" or \"reference\"")),
        }
    }
}

/// `y[n, o] = sum_i x[n, i] w[o, i]` for `x: [n, inp]`, `w: [out, inp]`.
pub fn linear<T: Scalar>(k: Kernels, x: &[T], w: &[T], inp: usize, out: usize) -> Vec<T> {
    match k {
        Kernels::Reference => reference_linear(x, w, inp, out),
        Kernels::Blocked => {
            let n = x.len() / inp;
            let mut y = vec![T::zero(); n * out];
            // A = x (n x inp), B = w^T (inp x out): B[i][o] = w[o * inp + i].
            par_gemm(n, inp, out, x, inp, 1, w, 1, inp, &mut y, Layout::RowMajor, false);
            y
        }
    }
}

/// `dx[n, i] = sum_o dy[n, o] w[o, i]`.
pub fn linear_grad_input<T: Scalar>(k: Kernels, dy: &[T], w: &[T], inp: usize, out: usize) -> Vec<T> {
    match k {
        Kernels::Reference => reference_grad_input(dy, w, inp, out),
        Kernels::Blocked => {
            let n = dy.len() / out;
            let mut dx = vec![T::zero(); n * inp];
            // A = dy (n x out), B = w (out x inp).
            par_gemm(n, out, inp, dy, out, 1, w, inp, 1, &mut dx, Layout::RowMajor, false);
            dx
        }
    }
}

/// `dw[o, i] += sum_n dy[n, o] x[n, i]`.
pub fn linear_grad_weight<T: Scalar>(k: Kernels, dy: &[T], x: &[T], dw: &mut [T], inp: usize, out: usize) {
    match k {
        Kernels::Reference => reference_grad_weight(dy, x, dw, inp, out),
        Kernels::Blocked => {
            let n = dy.len() / out;
            // dw^T (inp x out) += x^T dy: A = x^T (A[i][r] = x[r * inp + i]), B = dy (n x out),
            // both packed from contiguous rows (packing dy^T would read it across rows);
            // element (i, o) of the product is dw[o * inp + i].
            par_gemm(inp, n, out, x, 1, inp, dy, out, 1, dw, Layout::Transposed, true);
        }
    }
}

/// A raw pointer that may cross to rayon's threads: each task writes its own disjoint block.
#[derive(Clone, Copy)]
struct Shared<T>(*mut T);
// SAFETY: the pointer is only used for disjoint blocks of one buffer that outlives the tasks.
#[allow(unsafe_code)]
unsafe impl<T> Send for Shared<T> {}
#[allow(unsafe_code)]
unsafe impl<T> Sync for Shared<T> {}

/// Output elements per task at least (smaller products run as one call).
const MIN_TASK: usize = 64 * 64;

/// How the `m x n` product lies in its buffer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Element (i, j) at `i * n + j`.
    RowMajor,
    /// Element (i, j) at `j * m + i`.
    Transposed,
}

/// `c = a b` (`+ c` when `accumulate`) for the `m x n` product laid out as `layout`, with
/// `a[i][l] = a[i * rsa + l * csa]` and `b[l][j] = b[l * rsb + j * csb]`. The larger of the
/// product's dimensions is cut into fixed blocks, one task each.
#[allow(clippy::too_many_arguments)]
fn par_gemm<T: Scalar>(
    m: usize,
    k: usize,
    n: usize,
    a: &[T],
    rsa: usize,
    csa: usize,
    b: &[T],
    rsb: usize,
    csb: usize,
    c: &mut [T],
    layout: Layout,
    accumulate: bool,
) {
    assert_eq!(c.len(), m * n, "output size");
    let (rsc, csc) = match layout {
        Layout::RowMajor => (n, 1),
        Layout::Transposed => (1, m),
    };
    if m == 0 || n == 0 {
        return;
    }
    assert!(k == 0 || (a.len() > (m - 1) * rsa + (k - 1) * csa && b.len() > (k - 1) * rsb + (n - 1) * csb));
    let beta = if accumulate { T::one() } else { T::zero() };
    let tasks = (m * n / MIN_TASK).clamp(1, rayon::current_num_threads() * 4);
    let by_rows = m >= n;
    let span = if by_rows { m } else { n };
    let block = span.div_ceil(tasks);
    let (pa, pb, pc) = (
        Shared(a.as_ptr() as *mut T),
        Shared(b.as_ptr() as *mut T),
        Shared(c.as_mut_ptr()),
    );
    (0..span.div_ceil(block)).into_par_iter().for_each(move |t| {
        let (pa, pb, pc) = (pa, pb, pc);
        let start = t * block;
        let len = block.min(span - start);
        #[allow(unsafe_code)]
        // SAFETY: the bounds were checked above for the whole product (`c` holds m x n elements
        // under either layout); this task reads rows (or columns) start..start+len of a (or b)
        // and writes only those rows (columns) of the product, which no other task touches; `c`
        // is exclusively borrowed for the call.
        unsafe {
            if by_rows {
                T::gemm(
                    len,
                    k,
                    n,
                    pa.0.add(start * rsa),
                    rsa,
                    csa,
                    pb.0,
                    rsb,
                    csb,
                    beta,
                    pc.0.add(start * rsc),
                    rsc,
                    csc,
                );
            } else {
                T::gemm(
                    m,
                    k,
                    len,
                    pa.0,
                    rsa,
                    csa,
                    pb.0.add(start * csb),
                    rsb,
                    csb,
                    beta,
                    pc.0.add(start * csc),
                    rsc,
                    csc,
                );
            }
        }
    });
}

// ---- The reference implementation.

/// Weights above this many elements are streamed once per call instead of once per row (the
/// vocabulary projection: 49153 x d).
const LARGE_WEIGHT: usize = 1 << 20;
/// Fixed split of the output dimension for the large-weight input gradient: partial sums are
/// added in this order, so results do not depend on the number of threads.
const SPLITS: usize = 16;
/// Row counts up to which the split input gradient is used.
const SMALL_ROWS: usize = 256;

/// `y[n, o] = sum_i x[n, i] w[o, i]` for `x: [n, inp]`, `w: [out, inp]`.
pub fn reference_linear<T: Scalar>(x: &[T], w: &[T], inp: usize, out: usize) -> Vec<T> {
    let n = x.len() / inp;
    let mut y = vec![T::zero(); n * out];
    if w.len() >= LARGE_WEIGHT {
        // Stream each weight row once for all rows of x: compute y transposed, then transpose.
        let mut yt = vec![T::zero(); out * n];
        yt.par_chunks_mut(n).enumerate().for_each(|(o, col)| {
            let wo = &w[o * inp..(o + 1) * inp];
            for (r, y) in col.iter_mut().enumerate() {
                *y = dot(&x[r * inp..(r + 1) * inp], wo);
            }
        });
        y.par_chunks_mut(out).enumerate().for_each(|(r, row)| {
            for (o, y) in row.iter_mut().enumerate() {
                *y = yt[o * n + r];
            }
        });
        return y;
    }
    y.par_chunks_mut(out).enumerate().for_each(|(r, row)| {
        let xr = &x[r * inp..(r + 1) * inp];
        for (o, y) in row.iter_mut().enumerate() {
            *y = dot(xr, &w[o * inp..(o + 1) * inp]);
        }
    });
    y
}

/// `dx[n, i] = sum_o dy[n, o] w[o, i]`.
pub fn reference_grad_input<T: Scalar>(dy: &[T], w: &[T], inp: usize, out: usize) -> Vec<T> {
    let n = dy.len() / out;
    // Only for few rows (the head's chunks): the parts cost SPLITS x n x inp memory.
    if w.len() >= LARGE_WEIGHT && n <= SMALL_ROWS {
        // Split the sum over o into fixed parts (each streams its weight rows once), then add
        // the parts in order.
        let part = out.div_ceil(SPLITS);
        let partials: Vec<Vec<T>> = (0..SPLITS)
            .into_par_iter()
            .map(|s| {
                let mut acc = vec![T::zero(); n * inp];
                for o in (s * part)..((s + 1) * part).min(out) {
                    let wo = &w[o * inp..(o + 1) * inp];
                    for r in 0..n {
                        let g = dy[r * out + o];
                        if g != T::zero() {
                            axpy(&mut acc[r * inp..(r + 1) * inp], g, wo);
                        }
                    }
                }
                acc
            })
            .collect();
        let mut dx = vec![T::zero(); n * inp];
        for p in &partials {
            add_into(&mut dx, p);
        }
        return dx;
    }
    let mut dx = vec![T::zero(); n * inp];
    dx.par_chunks_mut(inp).enumerate().for_each(|(r, row)| {
        for (o, g) in dy[r * out..(r + 1) * out].iter().enumerate() {
            if *g != T::zero() {
                axpy(row, *g, &w[o * inp..(o + 1) * inp]);
            }
        }
    });
    dx
}

/// `dw[o, i] += sum_n dy[n, o] x[n, i]` (rows of `dw` in parallel, positions in order).
pub fn reference_grad_weight<T: Scalar>(dy: &[T], x: &[T], dw: &mut [T], inp: usize, out: usize) {
    let n = dy.len() / out;
    dw.par_chunks_mut(inp).enumerate().for_each(|(o, row)| {
        for r in 0..n {
            let g = dy[r * out + o];
            if g != T::zero() {
                axpy(row, g, &x[r * inp..(r + 1) * inp]);
            }
        }
    });
}

pub(super) fn dot<T: Scalar>(a: &[T], b: &[T]) -> T {
    a.iter().zip(b).fold(T::zero(), |acc, (x, y)| acc + *x * *y)
}

pub(super) fn axpy<T: Scalar>(y: &mut [T], a: T, x: &[T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = *y + a * *x;
    }
}

pub(super) fn add_into<T: Scalar>(y: &mut [T], x: &[T]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = *y + *x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values<T: Scalar>(n: usize, seed: usize) -> Vec<T> {
        (0..n)
            .map(|i| T::from(((i * 7919 + seed * 104_729) % 2003) as f64 / 1001.0 - 1.0).unwrap())
            .collect()
    }

    fn worst<T: Scalar>(a: &[T], b: &[T]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x - *y).abs().to_f64().unwrap())
            .fold(0.0, f64::max)
    }

    /// Blocked products equal the reference to float rounding, for shapes that take every split
    /// (by rows, by columns, one task) and odd sizes.
    fn blocked_matches_reference<T: Scalar>(tolerance: f64) {
        for (n, inp, out) in [(3, 5, 7), (200, 64, 172), (4, 64, 20_000), (130, 96, 33)] {
            let x: Vec<T> = values(n * inp, 1);
            let w: Vec<T> = values(out * inp, 2);
            let dy: Vec<T> = values(n * out, 3);
            let scale = inp.max(out).max(n) as f64;
            let y = (
                linear(Kernels::Blocked, &x, &w, inp, out),
                linear(Kernels::Reference, &x, &w, inp, out),
            );
            assert!(worst(&y.0, &y.1) < tolerance * scale, "linear {n}x{inp}x{out}");
            let dx = (
                linear_grad_input(Kernels::Blocked, &dy, &w, inp, out),
                linear_grad_input(Kernels::Reference, &dy, &w, inp, out),
            );
            assert!(worst(&dx.0, &dx.1) < tolerance * scale, "grad input {n}x{inp}x{out}");
            let mut dw = (values::<T>(out * inp, 4), values::<T>(out * inp, 4));
            linear_grad_weight(Kernels::Blocked, &dy, &x, &mut dw.0, inp, out);
            linear_grad_weight(Kernels::Reference, &dy, &x, &mut dw.1, inp, out);
            assert!(worst(&dw.0, &dw.1) < tolerance * scale, "grad weight {n}x{inp}x{out}");
        }
    }

    #[test]
    fn large_weight_paths_match_plain_loops() {
        let (n, inp, out) = (5, 64, LARGE_WEIGHT / 64);
        let mut rng = crate::rng::Normal::new(9);
        let x: Vec<f64> = (0..n * inp).map(|_| rng.sample()).collect();
        let w: Vec<f64> = (0..out * inp).map(|_| rng.sample()).collect();
        let dy: Vec<f64> = (0..n * out).map(|_| rng.sample()).collect();
        let y = reference_linear(&x, &w, inp, out);
        let dx = reference_grad_input(&dy, &w, inp, out);
        for r in 0..n {
            for o in (0..out).step_by(997) {
                assert_eq!(
                    y[r * out + o],
                    dot(&x[r * inp..(r + 1) * inp], &w[o * inp..(o + 1) * inp])
                );
            }
            for i in 0..inp {
                let expected: f64 = (0..out).map(|o| dy[r * out + o] * w[o * inp + i]).sum();
                assert!(
                    (dx[r * inp + i] - expected).abs() < 1e-9 * out as f64,
                    "{} {expected}",
                    dx[r * inp + i]
                );
            }
        }
    }

    #[test]
    fn blocked_products_match_the_reference() {
        blocked_matches_reference::<f32>(1e-5);
        blocked_matches_reference::<f64>(1e-13);
    }

    #[test]
    fn blocked_products_do_not_depend_on_the_thread_count() {
        let (n, inp, out) = (96, 64, 3000);
        let x: Vec<f32> = values(n * inp, 5);
        let w: Vec<f32> = values(out * inp, 6);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let y = linear(Kernels::Blocked, &x, &w, inp, out);
                let dx = linear_grad_input(Kernels::Blocked, &y, &w, inp, out);
                let mut dw = vec![0f32; out * inp];
                linear_grad_weight(Kernels::Blocked, &y, &x, &mut dw, inp, out);
                (y, dx, dw)
            })
        };
        assert_eq!(run(1), run(3));
    }
}
