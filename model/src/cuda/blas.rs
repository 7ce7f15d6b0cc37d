//! Matrix products through cuBLASLt, in row-major terms, with descriptors and the algorithm
//! cached per shape.
//!
//! cuBLASLt's safe wrapper in cudarc rebuilds descriptors and reruns the heuristic on every call
//! and forces C and D to one type; this uses the raw layer instead:
//! - every distinct (shape, transposes, types, beta) gets its descriptors and **one algorithm**,
//!   chosen once by the heuristic and reused, so each GEMM runs the same kernel every step (with
//!   no atomics in cuBLAS's reductions, that makes runs bit-identical on one GPU model);
//! - D may be fp32 while A and B are bf16, so weight gradients accumulate in fp32 (beta = 1);
//! - C may differ from D, so a residual add rides on the product (`D = A B + C`, beta = 1).
//!
//! Row-major to column-major: a row-major `[r, c]` matrix is a column-major `[c, r]` one, so
//! `C = op(A) op(B)` in row-major is `C^T = op(B)^T op(A)^T` in column-major, which is what
//! [`Blas::gemm`] hands cuBLASLt.

use super::{CudaError, Gpu};
use cudarc::cublaslt::{result, sys};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Mutex;

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    fn cuda(self) -> sys::cudaDataType {
        match self {
            Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
            Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        }
    }

    pub fn bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
}

/// One row-major product `D[m, n] = alpha * op(A) op(B) + beta * C`. `a` is stored `[m, k]`
/// (or `[k, m]` when `trans_a`), `b` is stored `[k, n]` (or `[n, k]` when `trans_b`), C and D
/// are dense `[m, n]`. Pointers are raw device addresses.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub trans_a: bool,
    pub b: u64,
    pub trans_b: bool,
    /// C (read when beta != 0); may equal `d`.
    pub c: u64,
    pub d: u64,
    /// A's and B's type.
    pub input: Dtype,
    /// C's and D's type.
    pub output: Dtype,
    pub alpha: f32,
    pub beta: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    input: Dtype,
    output: Dtype,
    accumulate: bool,
}

/// The descriptors and algorithm of one GEMM shape.
struct Plan {
    desc: sys::cublasLtMatmulDesc_t,
    /// Layouts of cuBLAS's A (our B), cuBLAS's B (our A), and C/D.
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    algo: sys::cublasLtMatmulAlgo_t,
}

/// cuBLASLt on one GPU's stream, with its workspace and the plans made so far.
pub struct Blas {
    handle: sys::cublasLtHandle_t,
    /// Kept alive for `workspace_ptr`.
    _workspace: CudaSlice<u8>,
    workspace_ptr: u64,
    stream: sys::cudaStream_t,
    plans: Mutex<HashMap<Key, Plan>>,
}

// SAFETY: the handle and descriptors are only used through &self methods that serialise on the
// plans' mutex, and all work is queued on the one stream.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

/// cuBLASLt's workspace: 32 MiB, NVIDIA's recommendation for Hopper (more than enough before).
const WORKSPACE: usize = 32 << 20;

fn blas_err(what: &str, e: result::CublasError) -> CudaError {
    CudaError::Driver(format!("cuBLASLt {what}: {e:?}"))
}

impl Blas {
    pub fn new(gpu: &Gpu) -> Result<Blas, CudaError> {
        super::libs::require(super::Lib::CublasLt)?;
        let handle = result::create_handle().map_err(|e| blas_err("handle", e))?;
        let workspace = gpu
            .stream
            .alloc_zeros::<u8>(WORKSPACE)
            .map_err(|e| CudaError::Driver(format!("{e:?}")))?;
        let workspace_ptr = workspace.device_ptr(&gpu.stream).0;
        Ok(Blas {
            handle,
            _workspace: workspace,
            workspace_ptr,
            stream: gpu.stream.cu_stream() as sys::cudaStream_t,
            plans: Mutex::new(HashMap::new()),
        })
    }

    /// Queues one product (see [`Gemm`]). Operands must be 256-byte aligned (the alignment
    /// cuBLASLt's heuristic assumes by default; the model's layout keeps every tensor so).
    pub fn gemm(&self, g: &Gemm) -> Result<(), CudaError> {
        if [g.a, g.b, g.c, g.d].iter().any(|p| p % 256 != 0) {
            return Err(CudaError::Driver(format!(
                "a GEMM operand is not 256-byte aligned: {g:?}"
            )));
        }
        let key = Key {
            m: g.m,
            n: g.n,
            k: g.k,
            trans_a: g.trans_a,
            trans_b: g.trans_b,
            input: g.input,
            output: g.output,
            accumulate: g.beta != 0.0,
        };
        let mut plans = self.plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(self.plan(&key)?),
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: the plan's descriptors live as long as `self`; the pointers are device
        // addresses of buffers the caller keeps alive until the stream has run the product.
        unsafe {
            result::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                g.b as *const c_void,
                plan.layouts[0],
                g.a as *const c_void,
                plan.layouts[1],
                g.c as *const c_void,
                plan.layouts[2],
                g.d as *mut c_void,
                plan.layouts[2],
                &plan.algo,
                self.workspace_ptr as *mut c_void,
                WORKSPACE,
                self.stream,
            )
        }
        .map_err(|e| blas_err(&format!("matmul {key:?}"), e))
    }

    /// Descriptors for `key` and the heuristic's first algorithm for them.
    fn plan(&self, key: &Key) -> Result<Plan, CudaError> {
        let err = |what: &'static str| move |e| blas_err(&format!("{what} for {key:?}"), e);
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )
        .map_err(err("descriptor"))?;
        // Column-major: cuBLAS's A is our B, cuBLAS's B is our A (see the module doc).
        let (op_a, op_b) = (i32::from(key.trans_b), i32::from(key.trans_a));
        // SAFETY: `desc` was just created; the attribute buffers are i32 as the API expects.
        unsafe {
            for (attr, op) in [
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, op_a),
                (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, op_b),
            ] {
                result::set_matmul_desc_attribute(desc, attr, &op as *const i32 as *const c_void, 4)
                    .map_err(err("transpose attribute"))?;
            }
        }
        let (m, n, k) = (key.m as u64, key.n as u64, key.k as u64);
        // Stored column-major shapes: our B is [k, n] row-major = [n, k] col-major (ld n), or
        // [n, k] row-major = [k, n] col-major (ld k) when transposed; likewise for A.
        let b_layout = if key.trans_b { (k, n, k) } else { (n, k, n) };
        let a_layout = if key.trans_a { (m, k, m) } else { (k, m, k) };
        let layouts = [
            result::create_matrix_layout(key.input.cuda(), b_layout.0, b_layout.1, b_layout.2 as i64)
                .map_err(err("layout of B"))?,
            result::create_matrix_layout(key.input.cuda(), a_layout.0, a_layout.1, a_layout.2 as i64)
                .map_err(err("layout of A"))?,
            result::create_matrix_layout(key.output.cuda(), n, m, n as i64).map_err(err("layout of C/D"))?,
        ];
        let pref = result::create_matmul_pref().map_err(err("preference"))?;
        let size = WORKSPACE as u64;
        // SAFETY: `pref` was just created; the workspace size is a u64 as the API expects; every
        // descriptor passed is alive.
        let heuristic = unsafe {
            result::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &size as *const u64 as *const c_void,
                8,
            )
            .map_err(err("workspace preference"))?;
            let found = result::get_matmul_algo_heuristic(
                self.handle,
                desc,
                layouts[0],
                layouts[1],
                layouts[2],
                layouts[2],
                pref,
            );
            let _ = result::destroy_matmul_pref(pref);
            found.map_err(err("no algorithm"))?
        };
        Ok(Plan {
            desc,
            layouts,
            algo: heuristic.algo,
        })
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let plans = std::mem::take(self.plans.get_mut().unwrap_or_else(std::sync::PoisonError::into_inner));
        // SAFETY: nothing uses the descriptors or the handle after this; errors on teardown
        // cannot be acted on.
        unsafe {
            for plan in plans.into_values() {
                let _ = result::destroy_matmul_desc(plan.desc);
                for layout in plan.layouts {
                    let _ = result::destroy_matrix_layout(layout);
                }
            }
            let _ = result::destroy_handle(self.handle);
        }
    }
}
