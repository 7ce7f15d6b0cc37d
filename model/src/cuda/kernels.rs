//! The kernel sources of the CUDA backend (`kernels/*.cu`, CUDA C compiled at run time by
//! NVRTC, see [`super::nvrtc`]) and the entry points each must provide.
//!
//! ```text
//! kernels/common.cuh        bf16 without headers, load/store, deterministic block reductions
//! kernels/embedding.cu      token gather; backward by token groups (no atomics)
//! kernels/rmsnorm.cu        fused residual add + RMSNorm forward/backward, column sums
//! kernels/rope.cu           rotate-half RoPE (forward and its transpose), strided rows
//! kernels/swiglu.cu         SwiGLU on the fused gate/up projection, forward/backward
//! kernels/cross_entropy.cu  softmax cross-entropy over a chunk of logits, gradient in place
//! kernels/optimizer.cu      gradient scale, global norm (two-pass fp64), AdamW + bf16 cast
//! kernels/attention.cu      reference attention (causal, document masks, GQA), forward/backward
//! kernels/flash_attention.cu fused attention on tensor cores (bf16, head_dim 64), no atomics
//! ```

use super::KernelSource;

/// Prepended to every source.
pub const COMMON: &str = include_str!("kernels/common.cuh");

/// Every kernel source, with its entry points. Entries ending in `_T` exist once per storage
/// type, as `_f32` and `_bf16`.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        name: "embedding",
        source: include_str!("kernels/embedding.cu"),
        entries: &["embed_forward_T", "embed_backward_T"],
    },
    KernelSource {
        name: "rmsnorm",
        source: include_str!("kernels/rmsnorm.cu"),
        entries: &["rmsnorm_forward_T", "rmsnorm_backward_T", "column_sum"],
    },
    KernelSource {
        name: "rope",
        source: include_str!("kernels/rope.cu"),
        entries: &["rope_T"],
    },
    KernelSource {
        name: "swiglu",
        source: include_str!("kernels/swiglu.cu"),
        entries: &["swiglu_forward_T", "swiglu_backward_T"],
    },
    KernelSource {
        name: "cross_entropy",
        source: include_str!("kernels/cross_entropy.cu"),
        entries: &["cross_entropy_T"],
    },
    KernelSource {
        name: "optimizer",
        source: include_str!("kernels/optimizer.cu"),
        entries: &[
            "scale_f32",
            "sum_squares",
            "sum_partials",
            "adamw",
            "cast_f32_bf16",
            "accumulate_bf16_f32",
        ],
    },
    KernelSource {
        name: "attention",
        source: include_str!("kernels/attention.cu"),
        entries: &[
            "attention_forward_T",
            "attention_delta_T",
            "attention_backward_query_T",
            "attention_backward_key_T",
        ],
    },
    KernelSource {
        name: "flash_attention",
        source: include_str!("kernels/flash_attention.cu"),
        entries: &[
            "flash_forward_bf16",
            "flash_backward_query_bf16",
            "flash_backward_key_bf16",
        ],
    },
];

impl KernelSource {
    /// The entry points' symbol names, `_T` expanded to `_f32` and `_bf16`.
    pub fn symbols(&self) -> Vec<String> {
        self.entries
            .iter()
            .flat_map(|e| match e.strip_suffix("_T") {
                Some(base) => vec![format!("{base}_f32"), format!("{base}_bf16")],
                None => vec![e.to_string()],
            })
            .collect()
    }
}
