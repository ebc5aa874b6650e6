//! The CUDA arm of `max_pool2d` and `global_avg_pool2d` (kernels `pool.cu`). **Compiled, not
//! run on a GPU.**
//!
//! Max pooling keeps the arg-max of every output (u32, its index in the plane) for the
//! backward, as the CPU op does; the backward is a gather (one thread per input element over
//! the outputs whose windows cover it, in output order), so overlapping windows add without
//! atomics and in the CPU's order.

use super::common::{as_dtype, empty, grid_stride, kernel, run, view};
use super::launch::{Arg, KernelCall};
use super::{kernel_suffix, DeviceBuffer};
use crate::ops::pool::Pool2dGeometry;
use crate::{DType, Result, Tape, Tensor, Var};

/// The geometry arguments shared by the max-pooling kernels.
fn geometry_args(k: &str, g: &Pool2dGeometry) -> Result<Vec<Arg>> {
    Ok(vec![
        Arg::u32(k, "the height", g.h)?,
        Arg::u32(k, "the width", g.w)?,
        Arg::u32(k, "the output height", g.oh)?,
        Arg::u32(k, "the output width", g.ow)?,
        Arg::u32(k, "the kernel size", g.kernel)?,
        Arg::u32(k, "the stride", g.stride)?,
        Arg::u32(k, "the padding", g.padding)?,
    ])
}

pub(crate) fn max_pool_fwd_plan(
    x: u64,
    y: u64,
    argmax: u64,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("max_pool2d_fwd", kernel_suffix("max_pool2d", dtype)?)?;
    let n = g.n * g.c * g.oh * g.ow;
    let mut args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::Ptr(argmax),
        Arg::U64(n as u64),
    ];
    args.extend(geometry_args(k, g)?);
    Ok(grid_stride(k, n, args).into_iter().collect())
}

pub(crate) fn max_pool_bwd_plan(
    grad: u64,
    argmax: u64,
    dx: u64,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("max_pool2d_bwd", kernel_suffix("max_pool2d", dtype)?)?;
    let n = g.n * g.c * g.h * g.w;
    let mut args = vec![
        Arg::Ptr(grad),
        Arg::Ptr(argmax),
        Arg::Ptr(dx),
        Arg::U64(n as u64),
    ];
    args.extend(geometry_args(k, g)?);
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// The CUDA arm of `max_pool2d` (validated by the caller).
pub(crate) fn max_pool2d(tape: &Tape, x: &Var, g: Pool2dGeometry) -> Result<Var> {
    const OP: &str = "max_pool2d";
    let xt = x.tensor();
    let dtype = xt.dtype();
    let ctx = view(xt, OP)?.ctx;
    let y = empty(&ctx, dtype, &[g.n, g.c, g.oh, g.ow])?;
    let argmax = DeviceBuffer::alloc(&ctx, g.n * g.c * g.oh * g.ow * 4)?;
    run(
        &ctx,
        &max_pool_fwd_plan(
            view(xt, OP)?.ptr,
            view(&y, OP)?.ptr,
            argmax.ptr(),
            &g,
            dtype,
        )?,
    )?;
    let in_shape = xt.shape().to_vec();
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |grad, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let grad = as_dtype(grad, dtype)?;
            let dx = empty(&ctx, dtype, &in_shape)?;
            let plan = max_pool_bwd_plan(
                view(&grad, OP)?.ptr,
                argmax.ptr(),
                view(&dx, OP)?.ptr,
                &g,
                dtype,
            )?;
            run(&ctx, &plan)?;
            Ok(vec![Some(dx)])
        }),
    ))
}

pub(crate) fn avg_pool_fwd_plan(
    x: u64,
    y: u64,
    planes: usize,
    plane: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(
        "global_avg_pool_fwd",
        kernel_suffix("global_avg_pool2d", dtype)?,
    )?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::U64(planes as u64),
        Arg::u32(k, "the plane size", plane)?,
    ];
    Ok(grid_stride(k, planes, args).into_iter().collect())
}

pub(crate) fn avg_pool_bwd_plan(
    grad: u64,
    dx: u64,
    planes: usize,
    plane: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(
        "global_avg_pool_bwd",
        kernel_suffix("global_avg_pool2d", dtype)?,
    )?;
    let n = planes * plane;
    let args = vec![
        Arg::Ptr(grad),
        Arg::Ptr(dx),
        Arg::U64(n as u64),
        Arg::u32(k, "the plane size", plane)?,
        // The CPU's scale, in f32 on the host.
        Arg::F32(1.0 / plane as f32),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// The CUDA arm of `global_avg_pool2d` (validated by the caller): `[N, C, H, W] -> [N, C]`.
pub(crate) fn global_avg_pool2d(tape: &Tape, x: &Var) -> Result<Var> {
    const OP: &str = "global_avg_pool2d";
    let xt = x.tensor();
    let dtype = xt.dtype();
    let s = xt.shape().to_vec();
    let (planes, plane) = (s[0] * s[1], s[2] * s[3]);
    let ctx = view(xt, OP)?.ctx;
    let y = empty(&ctx, dtype, &[s[0], s[1]])?;
    run(
        &ctx,
        &avg_pool_fwd_plan(view(xt, OP)?.ptr, view(&y, OP)?.ptr, planes, plane, dtype)?,
    )?;
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |grad, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let grad = as_dtype(grad, dtype)?;
            if plane == 0 {
                return Ok(vec![Some(Tensor::zeros(&s, dtype, grad.device())?)]);
            }
            let dx = empty(&ctx, dtype, &s)?;
            let plan = avg_pool_bwd_plan(
                view(&grad, OP)?.ptr,
                view(&dx, OP)?.ptr,
                planes,
                plane,
                dtype,
            )?;
            run(&ctx, &plan)?;
            Ok(vec![Some(dx)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_plans_match_the_kernel_abi() {
        let g = Pool2dGeometry::new(&[8, 64, 112, 112], 3, 2, 1).unwrap();
        for dt in [DType::F32, DType::BF16] {
            for plan in [
                max_pool_fwd_plan(1, 2, 3, &g, dt).unwrap(),
                max_pool_bwd_plan(1, 2, 3, &g, dt).unwrap(),
                avg_pool_fwd_plan(1, 2, 8 * 512, 49, dt).unwrap(),
                avg_pool_bwd_plan(1, 2, 8 * 512, 49, dt).unwrap(),
            ] {
                assert_eq!(plan.len(), 1);
                plan[0]
                    .check()
                    .unwrap_or_else(|e| panic!("{}: {e}", plan[0].kernel));
            }
        }
        assert!(avg_pool_fwd_plan(1, 2, 0, 49, DType::F32)
            .unwrap()
            .is_empty());
    }
}
