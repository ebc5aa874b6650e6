//! Backend-level functions: one per kernel-level operation, on tensors, never on the tape.
//! Each dispatches on where its input's storage lives — the CPU arm (plain f32 Rust, the
//! oracle) or the CUDA arm (`crate::cuda::<family>`, the kernels of `recycle-kernels`) — so an
//! op in `crate::ops` records one backward, written once, that calls them whatever the device.
//! Their parameter types sit in [`params`], a leaf module both the ops and the backends use.
//!
//! Every op family with a CUDA arm dispatches here: [`softmax`], [`norm`], [`pool`], [`conv`],
//! [`matmul`], [`loss`], [`gather`], [`dropout`], [`elementwise`], [`activation`],
//! [`layout`] and [`attention`] (a fused CPU arm; on a GPU, a composition of the other
//! families' functions).

pub mod activation;
pub mod attention;
pub mod conv;
pub mod conv_bf16;
pub mod dropout;
pub mod elementwise;
pub mod gather;
pub mod gemm;
pub mod layout;
pub mod loss;
pub mod matmul;
pub mod matmul_bf16;
pub mod norm;
mod norm_lanes;
pub mod params;
pub mod pool;
pub(crate) mod scratch;
pub mod softmax;
pub mod vmath;

pub use params::{
    Activation, AttentionDims, AttentionOptions, BatchNormOptions, BinaryOp, Conv2dGeometry,
    Conv2dOptions, CrossEntropyOptions, Pool2dGeometry, ProductDims, SoftmaxKind,
};
