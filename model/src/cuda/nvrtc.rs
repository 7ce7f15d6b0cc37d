//! Compiling the kernel sources at run time with NVRTC, for the GPU's own architecture, with a
//! cache on disk.
//!
//! Each source is compiled to a CUBIN for `sm_XY` (the detected compute capability), so the
//! driver never JIT-compiles PTX (a PTX ISA newer than the driver knows would fail to load). The
//! cache key is the SHA-256 of the source, the architecture, NVRTC's version and the options:
//! edit a kernel and it recompiles, nothing else does. No GPU or driver is needed to compile,
//! which is how `make test` checks every kernel on a CPU-only machine.

use super::libs::{Lib, require};
use super::{CudaError, KernelSource};
use sha2::{Digest, Sha256};
use std::ffi::{CString, c_char};
use std::path::{Path, PathBuf};

/// A GPU architecture, as its compute capability (8.0 = A100, 9.0 = H100/H200).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

impl Arch {
    pub const SM80: Arch = Arch { major: 8, minor: 0 };
    pub const SM90: Arch = Arch { major: 9, minor: 0 };

    /// `sm_90` and the like.
    pub fn sm(&self) -> String {
        format!("sm_{}{}", self.major, self.minor)
    }

    /// Parses `sm_90`, `90` or `9.0`.
    pub fn parse(text: &str) -> Option<Arch> {
        let t = text.trim().trim_start_matches("sm_");
        let (major, minor) = match t.split_once('.') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None if t.len() >= 2 => (t[..t.len() - 1].parse().ok()?, t[t.len() - 1..].parse().ok()?),
            None => return None,
        };
        Some(Arch { major, minor })
    }
}

/// Options every kernel is compiled with. No fast-math: the kernels must match the CPU backend.
const OPTIONS: &[&str] = &["-std=c++17", "--device-as-default-execution-space"];

/// NVRTC's version, as (major, minor).
pub fn version() -> Result<(i32, i32), CudaError> {
    require(Lib::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); the pointers are valid for the call.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Compile {
            kernel: "(version)".into(),
            arch: String::new(),
            log: format!("{e:?}"),
        })?;
    Ok((major, minor))
}

/// The directory compiled kernels are cached in: `SAFEPIPE_KERNEL_CACHE`, else
/// `$XDG_CACHE_HOME/safepipe/kernels`, else `~/.cache/safepipe/kernels`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SAFEPIPE_KERNEL_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("safepipe").join("kernels")
}

/// The full text NVRTC compiles: the shared prelude, then the kernel's own source.
pub fn full_source(kernel: &KernelSource) -> String {
    format!("{}\n{}", super::kernels::COMMON, kernel.source)
}

/// The CUBIN of `kernel` for `arch`, from the cache in `cache` or compiled (and then cached).
pub fn cubin(kernel: &KernelSource, arch: Arch, cache: &Path) -> Result<Vec<u8>, CudaError> {
    let source = full_source(kernel);
    let (major, minor) = version()?;
    let mut key = Sha256::new();
    for part in [
        source.as_str(),
        &arch.sm(),
        &format!("nvrtc {major}.{minor}"),
        &OPTIONS.join(" "),
    ] {
        key.update(part.as_bytes());
        key.update([0]);
    }
    let path = cache.join(format!(
        "{}-{}-{}.cubin",
        kernel.name,
        arch.sm(),
        hex::encode(&key.finalize()[..8])
    ));
    if let Ok(bytes) = std::fs::read(&path)
        && !bytes.is_empty()
    {
        return Ok(bytes);
    }
    let bytes = compile(kernel.name, &source, arch)?;
    // A cache that cannot be written only costs a recompile next time.
    if std::fs::create_dir_all(cache).is_ok() {
        let _ = crate::train::write_atomic(&path, &bytes);
    }
    Ok(bytes)
}

/// Compiles `source` to a CUBIN for `arch`; a compile error carries NVRTC's log.
pub fn compile(name: &str, source: &str, arch: Arch) -> Result<Vec<u8>, CudaError> {
    require(Lib::Nvrtc)?;
    use cudarc::nvrtc::{result, sys};
    let fail = |log: String| CudaError::Compile {
        kernel: name.to_string(),
        arch: arch.sm(),
        log,
    };
    let c_source = CString::new(source).map_err(|_| fail("the source holds a NUL byte".into()))?;
    let c_name = CString::new(format!("{name}.cu")).map_err(|_| fail("the name holds a NUL byte".into()))?;
    let program = result::create_program(&c_source, Some(&c_name)).map_err(|e| fail(format!("{e:?}")))?;
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={}", arch.sm()));
    // SAFETY: `program` was created above and is destroyed once, below.
    let outcome = unsafe {
        match result::compile_program(program, &options) {
            Ok(()) => {
                let mut size = 0usize;
                let mut cubin = Vec::new();
                sys::nvrtcGetCUBINSize(program, &mut size)
                    .result()
                    .and_then(|()| {
                        cubin.resize(size, 0u8);
                        sys::nvrtcGetCUBIN(program, cubin.as_mut_ptr() as *mut c_char).result()
                    })
                    .map(|()| cubin)
                    .map_err(|e| fail(format!("fetching the CUBIN: {e:?}")))
            }
            Err(e) => {
                let log = result::get_program_log(program)
                    .map(|chars| {
                        let bytes: Vec<u8> = chars.iter().map(|&c| c as u8).take_while(|&b| b != 0).collect();
                        String::from_utf8_lossy(&bytes).into_owned()
                    })
                    .unwrap_or_default();
                Err(fail(format!("{e:?}\n{log}")))
            }
        }
    };
    // SAFETY: created above, not destroyed before.
    let _ = unsafe { result::destroy_program(program) };
    outcome
}
