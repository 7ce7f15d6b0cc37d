//! The CUDA kernels' own sources, run on the CPU: `tests/cuda_emu/emulator.h` emulates the part
//! of CUDA they use (block threads, barriers, warp shuffles, `mma.sync` m16n8k16 by the PTX ISA's
//! fragment layout); `tests/cuda_emu/attention_check.cpp` runs the fused tensor-core attention
//! (forward and backward) against the reference kernels, and those against plain double
//! precision; `tests/cuda_emu/ops_check.cpp` runs every other kernel against double precision. No GPU: this checks the kernels' logic (indexing, masks, tiles,
//! synchronisation) in `make test`; their numerics and speed on hardware are the GPU check's.
//! Needs a C++20 compiler (`c++`, as Debian's g++ 12).

use std::path::Path;
use std::process::Command;

const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/kernels");
const EMULATOR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cuda_emu");

/// Every kernel source as one C++ translation unit for the emulator: the prelude, then the
/// sources the backend compiles, with dynamic shared memory (`extern __shared__`) taken from the
/// emulated block.
fn kernel_sources() -> String {
    let mut unit = safepipe_model::cuda::kernels::COMMON.to_string();
    for kernel in safepipe_model::cuda::kernels::SOURCES {
        unit.push('\n');
        unit.push_str(kernel.source);
    }
    let unit = unit.replace(
        "extern __shared__ float scores[];",
        "float* scores = emu_dynamic_shared<float>();",
    );
    assert!(
        !unit.contains("extern __shared__"),
        "a kernel declares dynamic shared memory the emulator does not map"
    );
    unit
}

/// Builds `program` (a file of tests/cuda_emu/) with the kernels and runs it; its stdout.
fn run(program: &str) -> String {
    let _ = Path::new(KERNELS);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("kernels.inc"), kernel_sources()).unwrap();
    for file in ["emulator.h", program] {
        std::fs::copy(Path::new(EMULATOR).join(file), dir.path().join(file)).unwrap();
    }
    let binary = dir.path().join("check");
    let compile = Command::new("c++")
        .args(["-std=c++20", "-O2", "-pthread", "-Wno-unused-function", program, "-o"])
        .arg(&binary)
        .current_dir(dir.path())
        .output()
        .expect("a C++ compiler (`c++`) to build the CUDA emulator");
    assert!(
        compile.status.success(),
        "the kernels do not compile under the emulator:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
    let out = Command::new(&binary).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn flash_attention_matches_the_reference_kernels_in_the_cpu_emulator() {
    let stdout = run("attention_check.cpp");
    for name in [
        "reference forward vs double",
        "flash forward",
        "flash log-sum-exp",
        "flash dq",
        "flash dk",
        "flash dv",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }
}

#[test]
fn every_other_kernel_matches_double_precision_in_the_cpu_emulator() {
    let stdout = run("ops_check.cpp");
    for name in [
        "embed_forward",
        "embed_backward",
        "rmsnorm_forward (residual add)",
        "rmsnorm_backward",
        "column_sum",
        "rope, then its transpose",
        "swiglu_backward",
        "cross_entropy (gradient)",
        "sum_squares + sum_partials",
        "adamw (weights, exact)",
        "adamw (bf16 copy, exact)",
    ] {
        assert!(stdout.contains(name), "{name} missing:\n{stdout}");
    }
}
