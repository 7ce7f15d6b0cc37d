//! CPU-side tests of the CUDA backend: every kernel compiles with NVRTC for the architectures we
//! target (no GPU is needed to compile; `make setup` installs NVRTC into .venv), compile errors
//! carry NVRTC's log, and a machine without the driver gets an error, not a panic.

use super::*;

fn temp_cache() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_with_its_entry_points() {
    libs::require(Lib::Nvrtc).unwrap_or_else(|e| panic!("{e} (run `make setup`)"));
    let cache = temp_cache();
    for arch in [Arch::SM80, Arch::SM90] {
        for kernel in kernels::SOURCES {
            let cubin = nvrtc::cubin(kernel, arch, cache.path()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                &cubin[..4],
                b"\x7fELF",
                "{} for {}: not an ELF CUBIN",
                kernel.name,
                arch.sm()
            );
            for symbol in kernel.symbols() {
                // The symbol table names every extern "C" entry point the backend looks up.
                let needle = format!("\0{symbol}\0");
                assert!(
                    cubin.windows(needle.len()).any(|w| w == needle.as_bytes()),
                    "{} for {}: no entry point {symbol}",
                    kernel.name,
                    arch.sm()
                );
            }
        }
    }
    // The second time every CUBIN comes from the cache: same bytes, no recompile.
    let cached: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().collect();
    assert_eq!(cached.len(), 2 * kernels::SOURCES.len());
    let first = &kernels::SOURCES[0];
    let path = cached
        .iter()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().contains(&format!("{}-sm_90-", first.name)))
        .unwrap();
    std::fs::write(&path, b"\x7fELF marker").unwrap();
    assert_eq!(
        nvrtc::cubin(first, Arch::SM90, cache.path()).unwrap(),
        b"\x7fELF marker"
    );
}

#[test]
fn a_kernel_that_does_not_compile_reports_nvrtcs_log() {
    libs::require(Lib::Nvrtc).unwrap_or_else(|e| panic!("{e} (run `make setup`)"));
    let err = nvrtc::compile(
        "broken",
        "extern \"C\" __global__ void f(float* x) { x[0] = undeclared_name; }",
        Arch::SM90,
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("kernel broken does not compile for sm_90"),
        "{message}"
    );
    assert!(message.contains("undeclared_name"), "{message}");
}

#[test]
fn no_driver_or_gpu_is_an_error_naming_what_is_missing() {
    let cache = temp_cache();
    match Gpu::open(0, cache.path()) {
        // A machine with a GPU: the error path is not reachable here.
        Ok(gpu) => eprintln!(
            "GPU present ({}, {}): skipping the no-GPU check",
            gpu.name,
            gpu.arch.sm()
        ),
        Err(CudaError::Library { lib, .. }) => {
            assert_eq!(lib, Lib::Driver);
            let message = Gpu::open(0, cache.path()).err().unwrap().to_string();
            assert!(message.contains("libcuda.so.1"), "{message}");
            assert!(message.contains("NVIDIA driver"), "{message}");
        }
        Err(CudaError::NoDevice(why)) => assert!(!why.is_empty()),
        Err(other) => panic!("unexpected error without a GPU: {other}"),
    }
}

#[test]
fn architectures_parse_from_the_usual_spellings() {
    assert_eq!(Arch::parse("sm_90"), Some(Arch::SM90));
    assert_eq!(Arch::parse("80"), Some(Arch::SM80));
    assert_eq!(Arch::parse("8.9").map(|a| a.sm()), Some("sm_89".into()));
    assert_eq!(Arch::parse("sm_"), None);
    assert_eq!(Arch::parse("x0"), None);
}
