//! The CUDA arm of the softmax family's backend-level functions (`crate::backend::softmax`):
//! the `softmax` kernels (`softmax.cu`). No tape here: the op and its one backward are in
//! `crate::ops::softmax`.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, empty, p, rows_cfg, run, view, with_float};
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
    let out = empty(&xv.ctx, dtype, x.shape())?;
    run(
        &xv.ctx,
        &softmax_fwd_plan(log, xv.ptr, view(&out, op)?.ptr, rows, cols, dtype)?,
    )?;
    Ok(out)
}

/// The CUDA arm of [`crate::backend::softmax::softmax_bwd`]: `dy` is cast to the output's
/// dtype, and so is the gradient.
pub(crate) fn softmax_bwd(y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let (op, log) = (kind.op_name(), kind == SoftmaxKind::LogSoftmax);
    let dtype = float_inputs(op, &[y])?;
    let (rows, cols) = rows_and_cols(y);
    let g = as_dtype(dy, dtype)?;
    let (yv, gv) = (view(y, op)?, view(&g, op)?);
    let dx = empty(&yv.ctx, dtype, g.shape())?;
    let plan = softmax_bwd_plan(log, yv.ptr, gv.ptr, view(&dx, op)?.ptr, rows, cols, dtype)?;
    run(&yv.ctx, &plan)?;
    Ok(dx)
}

/// Rows and row length of a tensor normalised over its last dimension.
fn rows_and_cols(t: &Tensor) -> (usize, usize) {
    let cols = *t.shape().last().unwrap_or(&1);
    (t.elem_count().checked_div(cols).unwrap_or(0), cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::common::check_all;

    /// Every plan, for both storage types and a few shapes, has a launch shape a GPU runs.
    #[test]
    fn every_plan_has_a_valid_launch_shape() {
        for dt in [DType::F32, DType::BF16] {
            for log in [false, true] {
                check_all(&softmax_fwd_plan(log, 1, 2, 4, 30_522, dt).unwrap());
                check_all(&softmax_bwd_plan(log, 1, 2, 3, 4, 10, dt).unwrap());
            }
        }
    }

    /// The plans run on the kernel simulator against the CPU twins: both storage types, row
    /// lengths from one warp's worth to BERT's vocabulary (strided rows), forward and backward.
    #[test]
    fn plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::softmax as cpu;
        use crate::cuda::sim_check::{
            as_stored, assert_close, download, host_sim, run_plan, sample, upload,
        };
        let Some(sim) = host_sim() else { return };
        for (rows, cols) in [(3usize, 10usize), (2, 1000), (2, 30_522)] {
            for dt in [DType::F32, DType::BF16] {
                // bf16 storage: inputs and outputs rounded to 8 bits of mantissa.
                let (rel, abs) = if dt == DType::BF16 {
                    (1e-2, 1e-6)
                } else {
                    (2e-5, 1e-7)
                };
                let x = sample(rows * cols, 7, 6.0);
                let dy = sample(rows * cols, 8, 1.0);
                for log in [false, true] {
                    let what = format!(
                        "{}softmax {rows}x{cols} {dt:?}",
                        if log { "log_" } else { "" }
                    );
                    let (bx, by) = (upload(&x, dt), upload(&vec![0.0; rows * cols], dt));
                    run_plan(
                        sim,
                        &softmax_fwd_plan(log, bx.ptr(), by.ptr(), rows, cols, dt).unwrap(),
                    );
                    let y = download(&by, dt);
                    let mut want = vec![0.0; rows * cols];
                    let xs = as_stored(&x, dt);
                    if log {
                        cpu::log_softmax_forward_cpu(&xs, cols, &mut want);
                    } else {
                        cpu::softmax_forward_cpu(&xs, cols, &mut want);
                    }
                    assert_close(&format!("{what} forward"), &y, &want, rel, abs);

                    let (bdy, bdx) = (upload(&dy, dt), upload(&vec![0.0; rows * cols], dt));
                    run_plan(
                        sim,
                        &softmax_bwd_plan(log, by.ptr(), bdy.ptr(), bdx.ptr(), rows, cols, dt)
                            .unwrap(),
                    );
                    let dys = as_stored(&dy, dt);
                    let mut want_dx = vec![0.0; rows * cols];
                    if log {
                        cpu::log_softmax_backward_cpu(&y, &dys, cols, &mut want_dx);
                    } else {
                        cpu::softmax_backward_cpu(&y, &dys, cols, &mut want_dx);
                    }
                    // The backward's dot product over the row differs in order: absolute slack
                    // scaled by the row's gradient size.
                    let dx = download(&bdx, dt);
                    assert_close(
                        &format!("{what} backward"),
                        &dx,
                        &want_dx,
                        rel,
                        if dt == DType::BF16 { 1e-3 } else { 1e-5 },
                    );
                }
            }
        }
    }

    #[test]
    fn empty_shapes_launch_nothing_and_huge_ones_are_errors() {
        assert!(softmax_fwd_plan(false, 1, 2, 0, 10, DType::F32)
            .unwrap()
            .is_empty());
        assert!(softmax_fwd_plan(false, 1, 2, 4, 1 << 33, DType::F32).is_err());
    }
}
