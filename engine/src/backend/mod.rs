//! Backend-level functions: one per kernel-level operation, on tensors, never on the tape.
//! Each dispatches on where its input's storage lives — the CPU arm (plain f32 Rust, the
//! oracle) or the CUDA arm (`crate::cuda::<family>`, the kernels of `recycle-kernels`) — so an
//! op in `crate::ops` records one backward, written once, that calls them whatever the device.
//! Their parameter types sit in [`params`], a leaf module both the ops and the backends use.
//!
//! Families that dispatch here so far: [`softmax`], [`norm`], [`pool`], [`conv`], [`matmul`],
//! [`loss`], [`gather`], [`dropout`]. The others still dispatch at the op (`ops::<family>` hands a
//! GPU tensor to `cuda::<family>`, which records its own backward).

pub mod conv;
pub mod dropout;
pub mod gather;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod params;
pub mod pool;
pub mod softmax;

pub use params::{
    BatchNormOptions, Conv2dGeometry, Conv2dOptions, CrossEntropyOptions, Pool2dGeometry,
    ProductDims, SoftmaxKind,
};
