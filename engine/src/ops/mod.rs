//! Ops, one file per family: the tape ops, each computing its forward and recording its one
//! backward through the backend-level functions of `crate::backend` (which hold the plain CPU
//! kernels, the oracle every GPU kernel is checked against, and dispatch by device). Gradient
//! checks live beside each family's tests.
//!
//! Calling convention: `ops::<name>(tape, inputs..., options) -> Result<Var>`.

pub mod activation;
pub mod attention;
pub mod conv;
pub mod dropout;
pub mod elementwise;
pub mod embedding;
pub mod gather;
pub mod layout;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod softmax;

pub use attention::{scaled_dot_product_attention, AttentionOptions};
pub use loss::{cross_entropy, CrossEntropyOptions};
pub use norm::{batch_norm2d, layer_norm, BatchNormOptions};
pub use softmax::{log_softmax, softmax};
