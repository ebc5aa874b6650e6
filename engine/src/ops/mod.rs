//! Ops, one file per family. Each file holds, in this order: the plain CPU kernels over
//! slices (the oracle every GPU kernel is checked against), and the tape ops that compute a
//! forward value and record the backward. Gradient checks live beside each family's tests.
//!
//! Calling convention: `ops::<name>(tape, inputs..., options) -> Result<Var>`.

pub mod gemm;
