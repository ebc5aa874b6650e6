//! Inverted dropout (BERT's hidden and attention dropout) at the backend level: [`dropout_fwd`]
//! and [`dropout_bwd`], dispatched by device, with the CPU arm below them and the CUDA arm in
//! `crate::cuda::dropout` (kernel `dropout.cu`).
//!
//! The mask is not stored: it is a pure function of `(seed, element index)`, so backward
//! recomputes it, and the attention op and the CUDA kernel reproduce it exactly. The rule,
//! shared by every implementation, is:
//!
//! > element `i` (its flat row-major index in the tensor, as a `u64`) is **kept** iff
//! > `crate::rng::uniform_at(seed, i) >= p`; a kept value is multiplied by
//! > `scale = 1.0f32 / (1.0f32 - p)` (computed in f32), a dropped one becomes 0.
//!
//! `uniform_at` has 24 bits of resolution, so the drop probability is `p` rounded up to a
//! multiple of 2^-24. The caller chooses a fresh `seed` per step and per dropout site.

//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm keeps the dtype it
//! computes in (the input's).

use rayon::prelude::*;

use super::elementwise::PARALLEL_MIN;
use crate::{rng, DType, Device, Result, Tensor};

/// `x` with each element dropped (0) or kept and scaled by the rule above, for drop
/// probability `p` in `(0, 1)` and `seed`, on `x`'s device.
pub fn dropout_fwd(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    x.expect_float("dropout")?;
    match x.device() {
        Device::Cpu => Tensor::f32(dropout_forward_cpu(&x.read_f32()?, p, seed), x.shape()),
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::dropout::dropout(x, p, seed)),
    }
}

/// The gradient of [`dropout_fwd`]: the same mask and scale applied to the output gradient
/// `dy` (read in `dtype`, the forward input's, on a GPU).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn dropout_bwd(dy: &Tensor, p: f32, seed: u64, dtype: DType) -> Result<Tensor> {
    match dy.device() {
        Device::Cpu => Tensor::f32(dropout_backward_cpu(&dy.read_f32()?, p, seed), dy.shape()),
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::dropout::dropout_bwd(dy, p, seed, dtype))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: the rule and the kernels over slices
// ---------------------------------------------------------------------------------------------

/// Whether element `index` survives dropout with probability `p` under `seed` (the shared rule).
#[inline]
pub fn keep(seed: u64, index: u64, p: f32) -> bool {
    rng::uniform_at(seed, index) >= p
}

/// The factor applied to kept values.
#[inline]
pub fn keep_scale(p: f32) -> f32 {
    1.0 / (1.0 - p)
}

/// `x[i] * scale` where element `i` is kept, 0 where it is dropped.
pub fn dropout_forward_cpu(x: &[f32], p: f32, seed: u64) -> Vec<f32> {
    let scale = keep_scale(p);
    let apply = |(i, &v): (usize, &f32)| {
        if keep(seed, i as u64, p) {
            v * scale
        } else {
            0.0
        }
    };
    if x.len() >= PARALLEL_MIN {
        x.par_iter()
            .enumerate()
            .with_min_len(1 << 12)
            .map(apply)
            .collect()
    } else {
        x.iter().enumerate().map(apply).collect()
    }
}

/// The same mask and scale applied to the output gradient.
pub fn dropout_backward_cpu(g: &[f32], p: f32, seed: u64) -> Vec<f32> {
    dropout_forward_cpu(g, p, seed)
}
