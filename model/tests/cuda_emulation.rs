//! The CUDA kernels' own sources, run on the CPU: `tests/cuda_emu/emulator.h` emulates the part
//! of CUDA they use (block threads, barriers, warp shuffles, `mma.sync` m16n8k16 by the PTX ISA's
//! fragment layout), and `tests/cuda_emu/attention_check.cpp` runs the fused tensor-core
//! attention (forward and backward) against the reference kernels, and those against plain
//! double precision. No GPU: this checks the kernels' logic (indexing, masks, tiles,
//! synchronisation) in `make test`; their numerics and speed on hardware are the GPU check's.
//! Needs a C++20 compiler (`c++`, as Debian's g++ 12).

use std::path::Path;
use std::process::Command;

const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda/kernels");

/// The kernels as one C++ translation unit for the emulator: the prelude and the sources, with
/// dynamic shared memory (`extern __shared__`) taken from the emulated block.
fn kernel_sources() -> String {
    let read = |name: &str| std::fs::read_to_string(Path::new(KERNELS).join(name)).unwrap();
    let attention = read("attention.cu").replace(
        "extern __shared__ float scores[];",
        "float* scores = emu_dynamic_shared<float>();",
    );
    assert!(
        attention.contains("emu_dynamic_shared"),
        "attention.cu's shared memory declaration changed"
    );
    format!("{}\n{attention}\n{}", read("common.cuh"), read("flash_attention.cu"))
}

#[test]
fn flash_attention_matches_the_reference_kernels_in_the_cpu_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let emu = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cuda_emu");
    std::fs::write(dir.path().join("kernels.inc"), kernel_sources()).unwrap();
    for file in ["emulator.h", "attention_check.cpp"] {
        std::fs::copy(Path::new(emu).join(file), dir.path().join(file)).unwrap();
    }
    let binary = dir.path().join("attention_check");
    let compile = Command::new("c++")
        .args([
            "-std=c++20",
            "-O2",
            "-pthread",
            "-Wno-unused-function",
            "attention_check.cpp",
            "-o",
        ])
        .arg(&binary)
        .current_dir(dir.path())
        .output()
        .expect("a C++ compiler (`c++`) to build the CUDA emulator");
    assert!(
        compile.status.success(),
        "the kernels do not compile under the emulator:\n{}",
        String::from_utf8_lossy(&compile.stderr)
    );
    let run = Command::new(&binary).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    eprintln!("{stdout}");
    assert!(
        run.status.success() && stdout.trim_end().ends_with("ok"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    // The comparisons all ran.
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
