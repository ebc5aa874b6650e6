//! The CUDA arm of the pooling family's backend-level functions (`crate::backend::pool`):
//! kernels `pool.cu`. No tape here: the ops and their one backward each are in
//! `crate::ops::pool`.
//!
//! Max pooling keeps the arg-max of every output (its index in the plane, an i32 tensor the
//! kernels write as `uint32_t`, planes being under 2^31) for the backward, as the CPU arm does;
//! the backward is a gather (one thread per input element over the outputs whose windows cover
//! it, in output order), so overlapping windows add without atomics and in the CPU's order.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, empty, grid_stride_call, output, p, run, view, with_float};
use super::launch::{fit_u32, KernelCall};
use crate::backend::Pool2dGeometry;
use crate::{DType, Result, Tensor};

/// The geometry arguments of the max-pooling kernels, as their `uint32_t` parameters.
struct Geometry {
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    padding: u32,
}

fn geometry(k: &str, g: &Pool2dGeometry) -> Result<Geometry> {
    Ok(Geometry {
        h: fit_u32(k, "the height", g.h)?,
        w: fit_u32(k, "the width", g.w)?,
        oh: fit_u32(k, "the output height", g.oh)?,
        ow: fit_u32(k, "the output width", g.ow)?,
        kernel: fit_u32(k, "the kernel size", g.kernel)?,
        stride: fit_u32(k, "the stride", g.stride)?,
        padding: fit_u32(k, "the padding", g.padding)?,
    })
}

pub(crate) fn max_pool_fwd_plan(
    x: u64,
    y: u64,
    argmax: u64,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let n = g.n * g.c * g.oh * g.ow;
    let q = geometry("max_pool2d_fwd", g)?;
    with_float!("max_pool2d", dtype, |T| Ok(grid_stride_call(n, |c| {
        k::max_pool2d_fwd::<T>(
            c,
            p(x),
            p(y),
            p(argmax),
            n as u64,
            q.h,
            q.w,
            q.oh,
            q.ow,
            q.kernel,
            q.stride,
            q.padding,
        )
    })))
}

pub(crate) fn max_pool_bwd_plan(
    grad: u64,
    argmax: u64,
    dx: u64,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let n = g.n * g.c * g.h * g.w;
    let q = geometry("max_pool2d_bwd", g)?;
    with_float!("max_pool2d", dtype, |T| Ok(grid_stride_call(n, |c| {
        k::max_pool2d_bwd::<T>(
            c,
            p(grad),
            p(argmax),
            p(dx),
            n as u64,
            q.h,
            q.w,
            q.oh,
            q.ow,
            q.kernel,
            q.stride,
            q.padding,
        )
    })))
}

/// The CUDA arm of [`crate::backend::pool::max_pool2d_fwd`] (validated there): `y` in `x`'s
/// dtype and the arg-max.
pub(crate) fn max_pool2d_fwd(x: &Tensor, g: &Pool2dGeometry) -> Result<(Tensor, Tensor)> {
    const OP: &str = "max_pool2d";
    let dtype = x.dtype();
    let xv = view(x, OP)?;
    let out_shape = [g.n, g.c, g.oh, g.ow];
    let y = empty(&xv.ctx, dtype, &out_shape)?;
    let argmax = empty(&xv.ctx, DType::I32, &out_shape)?;
    let plan = max_pool_fwd_plan(xv.ptr, view(&y, OP)?.ptr, view(&argmax, OP)?.ptr, g, dtype)?;
    run(&xv.ctx, &plan)?;
    Ok((y, argmax))
}

/// The CUDA arm of [`crate::backend::pool::max_pool2d_bwd`]: `dx` in `dtype`, `dy` cast to it.
pub(crate) fn max_pool2d_bwd(
    dy: &Tensor,
    argmax: &Tensor,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Tensor> {
    const OP: &str = "max_pool2d";
    let dy = as_dtype(dy, dtype)?;
    let (gv, av) = (view(&dy, OP)?, view(argmax, OP)?);
    output(&gv.ctx, dtype, &[g.n, g.c, g.h, g.w], |dx| {
        max_pool_bwd_plan(gv.ptr, av.ptr, dx, g, dtype)
    })
}

pub(crate) fn avg_pool_fwd_plan(
    x: u64,
    y: u64,
    planes: usize,
    plane: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let plane_len = fit_u32("global_avg_pool_fwd", "the plane size", plane)?;
    with_float!("global_avg_pool2d", dtype, |T| Ok(grid_stride_call(
        planes,
        |c| k::global_avg_pool_fwd::<T>(c, p(x), p(y), planes as u64, plane_len)
    )))
}

pub(crate) fn avg_pool_bwd_plan(
    grad: u64,
    dx: u64,
    planes: usize,
    plane: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let n = planes * plane;
    let plane_len = fit_u32("global_avg_pool_bwd", "the plane size", plane)?;
    // The CPU's scale, in f32 on the host.
    let scale = 1.0 / plane as f32;
    with_float!("global_avg_pool2d", dtype, |T| Ok(grid_stride_call(
        n,
        |c| k::global_avg_pool_bwd::<T>(c, p(grad), p(dx), n as u64, plane_len, scale)
    )))
}

/// The CUDA arm of [`crate::backend::pool::global_avg_pool2d_fwd`] (validated there):
/// `[N, C, H, W] -> [N, C]` in `x`'s dtype.
pub(crate) fn global_avg_pool2d_fwd(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "global_avg_pool2d";
    let dtype = x.dtype();
    let s = x.shape();
    let (planes, plane) = (s[0] * s[1], s[2] * s[3]);
    let xv = view(x, OP)?;
    output(&xv.ctx, dtype, &[s[0], s[1]], |y| {
        avg_pool_fwd_plan(xv.ptr, y, planes, plane, dtype)
    })
}

/// The CUDA arm of [`crate::backend::pool::global_avg_pool2d_bwd`]: `dx` (`in_shape`) in
/// `dtype`, `dy` cast to it.
pub(crate) fn global_avg_pool2d_bwd(
    dy: &Tensor,
    in_shape: &[usize],
    dtype: DType,
) -> Result<Tensor> {
    const OP: &str = "global_avg_pool2d";
    let (planes, plane) = (in_shape[0] * in_shape[1], in_shape[2] * in_shape[3]);
    let dy = as_dtype(dy, dtype)?;
    if plane == 0 {
        return Tensor::zeros(in_shape, dtype, dy.device());
    }
    let gv = view(&dy, OP)?;
    output(&gv.ctx, dtype, in_shape, |dx| {
        avg_pool_bwd_plan(gv.ptr, dx, planes, plane, dtype)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pooling plans on the kernel simulator against the CPU twins (`backend::pool`), which
    /// they match bit for bit (pool.cu): every kernel computes in f32 in the CPU's order and
    /// rounds once to the storage type. Max pooling with overlapping windows (so the backward
    /// adds several gradients into one input), padding, stride, ties and a NaN; global
    /// average pooling over more planes than one block has threads.
    #[test]
    fn plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::pool as cpu;
        use crate::cuda::sim_check::{
            as_stored, assert_bits, download, host_sim, run_plan, sample, upload,
        };
        use recycle_kernels::sim::SimBuffer;
        let Some(sim) = host_sim() else { return };
        // (shape, kernel, stride, padding): ResNet's stem (3, 2, 1) on odd sizes, a dense
        // overlap (3, 1, 1), and disjoint windows with a remainder (2, 2, 0).
        let cases = [
            ([2usize, 5, 17, 19], 3usize, 2usize, 1usize),
            ([1, 3, 9, 10], 3, 1, 1),
            ([2, 3, 7, 9], 2, 2, 0),
        ];
        for (shape, k, st, pad) in cases {
            let g = Pool2dGeometry::new(&shape, k, st, pad).unwrap();
            let (len, out_len) = (g.n * g.c * g.h * g.w, g.n * g.c * g.oh * g.ow);
            for dt in [DType::F32, DType::BF16] {
                let what = format!("max_pool2d {shape:?} k{k} s{st} p{pad} {dt:?}");
                // Quarter steps: many ties inside windows (the first maximum wins); one NaN.
                let mut x: Vec<f32> = sample(len, 41, 3.0)
                    .iter()
                    .map(|v| (v * 4.0).round() / 4.0)
                    .collect();
                x[len / 3] = f32::NAN;
                let x = as_stored(&x, dt);
                let (bx, by) = (upload(&x, dt), upload(&vec![0.0; out_len], dt));
                let barg = SimBuffer::zeros::<u32>(out_len);
                run_plan(
                    sim,
                    &max_pool_fwd_plan(bx.ptr(), by.ptr(), barg.ptr(), &g, dt).unwrap(),
                );
                let mut want = vec![0.0; out_len];
                let mut want_arg = vec![0u32; out_len];
                cpu::max_pool2d_forward_cpu(&x, &g, &mut want, &mut want_arg);
                assert_bits(&format!("{what} forward"), &download(&by, dt), &want);
                let arg = barg.read::<u32>().unwrap();
                assert_eq!(arg, want_arg, "{what}: arg-max");

                let grad = as_stored(&sample(out_len, 42, 1.0), dt);
                let (bg, bdx) = (upload(&grad, dt), upload(&vec![1.0; len], dt));
                run_plan(
                    sim,
                    &max_pool_bwd_plan(bg.ptr(), barg.ptr(), bdx.ptr(), &g, dt).unwrap(),
                );
                let want_dx = cpu::max_pool2d_backward_cpu(&grad, &want_arg, &g);
                // Overlapping windows do land several gradients on one input.
                let mut hits = vec![0u32; len];
                for (o, &a) in want_arg.iter().enumerate() {
                    hits[o / (g.oh * g.ow) * g.h * g.w + a as usize] += 1;
                }
                if st < k {
                    assert!(
                        hits.iter().any(|&h| h > 1),
                        "{what}: no input gets two gradients"
                    );
                }
                assert_bits(
                    &format!("{what} backward"),
                    &download(&bdx, dt),
                    &as_stored(&want_dx, dt),
                );
            }
        }

        // Global average pooling: 600 planes (three blocks of the grid-stride launch) of 7x7.
        let (planes, plane) = (600usize, 49usize);
        for dt in [DType::F32, DType::BF16] {
            let what = format!("global_avg_pool2d {planes}x{plane} {dt:?}");
            let x = as_stored(&sample(planes * plane, 43, 2.0), dt);
            let (bx, by) = (upload(&x, dt), upload(&vec![0.0; planes], dt));
            run_plan(
                sim,
                &avg_pool_fwd_plan(bx.ptr(), by.ptr(), planes, plane, dt).unwrap(),
            );
            let want = cpu::global_avg_pool2d_forward_cpu(&x, planes, plane);
            assert_bits(
                &format!("{what} forward"),
                &download(&by, dt),
                &as_stored(&want, dt),
            );

            let grad = as_stored(&sample(planes, 44, 1.0), dt);
            let (bg, bdx) = (upload(&grad, dt), upload(&vec![0.0; planes * plane], dt));
            run_plan(
                sim,
                &avg_pool_bwd_plan(bg.ptr(), bdx.ptr(), planes, plane, dt).unwrap(),
            );
            let want_dx = cpu::global_avg_pool2d_backward_cpu(&grad, planes, plane);
            assert_bits(
                &format!("{what} backward"),
                &download(&bdx, dt),
                &as_stored(&want_dx, dt),
            );
        }
    }
}
