//! The CUDA arm of the pooling family's backend-level functions (`crate::backend::pool`):
//! kernels `pool.cu`. No tape here: the ops and their one backward each are in
//! `crate::ops::pool`.
//!
//! Max pooling keeps the arg-max of every output (its index in the plane, an i32 tensor the
//! kernels write as `uint32_t`, planes being under 2^31) for the backward, as the CPU arm does;
//! the backward is a gather (one thread per input element over the outputs whose windows cover
//! it, in output order), so overlapping windows add without atomics and in the CPU's order.

use recycle_kernels::launchers as k;

use super::common::{as_dtype, dptr, empty, grid_stride, p, view, with_float};
use super::launch::{fit_u32, launch};
use crate::backend::Pool2dGeometry;
use crate::{DType, Result, Tensor};

/// A max-pooling kernel over `g`: the forward (`x` → `y`, `argmax`) or the backward (`dy`,
/// `argmax` → `dx`), one thread per element of the larger side.
fn max_pool(g: &Pool2dGeometry, forward: bool, [a, b, c]: [&Tensor; 3]) -> Result<()> {
    const OP: &str = "max_pool2d";
    let (name, n) = if forward {
        ("max_pool2d_fwd", g.n * g.c * g.oh * g.ow)
    } else {
        ("max_pool2d_bwd", g.n * g.c * g.h * g.w)
    };
    let Some(cfg) = grid_stride(n) else {
        return Ok(());
    };
    let f = |what, v| fit_u32(name, what, v);
    let (h, w, oh, ow) = (
        f("the height", g.h)?,
        f("the width", g.w)?,
        f("the output height", g.oh)?,
        f("the output width", g.ow)?,
    );
    let (kernel, stride, padding) = (
        f("the kernel size", g.kernel)?,
        f("the stride", g.stride)?,
        f("the padding", g.padding)?,
    );
    let ctx = view(a, OP)?.ctx;
    with_float!(OP, a.dtype(), |T| {
        let n = n as u64;
        let (a, b, c) = (
            a.cuda_view(OP)?.ptr,
            b.cuda_view(OP)?.ptr,
            c.cuda_view(OP)?.ptr,
        );
        let call = if forward {
            k::max_pool2d_fwd::<T>(
                cfg,
                p(a),
                p(b),
                p(c),
                n,
                h,
                w,
                oh,
                ow,
                kernel,
                stride,
                padding,
            )
        } else {
            k::max_pool2d_bwd::<T>(
                cfg,
                p(a),
                p(b),
                p(c),
                n,
                h,
                w,
                oh,
                ow,
                kernel,
                stride,
                padding,
            )
        };
        launch(&ctx, &call)
    })
}

/// The CUDA arm of [`crate::backend::pool::max_pool2d_fwd`] (validated there): `y` in `x`'s
/// dtype and the arg-max.
pub(crate) fn max_pool2d_fwd(x: &Tensor, g: &Pool2dGeometry) -> Result<(Tensor, Tensor)> {
    let ctx = view(x, "max_pool2d")?.ctx;
    let out_shape = [g.n, g.c, g.oh, g.ow];
    let y = empty(&ctx, x.dtype(), &out_shape)?;
    let argmax = empty(&ctx, DType::I32, &out_shape)?;
    max_pool(g, true, [x, &y, &argmax])?;
    Ok((y, argmax))
}

/// The CUDA arm of [`crate::backend::pool::max_pool2d_bwd`]: `dx` in `dtype`, `dy` cast to it.
pub(crate) fn max_pool2d_bwd(
    dy: &Tensor,
    argmax: &Tensor,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Tensor> {
    let dy = as_dtype(dy, dtype)?;
    let dx = empty(&view(&dy, "max_pool2d")?.ctx, dtype, &[g.n, g.c, g.h, g.w])?;
    max_pool(g, false, [&dy, argmax, &dx])?;
    Ok(dx)
}

/// The CUDA arm of [`crate::backend::pool::global_avg_pool2d_fwd`] (validated there):
/// `[N, C, H, W] -> [N, C]` in `x`'s dtype.
pub(crate) fn global_avg_pool2d_fwd(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "global_avg_pool2d";
    let s = x.shape();
    let (planes, plane) = (s[0] * s[1], s[2] * s[3]);
    let ctx = view(x, OP)?.ctx;
    let y = empty(&ctx, x.dtype(), &[s[0], s[1]])?;
    let Some(cfg) = grid_stride(planes) else {
        return Ok(y);
    };
    let plane = fit_u32("global_avg_pool_fwd", "the plane size", plane)?;
    with_float!(OP, x.dtype(), |T| launch(
        &ctx,
        &k::global_avg_pool_fwd::<T>(cfg, dptr(x, OP)?, dptr(&y, OP)?, planes as u64, plane)
    ))?;
    Ok(y)
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
    let ctx = view(&dy, OP)?.ctx;
    let dx = empty(&ctx, dtype, in_shape)?;
    let n = planes * plane;
    let Some(cfg) = grid_stride(n) else {
        return Ok(dx);
    };
    // The CPU's scale, in f32 on the host.
    let scale = 1.0 / plane as f32;
    let plane = fit_u32("global_avg_pool_bwd", "the plane size", plane)?;
    with_float!(OP, dtype, |T| launch(
        &ctx,
        &k::global_avg_pool_bwd::<T>(cfg, dptr(&dy, OP)?, dptr(&dx, OP)?, n as u64, plane, scale)
    ))?;
    Ok(dx)
}
