//! The CUDA arm of the optimizers: one fused SGDW or AdamW step over a flat parameter buffer,
//! rewriting the bf16 working copy in the same pass (the `optimizers` kernel family,
//! `optimizers.cu`).

use recycle_kernels::launchers as k;

use super::common::{dptr, grid_stride, p, with_float};
use super::common_device;
use super::launch::launch;
use crate::optim::{AdamWStep, SgdwStep};
use crate::{DType, Error, Result, Tensor};

/// The device address of the bf16 working copy the optimizer kernels rewrite (0 without
/// one), after checking that it is bf16, as long as the master and on its GPU.
fn working_ptr(op: &'static str, values: &Tensor, working: Option<&Tensor>) -> Result<u64> {
    let Some(w) = working else {
        return Ok(0);
    };
    w.expect_dtype(op, DType::BF16)?;
    common_device(op, &[values, w])?;
    if w.elem_count() != values.elem_count() {
        return Err(Error::shape(
            op,
            format!(
                "the bf16 working copy has {} elements, the parameter buffer {}",
                w.elem_count(),
                values.elem_count()
            ),
        ));
    }
    Ok(w.cuda_view_mut(op)?.ptr)
}

/// One fused SGDW step over a flat buffer on a GPU; `momentum` is the f32 state on the same
/// GPU (checked by the optimizer); `working`, the bf16 working copy, is rewritten from the
/// updated master in the same launch.
pub(crate) fn sgdw_step(
    values: &Tensor,
    grads: &Tensor,
    momentum: &Tensor,
    working: Option<&Tensor>,
    s: &SgdwStep,
) -> Result<()> {
    const OP: &str = "Sgdw::step";
    common_device(OP, &[values, grads, momentum])?;
    let w = working_ptr(OP, values, working)?;
    // Parameters and state are written in place (`cuda_view_mut`); the gradient is read.
    let (v, m) = (values.cuda_view_mut(OP)?, momentum.cuda_view_mut(OP)?);
    let Some(cfg) = grid_stride(v.len) else {
        return Ok(());
    };
    with_float!(OP, grads.dtype(), |T| launch(
        &v.ctx,
        &k::sgdw_step::<T>(
            cfg,
            p(v.ptr),
            dptr(grads, OP)?,
            p(m.ptr),
            p(w),
            v.len as u64,
            s.lr,
            s.decay,
            s.momentum,
            s.grad_weight,
            s.nesterov as i32,
            s.first as i32,
        )
    ))
}

/// One fused AdamW step over a flat buffer on a GPU, rewriting the bf16 working copy (when
/// there is one) in the same launch.
pub(crate) fn adamw_step(
    values: &Tensor,
    grads: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    working: Option<&Tensor>,
    s: &AdamWStep,
) -> Result<()> {
    const OP: &str = "AdamW::step";
    common_device(OP, &[values, grads, exp_avg, exp_avg_sq])?;
    let w = working_ptr(OP, values, working)?;
    let (v, m1, m2) = (
        values.cuda_view_mut(OP)?,
        exp_avg.cuda_view_mut(OP)?,
        exp_avg_sq.cuda_view_mut(OP)?,
    );
    let Some(cfg) = grid_stride(v.len) else {
        return Ok(());
    };
    with_float!(OP, grads.dtype(), |T| launch(
        &v.ctx,
        &k::adamw_step::<T>(
            cfg,
            p(v.ptr),
            dptr(grads, OP)?,
            p(m1.ptr),
            p(m2.ptr),
            p(w),
            v.len as u64,
            s.decay,
            s.grad_weight,
            s.beta2,
            s.sq_weight,
            s.neg_step_size,
            s.bias_correction2_sqrt,
            s.eps,
        )
    ))
}
