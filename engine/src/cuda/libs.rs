//! The CUDA libraries beside the driver — cuBLASLt (matmuls), cuDNN (convolutions) and NCCL
//! (gradient all-reduce across GPUs) — found at run time, and their absence turned into an error naming the library.
//!
//! cudarc loads each library on the first call into it and *panics* when no file of the
//! expected names can be opened (`panic_no_lib_found`), or when a symbol is missing. So before
//! the first call this module asks cudarc's own `is_culib_present` (which tries the same names
//! without panicking), and the handle creation that follows runs under `catch_unwind`. The
//! answer is kept for the process: a library does not appear while a process runs.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

/// Which library.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Library {
    CublasLt,
    Cudnn,
    Nccl,
}

impl Library {
    /// The file a Linux installation provides (what the error tells the user to find).
    pub(crate) fn file(self) -> &'static str {
        match self {
            Library::CublasLt => "libcublasLt.so.13",
            Library::Cudnn => "libcudnn.so.9",
            Library::Nccl => "libnccl.so.2",
        }
    }

    /// What uses it.
    fn purpose(self) -> &'static str {
        match self {
            Library::CublasLt => "matmul, batched_matmul and linear",
            Library::Cudnn => "conv2d",
            Library::Nccl => "all-reduce groups across GPUs",
        }
    }

    /// Where it comes from.
    fn install(self) -> &'static str {
        match self {
            Library::CublasLt => {
                "the CUDA toolkit, or `pip install nvidia-cublas` (its nvidia/cu13/lib)"
            }
            Library::Cudnn => "cuDNN 9 for CUDA 13, e.g. `pip install nvidia-cudnn-cu13`",
            // cudarc opens `libnccl.so` (never `.so.2`, the only name the wheels install).
            Library::Nccl => {
                "NCCL 2 for CUDA 13, e.g. `pip install nvidia-nccl-cu13`, with a link named \
                 libnccl.so to its libnccl.so.2 (the name the bindings open)"
            }
        }
    }
}

/// The error for a library that cannot be loaded.
pub(crate) fn missing_message(lib: Library, ordinal: usize) -> String {
    format!(
        "cuda:{ordinal}: {} is not loadable, and {} on a GPU need it; install {} and put its \
         directory on the loader's path (LD_LIBRARY_PATH), or run on the CPU (`cpu`)",
        lib.file(),
        lib.purpose(),
        lib.install()
    )
}

/// The error for a cuDNN older than the bindings (cuDNN 9.x API).
pub(crate) fn cudnn_too_old_message(ordinal: usize, version: usize) -> String {
    format!(
        "cuda:{ordinal}: the loaded cuDNN is version {}.{}.{}, but recycle's bindings are for \
         cuDNN 9 (libcudnn.so.9); install cuDNN 9 for CUDA 13",
        version / 10_000,
        (version / 100) % 100,
        version % 100
    )
}

/// Whether cudarc will find `lib` (asked once per process).
pub(crate) fn present(lib: Library) -> bool {
    static CUBLASLT: OnceLock<bool> = OnceLock::new();
    static CUDNN: OnceLock<bool> = OnceLock::new();
    static NCCL: OnceLock<bool> = OnceLock::new();
    let (cell, probe): (&OnceLock<bool>, unsafe fn() -> bool) = match lib {
        Library::CublasLt => (&CUBLASLT, cudarc::cublaslt::sys::is_culib_present),
        Library::Cudnn => (&CUDNN, cudarc::cudnn::sys::is_culib_present),
        Library::Nccl => (&NCCL, cudarc::nccl::sys::is_culib_present),
    };
    // SAFETY: only tries to open the library under cudarc's candidate names (running its
    // initialisers, which is what using it means).
    *cell.get_or_init(|| catch_unwind(|| unsafe { probe() }).unwrap_or(false))
}

/// `Ok` when `lib` is loadable, else the error naming it.
pub(crate) fn require(lib: Library, ordinal: usize) -> crate::Result<()> {
    if present(lib) {
        Ok(())
    } else {
        Err(crate::Error::Device(missing_message(lib, ordinal)))
    }
}

/// Runs `f` (the first calls into a library), turning a panic of the bindings (a symbol the
/// loaded library lacks) into an error naming the library.
pub(crate) fn guarded<T>(
    lib: Library,
    ordinal: usize,
    f: impl FnOnce() -> crate::Result<T>,
) -> crate::Result<T> {
    unpanicked(f, |what| {
        format!("cuda:{ordinal}: {} failed to load: {what}", lib.file())
    })
}

/// Runs `f`, turning a panic (of the bindings: cudarc panics on what it cannot load) into an
/// `Error::Device` with the message `describe` makes of the panic's.
pub(crate) fn unpanicked<T>(
    f: impl FnOnce() -> crate::Result<T>,
    describe: impl FnOnce(&str) -> String,
) -> crate::Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(crate::Error::Device(describe(&what)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_library_and_the_way_out() {
        let m = missing_message(Library::Cudnn, 0);
        assert!(
            m.starts_with("cuda:0: libcudnn.so.9 is not loadable") && m.contains("conv2d"),
            "{m}"
        );
        assert!(m.contains("LD_LIBRARY_PATH") && m.contains("cpu"), "{m}");
        let m = missing_message(Library::CublasLt, 1);
        assert!(
            m.contains("libcublasLt.so.13") && m.contains("matmul"),
            "{m}"
        );
        let m = missing_message(Library::Nccl, 0);
        assert!(
            m.contains("libnccl.so.2") && m.contains("all-reduce"),
            "{m}"
        );
        let m = cudnn_too_old_message(0, 8_09_07);
        assert!(m.contains("8.9.7") && m.contains("cuDNN 9"), "{m}");
    }

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        // This machine (and CI) has neither library on the loader's path; where one is
        // installed the answer is Ok, and the error path is not reachable.
        for lib in [Library::CublasLt, Library::Cudnn, Library::Nccl] {
            match require(lib, 0) {
                Ok(()) => assert!(present(lib)),
                Err(e) => assert!(e.to_string().contains(lib.file()), "{e}"),
            }
        }
        let e = guarded::<()>(Library::Cudnn, 0, || panic!("Missing symbol cudnnFoo"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("libcudnn.so.9 failed to load") && e.contains("cudnnFoo"),
            "{e}"
        );
    }
}
