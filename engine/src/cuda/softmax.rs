//! The CUDA arm of the softmax family's backend-level functions (`crate::backend::softmax`):
//! the `softmax` kernels (`softmax.cu`). No tape here: the op and its one backward are in
//! `crate::ops::softmax`.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, output, p, rows_cfg, view, with_float};
use super::elementwise::float_inputs;
use super::launch::{fit_u32, KernelCall};
use crate::backend::SoftmaxKind;
use crate::{DType, Result, Tensor};

fn softmax_fwd_plan(
    log: bool,
    x: u64,
    y: u64,
    rows: usize,
    cols: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = if log {
        "log_softmax_fwd"
    } else {
        "softmax_fwd"
    };
    let Some(cfg) = rows_cfg(name, rows, cols)? else {
        return Ok(vec![]);
    };
    let cols = fit_u32(name, "the row length", cols)?;
    with_float!(name, dtype, |T| Ok(vec![if log {
        k::log_softmax_fwd::<T>(cfg, p(x), p(y), cols)
    } else {
        k::softmax_fwd::<T>(cfg, p(x), p(y), cols)
    }]))
}

fn softmax_bwd_plan(
    log: bool,
    y: u64,
    dy: u64,
    dx: u64,
    rows: usize,
    cols: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = if log {
        "log_softmax_bwd"
    } else {
        "softmax_bwd"
    };
    let Some(cfg) = rows_cfg(name, rows, cols)? else {
        return Ok(vec![]);
    };
    let cols = fit_u32(name, "the row length", cols)?;
    with_float!(name, dtype, |T| Ok(vec![if log {
        k::log_softmax_bwd::<T>(cfg, p(y), p(dy), p(dx), cols)
    } else {
        k::softmax_bwd::<T>(cfg, p(y), p(dy), p(dx), cols)
    }]))
}

/// The CUDA arm of [`crate::backend::softmax::softmax_fwd`] (rank and dtype checked there):
/// the output keeps the input's dtype.
pub(crate) fn softmax_fwd(x: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let (op, log) = (kind.op_name(), kind == SoftmaxKind::LogSoftmax);
    let dtype = float_inputs(op, &[x])?;
    let (rows, cols) = rows_and_cols(x);
    let xv = view(x, op)?;
    output(&xv.ctx, dtype, x.shape(), |y| {
        softmax_fwd_plan(log, xv.ptr, y, rows, cols, dtype)
    })
}

/// The CUDA arm of [`crate::backend::softmax::softmax_bwd`]: `dy` is cast to the output's
/// dtype, and so is the gradient.
pub(crate) fn softmax_bwd(y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let (op, log) = (kind.op_name(), kind == SoftmaxKind::LogSoftmax);
    let dtype = float_inputs(op, &[y])?;
    let (rows, cols) = rows_and_cols(y);
    let g = as_dtype(dy, dtype)?;
    let (yv, gv) = (view(y, op)?, view(&g, op)?);
    output(&yv.ctx, dtype, g.shape(), |dx| {
        softmax_bwd_plan(log, yv.ptr, gv.ptr, dx, rows, cols, dtype)
    })
}

/// Rows and row length of a tensor normalised over its last dimension.
fn rows_and_cols(t: &Tensor) -> (usize, usize) {
    let cols = *t.shape().last().unwrap_or(&1);
    (t.elem_count().checked_div(cols).unwrap_or(0), cols)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_shapes_launch_nothing_and_huge_ones_are_errors() {
        assert!(softmax_fwd_plan(false, 1, 2, 0, 10, DType::F32)
            .unwrap()
            .is_empty());
        assert!(softmax_fwd_plan(false, 1, 2, 4, 1 << 33, DType::F32).is_err());
    }
}
