//! recycle-kernels: Recycle's CUDA kernels, compiled at build time and embedded in the crate.
//!
//! # What is here
//!
//! One CUDA C++ file per family in `src/` (elementwise, softmax, layernorm, batchnorm,
//! embedding, dropout, cross_entropy, optimizers, kd_loss, pool, layout), each kernel
//! documented in its file with the CPU twin in `recycle-engine` (or, for the fused distillation
//! loss, in the root crate) that it must match, and docs/kernels.md listing them all. The Rust side holds no
//! CUDA calls — the engine's `cuda` feature loads and launches — only what the host needs:
//!
//! - the fatbins ([`ALL`], [`KD_LOSS`], ...; [`available`]);
//! - [`names`]: the name of every kernel, by family;
//! - [`abi`]: the parameter list of every kernel, checked against the compiled PTX;
//! - [`launch`]: grid, block and scratch sizes from shapes;
//! - [`kd`]: the fused loss's host-side arguments (row counts, normalisers, teacher pointers);
//! - [`fatbin`]: reading a fatbin (its images, their kernels, which one a GPU runs);
//! - [`sim`]: the host simulator, which runs the kernels' source on CPU threads (no GPU needed).
//!
//! # How the kernels are built
//!
//! `build.rs` finds nvcc — `$NVCC`, `$CUDA_HOME/bin` or `$CUDA_PATH/bin`, `PATH`, the
//! `site-packages` of `python3` (where `pip install nvidia-cuda-nvcc nvidia-cuda-runtime
//! nvidia-cuda-cccl` puts it, on any machine, GPU or not), then `/usr/local/cuda/bin` — and
//! compiles each family into one uncompressed fatbin holding cubins for sm_80, sm_86, sm_89 and
//! sm_90 and the PTX of compute_90, written to `OUT_DIR` and embedded with `include_bytes!`.
//! One fatbin per family rather than loose cubins: one blob to embed and one
//! `cuModuleLoadData` call per family, and the driver itself picks the image for the device
//! ([`fatbin::select`] tells which in advance). The cubins are what runs: a cubin built by a
//! newer 13.x toolkit loads on a 13.0 driver, while PTX from a newer toolkit does not JIT on
//! an older driver, so the PTX only serves GPUs newer than sm_90 on drivers at least as new as
//! the toolkit. Uncompressed, because a compressed image needs a driver that knows the
//! compression (newer toolkits default to formats older drivers lack), and so that the tests
//! can read every image's symbol table.
//!
//! # Building without nvcc
//!
//! This crate is a workspace member, so `cargo build --workspace` / `cargo test --workspace`
//! build it on machines without nvcc too (Cargo's `default-members` would not keep it out of
//! `--workspace`). There, `build.rs` prints a warning and embeds nothing: every fatbin is
//! empty, [`available`] is false, and the tests check what they can (the launch helpers, the
//! fatbin reader, the host-side arguments). Two environment variables change that:
//!
//! - `RECYCLE_REQUIRE_NVCC=1`: a missing nvcc fails the build (CI sets it in its kernel step,
//!   after installing nvcc from PyPI, so that every kernel compiles on every submission);
//! - `RECYCLE_NO_NVCC=1`: do not look for nvcc (an empty build on purpose).
//!
//! When nvcc is found, any compile error fails the build, and the `ptxas -v` report of every
//! family is kept in `$OUT_DIR/<family>.ptxas.txt`.
//!
//! # Conventions of the kernels
//!
//! Unmangled (`extern "C"`) names; `_f32` / `_bf16` suffixes name the storage type of the
//! activation tensors, arithmetic is f32 (f64 where the CPU twin accumulates in f64);
//! parameters, statistics and parameter gradients are f32. Reductions add in an order fixed by
//! the block size, which [`launch`] derives from the shape alone, and no kernel adds floats
//! with atomics: every result is the same from run to run. Kernels that promise the CPU twin's
//! exact bits (casts, dropout, optimizers, the affine maps of the normalisations, the
//! embedding backward) round after every operation, never fusing a multiply-add.

#[doc(hidden)]
#[repr(C, align(64))]
pub struct Aligned<T: ?Sized>(pub T);

mod generated {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

pub use generated::{
    ALL, AVAILABLE, BATCHNORM, CROSS_ENTROPY, CUBIN_ARCHS, DROPOUT, ELEMENTWISE, EMBEDDING,
    KD_LOSS, LAYERNORM, LAYOUT, NVCC_PATH, NVCC_VERSION, OPTIMIZERS, POOL, PTX_ARCH, SOFTMAX,
};

pub mod abi;
pub mod fatbin;
pub mod kd;
pub mod launch;
pub mod names;
pub mod sim;

/// Whether the kernels were compiled into this build (nvcc was found at build time).
pub fn available() -> bool {
    AVAILABLE
}

/// Every family and its fatbin (empty slices when [`available`] is false).
pub fn all() -> &'static [(&'static str, &'static [u8])] {
    ALL
}

/// The fatbin of one family, by name (`"kd_loss"`), if the family exists.
pub fn family(name: &str) -> Option<&'static [u8]> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_listed_once_and_agree_with_names() {
        let built: Vec<&str> = all().iter().map(|(n, _)| *n).collect();
        let named: Vec<&str> = names::FAMILIES.iter().map(|(n, _)| *n).collect();
        assert_eq!(built, named);
        for (name, _) in all() {
            assert!(family(name).is_some());
        }
        assert!(family("no_such_family").is_none());
    }

    #[test]
    fn kernel_names_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (_, kernels) in names::FAMILIES {
            for k in *kernels {
                assert!(seen.insert(*k), "{k} is listed twice");
            }
        }
    }
}
