//! The CUDA arm of the normalisation family's backend-level functions (`crate::backend::norm`):
//! kernels `layernorm.cu`, `batchnorm.cu`. No tape here: the ops and their one backward each
//! are in `crate::ops::norm`.
//!
//! Layer norm: the kernels take the affine parameters in the activations' type (a bf16
//! activation casts f32 parameters to bf16), keep the per-row mean and 1/std (f32) for the
//! backward, whose parameter gradients are per-block partial sums added in block order (no
//! atomics). Batch norm: parameters and statistics are f32 (cast when they are not); training
//! computes the batch statistics in f64 (split per channel, partials added in order) and
//! updates the running statistics on the device, as the CPU op does on any tape.

use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use super::common::{as_dtype, dptr, empty, rows_cfg, view, with_float};
use super::elementwise::deep_copy;
use super::launch::{fit_u32, launch, shape_err, Ptr};
use super::DeviceBuffer;
use crate::backend::norm::BatchNormStats;
use crate::backend::BatchNormOptions;
use crate::{DType, Result, Tensor};

/// The CUDA arm of [`crate::backend::norm::layer_norm_fwd`] (validated there): `y` in `x`'s
/// dtype, the affine parameters cast to it; `mean` and `rstd` f32.
pub(crate) fn layer_norm_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm";
    let dtype = x.dtype();
    let shape = x.shape();
    let d = *shape.last().expect("validated: rank >= 1");
    let rows = x.elem_count().checked_div(d).unwrap_or(0);
    let ctx = view(x, OP)?.ctx;
    let (w, b) = (as_dtype(weight, dtype)?, as_dtype(bias, dtype)?);
    let y = empty(&ctx, dtype, shape)?;
    let mean = empty(&ctx, DType::F32, &[rows])?;
    let rstd = empty(&ctx, DType::F32, &[rows])?;
    if let Some(cfg) = rows_cfg("layernorm_fwd", rows, d)? {
        let d32 = fit_u32("layernorm_fwd", "the row length", d)?;
        with_float!(OP, dtype, |T| launch(
            &ctx,
            &k::layernorm_fwd::<T>(
                cfg,
                dptr(x, OP)?,
                dptr(&w, OP)?,
                dptr(&b, OP)?,
                dptr(&y, OP)?,
                dptr(&mean, OP)?,
                dptr(&rstd, OP)?,
                d32,
                eps,
            )
        ))?;
    }
    Ok((y, mean, rstd))
}

/// The CUDA arm of [`crate::backend::norm::layer_norm_bwd`]: `(dx, dweight, dbias)`, `dx` in
/// `x`'s dtype (`dy` cast to it), the parameter gradients f32 (the kernels sum in f32): per
/// block partial sums, then their reduce in block order.
pub(crate) fn layer_norm_bwd(
    x: &Tensor,
    dy: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    weight: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm";
    let (dtype, device) = (x.dtype(), x.device());
    let shape = x.shape();
    let d = *shape.last().expect("validated: rank >= 1");
    let rows = x.elem_count().checked_div(d).unwrap_or(0);
    let dy = as_dtype(dy, dtype)?;
    let Some(cfg) = kl::layernorm_backward(rows as u64, d as u64).map_err(shape_err)? else {
        return Ok((
            Tensor::zeros(shape, dtype, device)?,
            Tensor::zeros(&[d], DType::F32, device)?,
            Tensor::zeros(&[d], DType::F32, device)?,
        ));
    };
    let ctx = view(x, OP)?.ctx;
    let w = as_dtype(weight, dtype)?;
    let dx = empty(&ctx, dtype, shape)?;
    let partial = empty(&ctx, DType::F32, &[cfg.partial_len as usize])?;
    let dw = empty(&ctx, DType::F32, &[d])?;
    let db = empty(&ctx, DType::F32, &[d])?;
    let rows = fit_u32("layernorm_bwd", "the number of rows", rows)?;
    let d = fit_u32("layernorm_bwd", "the row length", d)?;
    with_float!(OP, dtype, |T| launch(
        &ctx,
        &k::layernorm_bwd::<T>(
            cfg.main,
            dptr(x, OP)?,
            dptr(&dy, OP)?,
            dptr(mean, OP)?,
            dptr(rstd, OP)?,
            dptr(&w, OP)?,
            dptr(&dx, OP)?,
            dptr(&partial, OP)?,
            rows,
            d,
        )
    ))?;
    launch(
        &ctx,
        &k::layernorm_bwd_reduce(
            cfg.reduce,
            dptr(&partial, OP)?,
            cfg.blocks,
            d,
            dptr(&dw, OP)?,
            dptr(&db, OP)?,
        ),
    )?;
    Ok((dx, dw, db))
}

/// f64 scratch of the batch-norm reductions.
fn scratch_f64(ctx: &std::sync::Arc<super::CudaContext>, len: u64) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(ctx, len as usize * 8)
}

/// `(n, c, hw)` as the kernels' u32 parameters, and `n * hw`, the values per channel.
fn bn_dims(kernel: &str, (n, c, hw): (usize, usize, usize)) -> Result<[u32; 4]> {
    Ok([
        fit_u32(kernel, "the batch size", n)?,
        fit_u32(kernel, "the number of channels", c)?,
        fit_u32(kernel, "the plane size", hw)?,
        fit_u32(kernel, "the values per channel", n * hw)?,
    ])
}

/// The CUDA arm of [`crate::backend::norm::batch_norm2d_fwd`] (validated there, `n * hw >= 2`
/// when training): `y` in `x`'s dtype; parameters and statistics f32 (cast when they are not);
/// in training the batch statistics, and the running ones updated in place on the device.
pub(crate) fn batch_norm2d_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    opts: BatchNormOptions,
) -> Result<(Tensor, Option<BatchNormStats>)> {
    const OP: &str = "batch_norm2d";
    let dtype = x.dtype();
    let shape = x.shape();
    let dims = (shape[0], shape[1], shape[2] * shape[3]);
    let (n, c, hw) = dims;
    let [bn, bc, bhw, count] = bn_dims("batchnorm", dims)?;
    let ctx = view(x, OP)?.ctx;
    let (w, b) = (as_dtype(weight, DType::F32)?, as_dtype(bias, DType::F32)?);
    let y = empty(&ctx, dtype, shape)?;
    // The affine map: from the batch mean and inv_std (`eval` None), or from the running mean
    // and variance (`eval` Some(eps)).
    let affine = |mean: &Tensor, stat: &Tensor, eval: Option<f32>| -> Result<()> {
        let name = if eval.is_some() {
            "batchnorm_eval_fwd"
        } else {
            "batchnorm_fwd"
        };
        let Some(cfg) = kl::planes(name, (n * c) as u64, hw as u64).map_err(shape_err)? else {
            return Ok(());
        };
        let (mean, stat): (Ptr<f32>, Ptr<f32>) = (dptr(mean, OP)?, dptr(stat, OP)?);
        let (weight, bias) = (dptr(&w, OP)?, dptr(&b, OP)?);
        with_float!(OP, dtype, |T| {
            let (x, y) = (dptr::<T>(x, OP)?, dptr::<T>(&y, OP)?);
            launch(
                &ctx,
                &match eval {
                    Some(eps) => {
                        k::batchnorm_eval_fwd(cfg, x, y, mean, stat, weight, bias, bc, bhw, eps)
                    }
                    None => k::batchnorm_fwd(cfg, x, y, mean, stat, weight, bias, bc, bhw),
                },
            )
        })
    };
    if !opts.training {
        let rm = as_dtype(running_mean, DType::F32)?;
        let rv = as_dtype(running_var, DType::F32)?;
        affine(&rm, &rv, Some(opts.eps))?;
        return Ok((y, None));
    }
    let mean = empty(&ctx, DType::F32, &[c])?;
    let var = empty(&ctx, DType::F32, &[c])?;
    let inv_std = empty(&ctx, DType::F32, &[c])?;
    if let Some(r) = kl::batchnorm_reduce(n as u64, c as u64, hw as u64).map_err(shape_err)? {
        let partial = scratch_f64(&ctx, r.scratch_f64)?;
        let part = Ptr::new(partial.ptr());
        with_float!(OP, dtype, |T| launch(
            &ctx,
            &k::batchnorm_stats_partial::<T>(r.partial, dptr(x, OP)?, part, bn, bc, bhw)
        ))?;
        launch(
            &ctx,
            &k::batchnorm_stats_finish(
                r.finish,
                part,
                bc,
                r.splits,
                count,
                opts.eps,
                opts.momentum,
                dptr(&mean, OP)?,
                dptr(&var, OP)?,
                dptr(&inv_std, OP)?,
                // Updated in place.
                Ptr::new(running_mean.cuda_view_mut(OP)?.ptr),
                Ptr::new(running_var.cuda_view_mut(OP)?.ptr),
            ),
        )?;
    }
    affine(&mean, &inv_std, None)?;
    Ok((y, Some(BatchNormStats { mean, inv_std })))
}

/// An f32 copy of `t` on its device that later writes to `t` do not reach.
pub(crate) fn f32_copy(t: &Tensor) -> Result<Tensor> {
    deep_copy(&as_dtype(t, DType::F32)?)
}

/// The CUDA arm of [`crate::backend::norm::batch_norm2d_bwd`]: `(dx, dweight, dbias)`, `dx` in
/// `x`'s dtype (`dy` cast to it), the parameter gradients f32 (the kernels sum in f64): the
/// per-channel sums, then dx.
pub(crate) fn batch_norm2d_bwd(
    x: &Tensor,
    dy: &Tensor,
    mean: &Tensor,
    inv_std: &Tensor,
    weight: &Tensor,
    training: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "batch_norm2d";
    let (dtype, device) = (x.dtype(), x.device());
    let shape = x.shape();
    let dims = (shape[0], shape[1], shape[2] * shape[3]);
    let (n, c, hw) = dims;
    let [bn, bc, bhw, count] = bn_dims("batchnorm", dims)?;
    let dy = as_dtype(dy, dtype)?;
    let Some(r) = kl::batchnorm_reduce(n as u64, c as u64, hw as u64).map_err(shape_err)? else {
        return Ok((
            Tensor::zeros(shape, dtype, device)?,
            Tensor::zeros(&[c], DType::F32, device)?,
            Tensor::zeros(&[c], DType::F32, device)?,
        ));
    };
    let ctx = view(x, OP)?.ctx;
    let w = as_dtype(weight, DType::F32)?;
    let partial = scratch_f64(&ctx, r.scratch_f64)?;
    let part = Ptr::new(partial.ptr());
    let per_channel = || empty(&ctx, DType::F32, &[c]);
    let (sum_dy, sum_dyx, dw, db) = (
        per_channel()?,
        per_channel()?,
        per_channel()?,
        per_channel()?,
    );
    let dx = empty(&ctx, dtype, shape)?;
    let (mean, inv_std) = (dptr(mean, OP)?, dptr(inv_std, OP)?);
    let (sum_dy, sum_dyx) = (dptr(&sum_dy, OP)?, dptr(&sum_dyx, OP)?);
    let dx_cfg = kl::planes("batchnorm_bwd_dx", (n * c) as u64, hw as u64).map_err(shape_err)?;
    with_float!(OP, dtype, |T| {
        let (x, dy) = (dptr::<T>(x, OP)?, dptr::<T>(&dy, OP)?);
        launch(
            &ctx,
            &k::batchnorm_bwd_partial::<T>(r.partial, x, dy, mean, inv_std, part, bn, bc, bhw),
        )?;
        launch(
            &ctx,
            &k::batchnorm_bwd_finish(
                r.finish,
                part,
                bc,
                r.splits,
                sum_dy,
                sum_dyx,
                dptr(&dw, OP)?,
                dptr(&db, OP)?,
            ),
        )?;
        match dx_cfg {
            Some(cfg) => launch(
                &ctx,
                &k::batchnorm_bwd_dx::<T>(
                    cfg,
                    x,
                    dy,
                    mean,
                    inv_std,
                    dptr(&w, OP)?,
                    sum_dy,
                    sum_dyx,
                    dptr(&dx, OP)?,
                    bc,
                    bhw,
                    count,
                    training as i32,
                ),
            ),
            None => Ok(()),
        }
    })?;
    Ok((dx, dw, db))
}
