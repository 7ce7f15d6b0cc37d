//! Finding the CUDA libraries before cudarc opens them.
//!
//! cudarc opens each library by bare name on first use and **panics** when it is missing. So
//! every use goes through [`require`] first, which:
//! 1. looks for the library's file in, in order: `SAFEPIPE_CUDA_LIBS` (directories separated by
//!    `:`), `LD_LIBRARY_PATH`, the NVIDIA wheels of the Python environments in reach (`.venv`
//!    beside the working directory or the binary, `VIRTUAL_ENV`, and `python3`'s own
//!    site-packages), `CUDA_HOME` / `/usr/local/cuda`, and the system's library directories;
//! 2. loads the file by its absolute path and keeps it loaded, so that cudarc's later bare-name
//!    open finds the same library by its soname;
//! 3. asks cudarc whether it can now open the library, and turns a "no" into an error naming
//!    the library, where it was looked for and how to get it.
//!
//! NCCL is the exception to step 2: cudarc opens `libnccl.so`, the wheels ship `libnccl.so.2`,
//! and a preloaded library is only found under its soname. [`nccl_link_dir`] makes a directory
//! holding a `libnccl.so` link; a process started with it on `LD_LIBRARY_PATH` (what
//! `safepipe train --nproc-per-node` does for its ranks, see [`child_library_path`]) opens NCCL.

use super::CudaError;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};

/// A CUDA library the backend uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lib {
    /// The driver API (`libcuda.so.1`): comes with the NVIDIA driver, never with a wheel.
    Driver,
    /// The run-time compiler of our kernels.
    Nvrtc,
    /// cuBLASLt, the GEMMs.
    CublasLt,
    /// NCCL, the collectives between GPUs.
    Nccl,
}

impl Lib {
    pub const ALL: [Lib; 4] = [Lib::Driver, Lib::Nvrtc, Lib::CublasLt, Lib::Nccl];

    /// The file names it may have, preferred first (CUDA 13's, then CUDA 12's for a build
    /// with cudarc's `cuda-12090` bindings).
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so.1", "libcuda.so"],
            Lib::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
            Lib::CublasLt => &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
            Lib::Nccl => &["libnccl.so", "libnccl.so.2"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lib::Driver => "the CUDA driver (libcuda.so.1)",
            Lib::Nvrtc => "NVRTC (libnvrtc.so.13)",
            Lib::CublasLt => "cuBLASLt (libcublasLt.so.13)",
            Lib::Nccl => "NCCL (libnccl.so.2)",
        }
    }

    /// How a user gets it.
    pub fn remedy(self) -> &'static str {
        match self {
            Lib::Driver => {
                "it ships with the NVIDIA driver only: run on a machine with an NVIDIA GPU and its driver \
                 (580 or later for CUDA 13); without one, train on the CPU backend (plain `safepipe train`)"
            }
            Lib::Nvrtc => {
                "`pip install nvidia-cuda-nvrtc==13.0.88` (into .venv, or point SAFEPIPE_CUDA_LIBS at its nvidia/cu13/lib)"
            }
            Lib::CublasLt => {
                "`pip install nvidia-cublas==13.*` (or point SAFEPIPE_CUDA_LIBS at a CUDA 13 toolkit's lib64)"
            }
            Lib::Nccl => {
                "`pip install nvidia-nccl-cu13` (or point SAFEPIPE_CUDA_LIBS at the directory holding libnccl.so.2)"
            }
        }
    }

    /// The prefix of libraries it opens by bare name at run time, preloaded from its own
    /// directory (NVRTC opens `libnvrtc-builtins.so.13.N` when it compiles).
    fn companion_prefix(self) -> Option<&'static str> {
        match self {
            Lib::Nvrtc => Some("libnvrtc-builtins.so."),
            _ => None,
        }
    }

    /// Whether cudarc can open it now (its own probe; never panics).
    fn cudarc_sees(self) -> bool {
        // SAFETY: each probe only tries to dlopen the library's candidate names.
        unsafe {
            match self {
                Lib::Driver => cudarc::driver::sys::is_culib_present(),
                Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Lib::CublasLt => cudarc::cublaslt::sys::is_culib_present(),
                Lib::Nccl => cudarc::nccl::sys::is_culib_present(),
            }
        }
    }
}

/// Where to look for the libraries, in order (existing directories only, no repeats).
pub fn search_dirs() -> Vec<PathBuf> {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs = Vec::new();
        for var in ["SAFEPIPE_CUDA_LIBS", "LD_LIBRARY_PATH"] {
            if let Ok(value) = std::env::var(var) {
                dirs.extend(std::env::split_paths(&value));
            }
        }
        for site in site_packages() {
            for sub in [
                "nvidia/cu13/lib",
                "nvidia/nccl/lib",
                "nvidia/cublas/lib",
                "nvidia/cuda_nvrtc/lib",
            ] {
                dirs.push(site.join(sub));
            }
        }
        let cuda_home = std::env::var_os("CUDA_HOME").map(PathBuf::from);
        for home in cuda_home.into_iter().chain([PathBuf::from("/usr/local/cuda")]) {
            dirs.push(home.join("lib64"));
            dirs.push(home.join("lib"));
        }
        for system in ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"] {
            dirs.push(PathBuf::from(system));
        }
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| d.is_dir() && seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
        dirs
    })
    .clone()
}

/// site-packages directories of the Python environments in reach.
fn site_packages() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = vec![PathBuf::from(".venv")];
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        // target/debug/safepipe -> the checkout's .venv; bin/safepipe -> a .venv beside bin/.
        for up in dir.ancestors().take(4) {
            roots.push(up.join(".venv"));
        }
    }
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV") {
        roots.push(PathBuf::from(venv));
    }
    let mut sites: Vec<PathBuf> = Vec::new();
    for root in roots {
        if let Ok(entries) = std::fs::read_dir(root.join("lib")) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with("python3") {
                    sites.push(entry.path().join("site-packages"));
                }
            }
        }
    }
    // The interpreter's own environment (where a GPU machine's PyTorch keeps its CUDA wheels).
    let python = std::env::var("SAFEPIPE_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import site, sys; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
    if let Ok(out) = std::process::Command::new(python).args(["-c", script]).output()
        && out.status.success()
    {
        sites.extend(String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from));
    }
    sites
}

/// The first file of `lib` in the search directories.
pub fn locate(lib: Lib) -> Option<PathBuf> {
    let dirs = search_dirs();
    lib.file_names()
        .iter()
        .find_map(|name| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Libraries loaded by absolute path, kept open for the life of the process.
static PRELOADED: Mutex<Vec<(Lib, libloading::Library)>> = Mutex::new(Vec::new());

/// Makes `lib` available to cudarc, or says why it cannot be.
pub fn require(lib: Lib) -> Result<(), CudaError> {
    let mut preloaded = PRELOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if preloaded.iter().any(|(l, _)| *l == lib) || lib.cudarc_sees() {
        return Ok(());
    }
    let found = locate(lib);
    if let Some(path) = &found {
        // SAFETY: loading a CUDA library runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(path) } {
            Ok(handle) => {
                if lib.cudarc_sees() {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    for companion in companions(lib, dir) {
                        // SAFETY: as above. A companion that fails to load makes its user report it.
                        if let Ok(extra) = unsafe { libloading::Library::new(&companion) } {
                            preloaded.push((lib, extra));
                        }
                    }
                    preloaded.push((lib, handle));
                    return Ok(());
                }
            }
            Err(e) => {
                return Err(CudaError::Library {
                    lib,
                    detail: format!("{} exists but does not load: {e}", path.display()),
                });
            }
        }
    }
    let detail = match (lib, &found) {
        (Lib::Nccl, Some(path)) => format!(
            "found {} but cudarc opens libnccl.so by that name: start the process with a directory \
             holding a libnccl.so link on LD_LIBRARY_PATH (`safepipe train --nproc-per-node` does this)",
            path.display()
        ),
        _ => format!(
            "not found in {} (nor by the system's loader)",
            search_dirs()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    Err(CudaError::Library { lib, detail })
}

/// A directory (under `cache_dir`) holding `libnccl.so` linked to the NCCL found, or `None`
/// when none is found or the system's loader already opens `libnccl.so`.
pub fn nccl_link_dir(cache_dir: &Path) -> Result<Option<PathBuf>, CudaError> {
    if Lib::Nccl.cudarc_sees() {
        return Ok(None);
    }
    let Some(real) = locate(Lib::Nccl) else {
        return Ok(None);
    };
    let dir = cache_dir.join("nccl-link");
    let link = dir.join("libnccl.so");
    let io = |e: std::io::Error| CudaError::Library {
        lib: Lib::Nccl,
        detail: format!("cannot make the libnccl.so link in {}: {e}", dir.display()),
    };
    std::fs::create_dir_all(&dir).map_err(io)?;
    if std::fs::read_link(&link).ok().as_deref() != Some(real.as_path()) {
        // Replace atomically, so concurrent ranks never see a missing or half-made link.
        let partial = dir.join(format!("libnccl.so.{}.partial", std::process::id()));
        let _ = std::fs::remove_file(&partial);
        std::os::unix::fs::symlink(&real, &partial).map_err(io)?;
        std::fs::rename(&partial, &link).map_err(io)?;
    }
    Ok(Some(dir))
}

/// The companion libraries of `lib` in `dir` (see [`Lib::companion_prefix`]).
fn companions(lib: Lib, dir: &Path) -> Vec<PathBuf> {
    let Some(prefix) = lib.companion_prefix() else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    found.sort();
    found
}

/// `LD_LIBRARY_PATH` for a child process that will use CUDA: the NCCL link directory (if one
/// is needed), every directory where a CUDA library was found, then the current value.
pub fn child_library_path(cache_dir: &Path) -> Result<String, CudaError> {
    let mut dirs: Vec<PathBuf> = nccl_link_dir(cache_dir)?.into_iter().collect();
    for lib in Lib::ALL {
        if let Some(dir) = locate(lib).and_then(|p| p.parent().map(Path::to_path_buf))
            && !dirs.contains(&dir)
        {
            dirs.push(dir);
        }
    }
    if let Some(current) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&current));
    }
    std::env::join_paths(dirs)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| CudaError::Library {
            lib: Lib::Nccl,
            detail: format!("a library directory cannot go on LD_LIBRARY_PATH: {e}"),
        })
}

/// One line per library: where it was found, for `safepipe gpu info`.
pub fn report() -> Vec<(Lib, Option<PathBuf>)> {
    Lib::ALL.iter().map(|&lib| (lib, locate(lib))).collect()
}
