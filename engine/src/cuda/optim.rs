//! The CUDA arm of the optimizers: one fused SGDW or AdamW step over a flat parameter buffer,
//! rewriting the bf16 working copy in the same pass (the `optimizers` kernel family,
//! `optimizers.cu`). **Compiled, not run on a GPU.**

use super::common::{grid_stride, kernel, run, view};
use super::launch::{Arg, KernelCall};
use super::{common_device, kernel_suffix};
use crate::optim::{AdamWStep, SgdwStep};
use crate::{DType, Error, Result, Tensor};

/// `working`: the bf16 working copy the kernel rewrites in the same pass (0: none).
#[allow(clippy::too_many_arguments)]
fn sgdw_plan(
    param: u64,
    grad: u64,
    momentum_buf: u64,
    working: u64,
    n: usize,
    s: &SgdwStep,
    grad_dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("sgdw_step", kernel_suffix("Sgdw::step", grad_dtype)?)?;
    let args = vec![
        Arg::Ptr(param),
        Arg::Ptr(grad),
        Arg::Ptr(momentum_buf),
        Arg::Ptr(working),
        Arg::U64(n as u64),
        Arg::F32(s.lr),
        Arg::F32(s.decay),
        Arg::F32(s.momentum),
        Arg::F32(s.grad_weight),
        Arg::I32(s.nesterov as i32),
        Arg::I32(s.first as i32),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

#[allow(clippy::too_many_arguments)]
fn adamw_plan(
    param: u64,
    grad: u64,
    exp_avg: u64,
    exp_avg_sq: u64,
    working: u64,
    n: usize,
    s: &AdamWStep,
    grad_dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("adamw_step", kernel_suffix("AdamW::step", grad_dtype)?)?;
    let args = vec![
        Arg::Ptr(param),
        Arg::Ptr(grad),
        Arg::Ptr(exp_avg),
        Arg::Ptr(exp_avg_sq),
        Arg::Ptr(working),
        Arg::U64(n as u64),
        Arg::F32(s.decay),
        Arg::F32(s.grad_weight),
        Arg::F32(s.beta2),
        Arg::F32(s.sq_weight),
        Arg::F32(s.neg_step_size),
        Arg::F32(s.bias_correction2_sqrt),
        Arg::F32(s.eps),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

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
    let (p, g, m) = (
        values.cuda_view_mut(OP)?,
        view(grads, OP)?,
        momentum.cuda_view_mut(OP)?,
    );
    run(
        &p.ctx,
        &sgdw_plan(p.ptr, g.ptr, m.ptr, w, p.len, s, grads.dtype())?,
    )
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
    let (p, g, m, v) = (
        values.cuda_view_mut(OP)?,
        view(grads, OP)?,
        exp_avg.cuda_view_mut(OP)?,
        exp_avg_sq.cuda_view_mut(OP)?,
    );
    run(
        &p.ctx,
        &adamw_plan(p.ptr, g.ptr, m.ptr, v.ptr, w, p.len, s, grads.dtype())?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::common::check_all;

    /// Every plan, for both storage types and a few shapes, matches the kernels' ABI.
    #[test]
    fn every_plan_matches_the_kernel_abi() {
        for dt in [DType::F32, DType::BF16] {
            let sg = SgdwStep {
                lr: 0.1,
                decay: 0.99,
                momentum: 0.875,
                grad_weight: 1.0,
                nesterov: false,
                first: true,
            };
            check_all(&sgdw_plan(1, 2, 3, 0, 100, &sg, dt).unwrap());
            check_all(&sgdw_plan(1, 2, 3, 9, 100, &sg, dt).unwrap());
            let ad = AdamWStep {
                decay: 1.0,
                grad_weight: 0.1,
                beta2: 0.999,
                sq_weight: 0.001,
                neg_step_size: -0.01,
                bias_correction2_sqrt: 0.5,
                eps: 1e-8,
            };
            check_all(&adamw_plan(1, 2, 3, 4, 0, 100, &ad, dt).unwrap());
            check_all(&adamw_plan(1, 2, 3, 4, 9, 100, &ad, dt).unwrap());
        }
    }

    /// The optimizer plans hand the kernels the bf16 working copy's address in the parameter
    /// the ABI table calls `working`, and null without one; the pointers before it are the
    /// master, the gradient and the state, in order.
    #[test]
    fn optimizer_plans_pass_the_working_copy() {
        let sg = SgdwStep {
            lr: 0.1,
            decay: 1.0,
            momentum: 0.875,
            grad_weight: 1.0,
            nesterov: false,
            first: false,
        };
        let ad = AdamWStep {
            decay: 1.0,
            grad_weight: 0.1,
            beta2: 0.999,
            sq_weight: 0.001,
            neg_step_size: -0.01,
            bias_correction2_sqrt: 0.5,
            eps: 1e-8,
        };
        for dt in [DType::F32, DType::BF16] {
            for working in [0u64, 0xbf16_0000] {
                let s = &sgdw_plan(1, 2, 3, working, 100, &sg, dt).unwrap()[0];
                let a = &adamw_plan(1, 2, 3, 4, working, 100, &ad, dt).unwrap()[0];
                for (call, before) in [(s, vec![1, 2, 3]), (a, vec![1, 2, 3, 4])] {
                    let slot = recycle_kernels::abi::params(call.kernel)
                        .unwrap()
                        .split(", ")
                        .position(|p| p == "ptr working")
                        .unwrap();
                    assert_eq!(slot, before.len(), "{}", call.kernel);
                    assert_eq!(call.args[slot], Arg::Ptr(working), "{}", call.kernel);
                    let want: Vec<Arg> = before.into_iter().map(Arg::Ptr).collect();
                    assert_eq!(call.args[..slot], want[..], "{}", call.kernel);
                }
            }
        }
    }
}
