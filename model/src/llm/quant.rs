//! Quantised weight matrices (ggml's Q4_1 and Q8_0 block formats) and their products with
//! activations quantised to 8 bits per 32-value block, in safe Rust the compiler vectorises.
//!
//! A weight matrix has `rows` output rows of `cols` inputs, stored row-major in blocks of 32
//! along a row, as in the GGUF file. Activations are quantised per block like ggml's Q8_1 (a
//! scale, 32 `i8`s and the block's scaled sum), so `Q4_1 x Q8_1` and `Q8_0 x Q8_1` dot products
//! are integer sums times two scales: the same arithmetic llama.cpp does on the CPU.
//!
//! Every output element is computed by one thread in a fixed order, so a row's result does not
//! depend on the other rows of the batch or on the thread count.

use rayon::prelude::*;

/// Values per quantisation block.
pub const BLOCK: usize = 32;

/// ggml type ids this engine reads.
pub const GGML_F32: u32 = 0;
pub const GGML_F16: u32 = 1;
pub const GGML_Q4_1: u32 = 3;
pub const GGML_Q8_0: u32 = 8;

/// IEEE half to single precision.
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    let value = match (exponent, mantissa) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let shift = m.leading_zeros() - 21;
            let m = (m << shift) & 0x3ff;
            sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(value)
}

/// A quantised `rows x cols` weight matrix: per 32-value block a scale `d`, for Q4_1 a minimum
/// `m` and 16 bytes of nibbles (weight = d * q + m, q in 0..16; value j in the low nibble of
/// byte j, value j + 16 in its high nibble), for Q8_0 32 signed bytes (weight = d * q).
#[derive(Debug, Clone)]
pub struct QMatrix {
    pub rows: usize,
    pub cols: usize,
    d: Vec<f32>,
    blocks: Blocks,
}

#[derive(Debug, Clone)]
enum Blocks {
    Q4_1 { m: Vec<f32>, q: Vec<[u8; 16]> },
    Q8_0 { q: Vec<[i8; 32]> },
}

impl QMatrix {
    /// Parses ggml block data of type `kind` (Q4_1 or Q8_0) for a `rows x cols` matrix.
    pub fn from_ggml(kind: u32, rows: usize, cols: usize, data: &[u8]) -> Result<QMatrix, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!("{cols} columns is not a multiple of {BLOCK}"));
        }
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| format!("{rows} x {cols} values do not fit in memory"))?
            / BLOCK;
        // The `n` blocks of `bytes` each, checked against the data before anything is allocated.
        let blocks_of = |bytes: usize| {
            n.checked_mul(bytes)
                .and_then(|len| data.get(..len))
                .ok_or("the tensor data is truncated")
        };
        let half = |b: &[u8]| f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        let mut d = Vec::new();
        let blocks = match kind {
            GGML_Q4_1 => {
                let data = blocks_of(20)?;
                d.reserve_exact(n);
                let (mut m, mut q) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for block in data.chunks_exact(20) {
                    d.push(half(&block[0..2]));
                    m.push(half(&block[2..4]));
                    // cannot fail: chunks_exact(20) yields 20-byte blocks.
                    q.push(block[4..20].try_into().expect("16 bytes"));
                }
                Blocks::Q4_1 { m, q }
            }
            GGML_Q8_0 => {
                let data = blocks_of(34)?;
                d.reserve_exact(n);
                let mut q = Vec::with_capacity(n);
                for block in data.chunks_exact(34) {
                    d.push(half(&block[0..2]));
                    q.push(std::array::from_fn(|j| block[2 + j] as i8));
                }
                Blocks::Q8_0 { q }
            }
            other => return Err(format!("ggml type {other} is not supported (Q4_1 and Q8_0 are)")),
        };
        Ok(QMatrix { rows, cols, d, blocks })
    }

    /// Quantises a row-major `rows x cols` f32 matrix to Q8_0 (per 32-value block, scale
    /// `max |w| / 127` kept in f32, values rounded to the nearest step).
    pub fn quantize_q8_0(rows: usize, cols: usize, w: &[f32]) -> Result<QMatrix, String> {
        if !cols.is_multiple_of(BLOCK) {
            return Err(format!(
                "{cols} columns is not a multiple of {BLOCK}: Q8_0 needs whole blocks"
            ));
        }
        if rows.checked_mul(cols) != Some(w.len()) {
            return Err(format!("{} values are not {rows} x {cols}", w.len()));
        }
        let mut d = Vec::with_capacity(w.len() / BLOCK);
        let mut q = Vec::with_capacity(w.len() / BLOCK);
        for block in w.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            d.push(scale);
            q.push(std::array::from_fn(|j| {
                (block[j] * inverse).round().clamp(-127.0, 127.0) as i8
            }));
        }
        Ok(QMatrix {
            rows,
            cols,
            d,
            blocks: Blocks::Q8_0 { q },
        })
    }

    /// Row `row` as f32 values (the embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        let per_row = self.cols / BLOCK;
        for (b, out) in out.chunks_exact_mut(BLOCK).enumerate() {
            let i = row * per_row + b;
            let d = self.d[i];
            match &self.blocks {
                Blocks::Q4_1 { m, q } => {
                    for j in 0..16 {
                        out[j] = d * f32::from(q[i][j] & 15) + m[i];
                        out[j + 16] = d * f32::from(q[i][j] >> 4) + m[i];
                    }
                }
                Blocks::Q8_0 { q } => {
                    for (o, &v) in out.iter_mut().zip(&q[i]) {
                        *o = d * f32::from(v);
                    }
                }
            }
        }
    }

    /// `out[r][o] = sum_c x[r][c] * w[o][c]` for the quantised activation rows `x`; `out` is
    /// `x.rows x self.rows`, row-major. Work is split over output rows across rayon's pool.
    pub fn matmul(&self, x: &QActivations, out: &mut [f32]) {
        assert_eq!(x.cols, self.cols, "activation width");
        assert_eq!(out.len(), x.rows * self.rows, "output size");
        let per_row = self.cols / BLOCK;
        // Output rows per task: enough work to amortise scheduling, enough tasks for all cores.
        let chunk = (self.rows / (rayon::current_num_threads() * 4)).clamp(8, 512);
        let mut transposed = vec![0f32; out.len()];
        transposed
            .par_chunks_mut(chunk * x.rows)
            .enumerate()
            .for_each(|(task, out)| {
                for (k, column) in out.chunks_exact_mut(x.rows).enumerate() {
                    let o = task * chunk + k;
                    let w = o * per_row..(o + 1) * per_row;
                    let d = &self.d[w.clone()];
                    let row = match &self.blocks {
                        Blocks::Q4_1 { m, q } => Row::Q4_1(d, &m[w.clone()], &q[w]),
                        Blocks::Q8_0 { q } => Row::Q8_0(d, &q[w]),
                    };
                    column_dot(&row, x, column);
                }
            });
        if x.rows == 1 {
            out.copy_from_slice(&transposed);
            return;
        }
        for (o, column) in transposed.chunks_exact(x.rows).enumerate() {
            for (r, &v) in column.iter().enumerate() {
                out[r * self.rows + o] = v;
            }
        }
    }
}

/// One weight row's blocks: scales, (minimums,) quants.
enum Row<'a> {
    Q4_1(&'a [f32], &'a [f32], &'a [[u8; 16]]),
    Q8_0(&'a [f32], &'a [[i8; 32]]),
}

/// `out[r] = w . x[r]` for every activation row: the AVX2 kernels when the CPU has AVX2 and
/// FMA, else portable code (the two agree to float rounding).
#[inline]
fn column_dot(w: &Row<'_>, x: &QActivations, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX512 && w.blocks().is_multiple_of(2) {
        #[allow(unsafe_code)]
        // SAFETY: the kernels need AVX-512 F/BW, AVX2 and FMA, which the running CPU has
        // (checked once at run time).
        unsafe {
            match *w {
                Row::Q4_1(d, m, q) => avx512::column_dot(d, Some(m), q, x, out),
                Row::Q8_0(d, q) => avx512::column_dot(d, None, q, x, out),
            }
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if *HAS_AVX2 {
        #[allow(unsafe_code)]
        // SAFETY: the kernels need AVX2 and FMA, which the running CPU has (checked once at run
        // time).
        unsafe {
            match *w {
                Row::Q4_1(d, m, q) => avx2::column_dot(d, Some(m), q, x, out),
                Row::Q8_0(d, q) => avx2::column_dot(d, None, q, x, out),
            }
        };
        return;
    }
    column_dot_portable(w, x, out)
}

#[cfg(target_arch = "x86_64")]
static HAS_AVX2: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
});

#[cfg(target_arch = "x86_64")]
static HAS_AVX512: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
    *HAS_AVX2
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::env::var_os("SAFEPIPE_NO_AVX512").is_none()
});

impl Row<'_> {
    fn blocks(&self) -> usize {
        match self {
            Row::Q4_1(d, _, _) | Row::Q8_0(d, _) => d.len(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    //! The AVX2 kernels' arithmetic two blocks at a time in 512-bit registers: a pair of weight
    //! blocks as 64 unsigned bytes, `vpmaddubsw` + `vpmaddwd` into 16 `i32` lanes (8 per block),
    //! converted and scaled by a vector holding each block's scale in its 8 lanes. Rows with an
    //! odd block count use the AVX2 kernels.
    use super::QActivations;
    use std::arch::x86_64::*;

    /// A block kind read two blocks at a time.
    pub trait Pair {
        const SIGNED: bool;
        /// Blocks `i` and `i + 1` of `q` as 64 bytes, in value order.
        fn load_pair(q: &[Self], i: usize) -> __m512i
        where
            Self: Sized;
    }

    impl Pair for [u8; 16] {
        const SIGNED: bool = false;
        #[inline(always)]
        fn load_pair(q: &[Self], i: usize) -> __m512i {
            let pair = &q[i..i + 2];
            // SAFETY: two adjacent 16-byte blocks are 32 readable bytes; AVX-512 F/BW as the
            // callers (`target_feature` functions) enable.
            unsafe {
                let packed = _mm256_loadu_si256(pair.as_ptr().cast::<__m256i>());
                let mask = _mm256_set1_epi8(15);
                let lo = _mm256_and_si256(packed, mask);
                let hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
                // [lo0, lo1, hi0, hi1] (128-bit lanes) -> [lo0, hi0, lo1, hi1].
                let v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_shuffle_i64x2(v, v, 0b11_01_10_00)
            }
        }
    }

    impl Pair for [i8; 32] {
        const SIGNED: bool = true;
        #[inline(always)]
        fn load_pair(q: &[Self], i: usize) -> __m512i {
            let pair = &q[i..i + 2];
            // SAFETY: two adjacent 32-byte blocks are 64 readable bytes.
            unsafe { _mm512_loadu_si512(pair.as_ptr().cast::<__m512i>()) }
        }
    }

    #[inline(always)]
    fn pair_sums<B: Pair>(w: __m512i, a: &[[i8; 32]], i: usize) -> __m512 {
        let pair = &a[i..i + 2];
        // SAFETY: 64 readable bytes; AVX-512 F/BW as above.
        unsafe {
            let a = _mm512_loadu_si512(pair.as_ptr().cast::<__m512i>());
            let products = if B::SIGNED {
                // |w| x (a with w's sign): negate a where w < 0.
                let negative = _mm512_movepi8_mask(w);
                let a = _mm512_mask_sub_epi8(a, negative, _mm512_setzero_si512(), a);
                _mm512_maddubs_epi16(_mm512_abs_epi8(w), a)
            } else {
                _mm512_maddubs_epi16(w, a)
            };
            _mm512_cvtepi32_ps(_mm512_madd_epi16(products, _mm512_set1_epi16(1)))
        }
    }

    /// `[v[i] x 8, v[i + 1] x 8]`.
    #[inline(always)]
    fn spread(v: &[f32], i: usize) -> __m512 {
        // SAFETY: AVX-512 F as above.
        unsafe {
            let idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
            _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_set_ps(0.0, 0.0, v[i + 1], v[i])))
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    pub fn column_dot<B: Pair>(d: &[f32], m: Option<&[f32]>, q: &[B], x: &QActivations, out: &mut [f32]) {
        let n = q.len().min(d.len());
        let mut r = 0;
        while r + 4 <= x.rows {
            let start: [usize; 4] = std::array::from_fn(|k| (r + k) * n);
            let xq: [&[[i8; 32]]; 4] = std::array::from_fn(|k| &x.qs[start[k]..start[k] + n]);
            let xd: [&[f32]; 4] = std::array::from_fn(|k| &x.d[start[k]..start[k] + n]);
            let mut acc = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i + 2 <= n {
                let w = B::load_pair(q, i);
                let dw = spread(d, i);
                for k in 0..4 {
                    let scale = _mm512_mul_ps(dw, spread(xd[k], i));
                    acc[k] = _mm512_fmadd_ps(scale, pair_sums::<B>(w, xq[k], i), acc[k]);
                }
                i += 2;
            }
            for k in 0..4 {
                out[r + k] = _mm512_reduce_add_ps(acc[k]) + super::min_share(m, &x.s[start[k]..start[k] + n]);
            }
            r += 4;
        }
        while r < x.rows {
            let (xq, xd) = (&x.qs[r * n..(r + 1) * n], &x.d[r * n..(r + 1) * n]);
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i + 2 <= n {
                let scale = _mm512_mul_ps(spread(d, i), spread(xd, i));
                acc = _mm512_fmadd_ps(scale, pair_sums::<B>(B::load_pair(q, i), xq, i), acc);
                i += 2;
            }
            out[r] = _mm512_reduce_add_ps(acc) + super::min_share(m, &x.s[r * n..(r + 1) * n]);
            r += 1;
        }
    }
}

/// The minimum's share of Q4_1 rows: `sum_i m[i] * s[i]` (s = the block's scaled sum of x).
#[inline(always)]
fn min_share(m: Option<&[f32]>, s: &[f32]) -> f32 {
    m.map_or(0.0, |m| m.iter().zip(s).map(|(m, s)| m * s).sum())
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    //! Per block: the weights as 32 unsigned bytes (Q4_1 nibbles masked out of 16 bytes; Q8_0
    //! as `|w|`, its sign moved onto the activations), `vpmaddubsw` (u8 x i8 pairs, no overflow
    //! for values within +-127) then `vpmaddwd` into 8 `i32` lanes, converted and scaled into 8
    //! float lanes with one FMA. Four activation rows share each weight block's load.
    use super::QActivations;
    use std::arch::x86_64::*;

    /// A block kind: its 32 weights as bytes, and whether they are signed.
    pub trait Block {
        const SIGNED: bool;
        fn load(&self) -> __m256i;
    }

    impl Block for [u8; 16] {
        const SIGNED: bool = false;
        #[inline(always)]
        fn load(&self) -> __m256i {
            // SAFETY: 16 readable bytes; unaligned load. The intrinsics need SSE2/AVX2, which
            // every caller (a `target_feature(enable = "avx2")` function) has.
            unsafe {
                let packed = _mm_loadu_si128(self.as_ptr().cast::<__m128i>());
                let mask = _mm_set1_epi8(15);
                let lo = _mm_and_si128(packed, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
                _mm256_set_m128i(hi, lo)
            }
        }
    }

    impl Block for [i8; 32] {
        const SIGNED: bool = true;
        #[inline(always)]
        fn load(&self) -> __m256i {
            // SAFETY: 32 readable bytes; unaligned load; AVX2 as above.
            unsafe { _mm256_loadu_si256(self.as_ptr().cast::<__m256i>()) }
        }
    }

    /// The 8 `i32` lane sums of `w . a` for one block.
    #[inline(always)]
    fn block_sums<B: Block>(w: __m256i, a: &[i8; 32]) -> __m256i {
        // SAFETY: 32 readable bytes; unaligned load; AVX2 as above.
        unsafe {
            let a = _mm256_loadu_si256(a.as_ptr().cast::<__m256i>());
            let products = if B::SIGNED {
                _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
            } else {
                _mm256_maddubs_epi16(w, a)
            };
            _mm256_madd_epi16(products, _mm256_set1_epi16(1))
        }
    }

    #[inline(always)]
    fn hsum(v: __m256) -> f32 {
        // SAFETY: AVX as above.
        unsafe {
            let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
            _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub fn column_dot<B: Block>(d: &[f32], m: Option<&[f32]>, q: &[B], x: &QActivations, out: &mut [f32]) {
        let n = q.len().min(d.len());
        let mut r = 0;
        while r + 4 <= x.rows {
            let start: [usize; 4] = std::array::from_fn(|k| (r + k) * n);
            let rows = |k: usize| x.qs[start[k]..start[k] + n].iter().zip(&x.d[start[k]..start[k] + n]);
            let (mut a0, mut a1, mut a2, mut a3) = (
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
                _mm256_setzero_ps(),
            );
            let blocks = q.iter().zip(d).zip(rows(0)).zip(rows(1)).zip(rows(2)).zip(rows(3));
            for (((((wq, &wd), (q0, &d0)), (q1, &d1)), (q2, &d2)), (q3, &d3)) in blocks {
                let w = wq.load();
                let step = |acc: __m256, aq: &[i8; 32], ad: f32| {
                    _mm256_fmadd_ps(_mm256_set1_ps(wd * ad), _mm256_cvtepi32_ps(block_sums::<B>(w, aq)), acc)
                };
                a0 = step(a0, q0, d0);
                a1 = step(a1, q1, d1);
                a2 = step(a2, q2, d2);
                a3 = step(a3, q3, d3);
            }
            for (k, acc) in [a0, a1, a2, a3].into_iter().enumerate() {
                out[r + k] = hsum(acc) + super::min_share(m, &x.s[start[k]..start[k] + n]);
            }
            r += 4;
        }
        while r < x.rows {
            let (xq, xd) = (&x.qs[r * n..(r + 1) * n], &x.d[r * n..(r + 1) * n]);
            let mut acc = _mm256_setzero_ps();
            for ((wq, wd), (aq, ad)) in q.iter().zip(d).zip(xq.iter().zip(xd)) {
                let sums = block_sums::<B>(wq.load(), aq);
                acc = _mm256_fmadd_ps(_mm256_set1_ps(wd * ad), _mm256_cvtepi32_ps(sums), acc);
            }
            out[r] = hsum(acc) + super::min_share(m, &x.s[r * n..(r + 1) * n]);
            r += 1;
        }
    }
}

/// Portable kernel: lane-wise sums (8 lanes of adjacent pairs, the AVX2 kernels' shape) scaled
/// per block into 8 float lanes, reduced at the end of the row.
fn column_dot_portable(w: &Row<'_>, x: &QActivations, out: &mut [f32]) {
    let (d, m, n) = match *w {
        Row::Q4_1(d, m, q) => (d, Some(m), q.len()),
        Row::Q8_0(d, q) => (d, None, q.len()),
    };
    for (r, out) in out.iter_mut().enumerate() {
        let row = r * n..(r + 1) * n;
        let mut acc = [0f32; 8];
        for i in 0..n {
            let wq: [i8; 32] = match *w {
                Row::Q4_1(_, _, q) => {
                    std::array::from_fn(|j| if j < 16 { q[i][j] & 15 } else { q[i][j - 16] >> 4 } as i8)
                }
                Row::Q8_0(_, q) => q[i],
            };
            let a = &x.qs[row.start + i];
            let mut p = [0i32; 8];
            for h in 0..2 {
                for (l, p) in p.iter_mut().enumerate() {
                    let j = h * 16 + 2 * l;
                    *p += i32::from(wq[j]) * i32::from(a[j]) + i32::from(wq[j + 1]) * i32::from(a[j + 1]);
                }
            }
            let scale = d[i] * x.d[row.start + i];
            for (acc, p) in acc.iter_mut().zip(p) {
                *acc += scale * p as f32;
            }
        }
        *out = acc.iter().sum::<f32>() + min_share(m, &x.s[row]);
    }
}

/// Activation rows quantised per 32-value block (ggml's Q8_1): `x ~= d * q`, and `s = d * sum(q)`.
#[derive(Debug, Default)]
pub struct QActivations {
    pub rows: usize,
    pub cols: usize,
    d: Vec<f32>,
    s: Vec<f32>,
    qs: Vec<[i8; 32]>,
}

impl QActivations {
    /// Quantises `rows` rows of `cols` values (row-major).
    pub fn quantize(x: &[f32], cols: usize) -> QActivations {
        assert_eq!(x.len() % cols, 0);
        assert_eq!(cols % BLOCK, 0);
        let n = x.len() / BLOCK;
        let mut out = QActivations {
            rows: x.len() / cols,
            cols,
            d: Vec::with_capacity(n),
            s: Vec::with_capacity(n),
            qs: Vec::with_capacity(n),
        };
        for block in x.chunks_exact(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut q = [0i8; 32];
            let mut sum = 0i32;
            for (q, v) in q.iter_mut().zip(block) {
                *q = (v * inverse).round() as i8;
                sum += i32::from(*q);
            }
            out.d.push(d);
            out.s.push(d * sum as f32);
            out.qs.push(q);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0000), 0.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x3555), 0.333_251_95);
    }

    /// Builds Q4_1 and Q8_0 blocks by hand and checks products against f32 arithmetic on the
    /// dequantised weights (within the activation quantisation error).
    #[test]
    fn quantised_products_match_dequantised_arithmetic() {
        let (rows, cols) = (5, 64);
        let mut q41 = Vec::new();
        let mut q80 = Vec::new();
        for b in 0..rows * cols / BLOCK {
            q41.extend(0x3000u16.to_le_bytes()); // d = 0.125
            q41.extend(0xb800u16.to_le_bytes()); // m = -0.5
            q41.extend((0..16).map(|j| ((j + b) % 16) as u8 | ((((j * 7 + b) % 16) as u8) << 4)));
            q80.extend(0x2c00u16.to_le_bytes()); // d = 0.0625
            q80.extend((0..32).map(|j: i32| ((j * 9 + b as i32 * 5) % 255 - 127) as i8 as u8));
        }
        let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let qx = QActivations::quantize(&x, cols);
        for (kind, data) in [(GGML_Q4_1, &q41), (GGML_Q8_0, &q80)] {
            let w = QMatrix::from_ggml(kind, rows, cols, data).unwrap();
            let mut out = vec![0f32; 3 * rows];
            w.matmul(&qx, &mut out);
            // The activations as the kernels see them (dequantised from their 8-bit blocks).
            let xq: Vec<f32> = (0..x.len())
                .map(|i| qx.d[i / BLOCK] * f32::from(qx.qs[i / BLOCK][i % BLOCK]))
                .collect();
            let mut row = vec![0f32; cols];
            for o in 0..rows {
                w.dequantize_row(o, &mut row);
                let per_row = cols / BLOCK;
                let span = o * per_row..(o + 1) * per_row;
                let weights = match &w.blocks {
                    Blocks::Q4_1 { m, q } => Row::Q4_1(&w.d[span.clone()], &m[span.clone()], &q[span]),
                    Blocks::Q8_0 { q } => Row::Q8_0(&w.d[span.clone()], &q[span]),
                };
                let mut portable = vec![0f32; 3];
                column_dot_portable(&weights, &qx, &mut portable);
                for r in 0..3 {
                    let on_quantised: f32 = row.iter().zip(&xq[r * cols..(r + 1) * cols]).map(|(a, b)| a * b).sum();
                    let exact: f32 = row.iter().zip(&x[r * cols..(r + 1) * cols]).map(|(a, b)| a * b).sum();
                    let got = out[r * rows + o];
                    // Exact arithmetic on the quantised activations, to float rounding; the
                    // portable and AVX2 kernels agree; the activation quantisation error is small.
                    assert!(
                        (got - on_quantised).abs() < 1e-4 * (1.0 + on_quantised.abs()),
                        "{kind} {o} {r}: {got} vs {on_quantised}"
                    );
                    assert!(
                        (got - portable[r]).abs() < 1e-4 * (1.0 + got.abs()),
                        "{kind} {o} {r}: {got} vs portable {}",
                        portable[r]
                    );
                    // Rounding each activation moves it by at most half its block's step.
                    let bound: f32 = (0..cols)
                        .map(|c| row[c].abs() * qx.d[(r * cols + c) / BLOCK] / 2.0)
                        .sum();
                    assert!(
                        (got - exact).abs() <= bound + 1e-3,
                        "{kind} {o} {r}: {got} vs {exact} (bound {bound})"
                    );
                }
            }
        }
        assert!(
            QMatrix::from_ggml(2, rows, cols, &q41)
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            QMatrix::from_ggml(GGML_Q4_1, rows, cols, &q41[..10])
                .unwrap_err()
                .contains("truncated")
        );
    }
}
