//! The CUDA arm of the softmax family's backend-level functions (`crate::backend::softmax`):
//! the `softmax` kernels (`softmax.cu`), one block per row. No tape here: the op and its one
//! backward are in `crate::ops::softmax`.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, dptr, empty, rows_cfg, view, with_float};
use super::elementwise::float_inputs;
use super::launch::{fit_u32, launch};
use crate::backend::SoftmaxKind;
use crate::{Result, Tensor};

/// The CUDA arm of [`crate::backend::softmax::softmax_fwd`] (rank and dtype checked there):
/// the output keeps the input's dtype.
pub(crate) fn softmax_fwd(x: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    rows_kernel(kind, x, None)
}

/// The CUDA arm of [`crate::backend::softmax::softmax_bwd`]: `dy` is cast to the output's
/// dtype, and so is the gradient.
pub(crate) fn softmax_bwd(y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let dy = as_dtype(dy, y.dtype())?;
    rows_kernel(kind, y, Some(&dy))
}

/// The forward over the rows of `x` (`dy` None), or the backward from the output `x` and the
/// gradient `dy`: a new tensor of `x`'s shape and dtype.
fn rows_kernel(kind: SoftmaxKind, x: &Tensor, dy: Option<&Tensor>) -> Result<Tensor> {
    let op = kind.op_name();
    let log = kind == SoftmaxKind::LogSoftmax;
    let dtype = float_inputs(op, &[x])?;
    let cols = *x.shape().last().unwrap_or(&1);
    let rows = x.elem_count().checked_div(cols).unwrap_or(0);
    let ctx = view(x, op)?.ctx;
    let out = empty(&ctx, dtype, x.shape())?;
    let name = match (log, dy.is_some()) {
        (false, false) => "softmax_fwd",
        (true, false) => "log_softmax_fwd",
        (false, true) => "softmax_bwd",
        (true, true) => "log_softmax_bwd",
    };
    let Some(cfg) = rows_cfg(name, rows, cols)? else {
        return Ok(out);
    };
    let cols = fit_u32(name, "the row length", cols)?;
    with_float!(op, dtype, |T| {
        let (x, y) = (dptr::<T>(x, op)?, dptr::<T>(&out, op)?);
        let call = match dy {
            None if log => k::log_softmax_fwd::<T>(cfg, x, y, cols),
            None => k::softmax_fwd::<T>(cfg, x, y, cols),
            Some(dy) if log => k::log_softmax_bwd::<T>(cfg, x, dptr(dy, op)?, y, cols),
            Some(dy) => k::softmax_bwd::<T>(cfg, x, dptr(dy, op)?, y, cols),
        };
        launch(&ctx, &call)
    })?;
    Ok(out)
}
