//! The CUDA arm of dropout's backend-level functions (`crate::backend::dropout`): kernel
//! `dropout.cu`. No tape here: the op and its one backward are in `crate::ops::dropout`.
//!
//! The mask is the engine's counter-based rule (`rng::uniform_at(seed, i) >= p` for element `i`
//! of the tensor in row-major order; the kernels share the hash with `rng.rs`, checked bit for
//! bit by the kernels crate's host parity test), so the GPU drops exactly the elements the CPU
//! drops for the same seed, whatever the launch shape. Nothing is stored: the backward applies
//! the same kernel, with the same seed, to the gradient.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, dptr, empty, grid_stride, view};
use super::launch::launch;
use crate::backend::dropout::keep_scale;
use crate::{DType, Error, Result, Tensor};

/// The CUDA arm of [`crate::backend::dropout::dropout_fwd`] and, applied to the gradient, of
/// its backward (`0 < p < 1`): the output in `t`'s dtype.
pub(crate) fn dropout(t: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    const OP: &str = "dropout";
    let xv = view(t, OP)?;
    let y = empty(&xv.ctx, t.dtype(), t.shape())?;
    let Some(cfg) = grid_stride(xv.len) else {
        return Ok(y);
    };
    // The scale the CPU computes (in f32, on the host); index base 0: the whole tensor, its
    // element 0 is index 0 of the mask.
    let (n, scale) = (xv.len as u64, keep_scale(p));
    let call = match t.dtype() {
        DType::F32 => k::dropout_f32(cfg, dptr(t, OP)?, dptr(&y, OP)?, n, p, scale, seed, 0),
        DType::BF16 => k::dropout_bf16(cfg, dptr(t, OP)?, dptr(&y, OP)?, n, p, scale, seed, 0),
        got => {
            return Err(Error::DType {
                op: OP,
                expected: DType::F32,
                got,
            })
        }
    };
    launch(&xv.ctx, &call)?;
    Ok(y)
}

/// The CUDA arm of [`crate::backend::dropout::dropout_bwd`]: the mask of the forward on `dy`
/// read in `dtype`.
pub(crate) fn dropout_bwd(dy: &Tensor, p: f32, seed: u64, dtype: DType) -> Result<Tensor> {
    dropout(&as_dtype(dy, dtype)?, p, seed)
}
