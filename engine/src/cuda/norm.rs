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

use recycle_kernels::launch::{self as kl, BatchnormReduce, LayernormBackward};
use recycle_kernels::launchers as k;

use super::common::{as_dtype, empty, p, rows_cfg, run, view, with_float};
use super::elementwise::deep_copy;
use super::launch::{fit_u32, shape_err, KernelCall};
use super::DeviceBuffer;
use crate::backend::norm::BatchNormStats;
use crate::backend::BatchNormOptions;
use crate::{DType, Result, Tensor};

// ---------------------------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------------------------

/// The layer-norm forward's device buffers: `y` in `x`'s dtype, the rows' `mean` and `rstd`
/// f32 (kept for the backward).
#[derive(Default)]
pub(crate) struct LayerNormFwd {
    pub x: u64,
    pub weight: u64,
    pub bias: u64,
    pub y: u64,
    pub mean: u64,
    pub rstd: u64,
}

pub(crate) fn layernorm_fwd_plan(
    b: &LayerNormFwd,
    rows: usize,
    d: usize,
    eps: f32,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = "layernorm_fwd";
    let Some(cfg) = rows_cfg(name, rows, d)? else {
        return Ok(vec![]);
    };
    let d = fit_u32(name, "the row length", d)?;
    with_float!("layer_norm", dtype, |T| Ok(vec![k::layernorm_fwd::<T>(
        cfg,
        p(b.x),
        p(b.weight),
        p(b.bias),
        p(b.y),
        p(b.mean),
        p(b.rstd),
        d,
        eps,
    )]))
}

/// The layer-norm backward's device buffers: `dx` (always written), the parameter gradients
/// (f32, overwritten) and `partial` (`cfg.partial_len` f32 of scratch).
pub(crate) struct LayerNormBwd {
    pub x: u64,
    pub dy: u64,
    pub mean: u64,
    pub rstd: u64,
    pub weight: u64,
    pub dx: u64,
    pub partial: u64,
    pub dweight: u64,
    pub dbias: u64,
}

pub(crate) fn layernorm_bwd_plan(
    cfg: &LayernormBackward,
    b: &LayerNormBwd,
    rows: usize,
    d: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let rows = fit_u32("layernorm_bwd", "the number of rows", rows)?;
    let d = fit_u32("layernorm_bwd", "the row length", d)?;
    let main = with_float!("layer_norm", dtype, |T| Ok(k::layernorm_bwd::<T>(
        cfg.main,
        p(b.x),
        p(b.dy),
        p(b.mean),
        p(b.rstd),
        p(b.weight),
        p(b.dx),
        p(b.partial),
        rows,
        d,
    )))?;
    let reduce = k::layernorm_bwd_reduce(
        cfg.reduce,
        p(b.partial),
        cfg.blocks,
        d,
        p(b.dweight),
        p(b.dbias),
    );
    Ok(vec![main, reduce])
}

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
    let v = |t: &Tensor| view(t, OP).map(|v| v.ptr);
    let bufs = LayerNormFwd {
        x: v(x)?,
        weight: v(&w)?,
        bias: v(&b)?,
        y: v(&y)?,
        mean: v(&mean)?,
        rstd: v(&rstd)?,
    };
    run(&ctx, &layernorm_fwd_plan(&bufs, rows, d, eps, dtype)?)?;
    Ok((y, mean, rstd))
}

/// The CUDA arm of [`crate::backend::norm::layer_norm_bwd`]: `(dx, dweight, dbias)`, `dx` in
/// `x`'s dtype (`dy` cast to it), the parameter gradients f32 (the kernels sum in f32).
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
    let v = |t: &Tensor| view(t, OP).map(|v| v.ptr);
    let dx = empty(&ctx, dtype, shape)?;
    let partial = empty(&ctx, DType::F32, &[cfg.partial_len as usize])?;
    let dw = empty(&ctx, DType::F32, &[d])?;
    let db = empty(&ctx, DType::F32, &[d])?;
    let bufs = LayerNormBwd {
        x: v(x)?,
        dy: v(&dy)?,
        mean: v(mean)?,
        rstd: v(rstd)?,
        weight: v(&w)?,
        dx: v(&dx)?,
        partial: v(&partial)?,
        dweight: v(&dw)?,
        dbias: v(&db)?,
    };
    run(&ctx, &layernorm_bwd_plan(&cfg, &bufs, rows, d, dtype)?)?;
    Ok((dx, dw, db))
}

// ---------------------------------------------------------------------------------------------
// Batch norm
// ---------------------------------------------------------------------------------------------

/// The batch-norm training statistics' device buffers: per-channel `mean`, biased `var` and
/// `inv_std` (f32 `[c]`), the running statistics (updated in place) and `partial`
/// (`r.scratch_f64` f64).
pub(crate) struct BatchNormStatsBufs {
    pub x: u64,
    pub partial: u64,
    pub mean: u64,
    pub var: u64,
    pub inv_std: u64,
    pub running_mean: u64,
    pub running_var: u64,
}

pub(crate) fn batchnorm_stats_plan(
    r: &BatchnormReduce,
    b: &BatchNormStatsBufs,
    (n, c, hw): (usize, usize, usize),
    opts: &BatchNormOptions,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let (bn, bc, bhw) = (
        fit_u32("batchnorm_stats_partial", "the batch size", n)?,
        fit_u32("batchnorm_stats_partial", "the number of channels", c)?,
        fit_u32("batchnorm_stats_partial", "the plane size", hw)?,
    );
    let count = fit_u32("batchnorm_stats_finish", "the values per channel", n * hw)?;
    let partial_call = with_float!("batch_norm2d", dtype, |T| Ok(
        k::batchnorm_stats_partial::<T>(r.partial, p(b.x), p(b.partial), bn, bc, bhw)
    ))?;
    let finish = k::batchnorm_stats_finish(
        r.finish,
        p(b.partial),
        bc,
        r.splits,
        count,
        opts.eps,
        opts.momentum,
        p(b.mean),
        p(b.var),
        p(b.inv_std),
        p(b.running_mean),
        p(b.running_var),
    );
    Ok(vec![partial_call, finish])
}

/// The batch-norm affine map's device buffers: `mean` and `stat` are the batch mean and
/// inv_std, or in evaluation the running mean and variance.
pub(crate) struct BatchNormFwd {
    pub x: u64,
    pub y: u64,
    pub mean: u64,
    pub stat: u64,
    pub weight: u64,
    pub bias: u64,
}

/// The affine map: from batch statistics (`eval` None) or from the running ones (`eval`
/// Some(eps)).
pub(crate) fn batchnorm_fwd_plan(
    b: &BatchNormFwd,
    (n, c, hw): (usize, usize, usize),
    eval: Option<f32>,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = if eval.is_some() {
        "batchnorm_eval_fwd"
    } else {
        "batchnorm_fwd"
    };
    let Some(cfg) = kl::planes(name, (n * c) as u64, hw as u64).map_err(shape_err)? else {
        return Ok(vec![]);
    };
    let (c, hw) = (
        fit_u32(name, "the number of channels", c)?,
        fit_u32(name, "the plane size", hw)?,
    );
    let (mean, stat, weight, bias) = (p(b.mean), p(b.stat), p(b.weight), p(b.bias));
    with_float!("batch_norm2d", dtype, |T| {
        let (x, y) = (p::<T>(b.x), p::<T>(b.y));
        Ok(vec![match eval {
            Some(eps) => k::batchnorm_eval_fwd(cfg, x, y, mean, stat, weight, bias, c, hw, eps),
            None => k::batchnorm_fwd(cfg, x, y, mean, stat, weight, bias, c, hw),
        }])
    })
}

/// The batch-norm backward's device buffers: the per-channel sums `sum_dy`, `sum_dyx` and the
/// parameter gradients (f32, overwritten), `dx`, and `partial` (`r.scratch_f64` f64).
pub(crate) struct BatchNormBwd {
    pub x: u64,
    pub dy: u64,
    pub mean: u64,
    pub inv_std: u64,
    pub weight: u64,
    pub partial: u64,
    pub sum_dy: u64,
    pub sum_dyx: u64,
    pub dweight: u64,
    pub dbias: u64,
    pub dx: u64,
}

/// Backward: the per-channel sums, then dx.
pub(crate) fn batchnorm_bwd_plan(
    r: &BatchnormReduce,
    b: &BatchNormBwd,
    (n, c, hw): (usize, usize, usize),
    training: bool,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let (bn, bc, bhw) = (
        fit_u32("batchnorm_bwd_partial", "the batch size", n)?,
        fit_u32("batchnorm_bwd_partial", "the number of channels", c)?,
        fit_u32("batchnorm_bwd_partial", "the plane size", hw)?,
    );
    let count = fit_u32("batchnorm_bwd_dx", "the values per channel", n * hw)?;
    let (mean, inv_std, partial) = (p(b.mean), p(b.inv_std), p(b.partial));
    let (sum_dy, sum_dyx) = (p(b.sum_dy), p(b.sum_dyx));
    let dx_cfg = kl::planes("batchnorm_bwd_dx", (n * c) as u64, hw as u64).map_err(shape_err)?;
    with_float!("batch_norm2d", dtype, |T| {
        let (x, dy) = (p::<T>(b.x), p::<T>(b.dy));
        let mut calls = vec![
            k::batchnorm_bwd_partial::<T>(r.partial, x, dy, mean, inv_std, partial, bn, bc, bhw),
            k::batchnorm_bwd_finish(
                r.finish,
                partial,
                bc,
                r.splits,
                sum_dy,
                sum_dyx,
                p(b.dweight),
                p(b.dbias),
            ),
        ];
        if let Some(cfg) = dx_cfg {
            calls.push(k::batchnorm_bwd_dx::<T>(
                cfg,
                x,
                dy,
                mean,
                inv_std,
                p(b.weight),
                sum_dy,
                sum_dyx,
                p(b.dx),
                bc,
                bhw,
                count,
                training as i32,
            ));
        }
        Ok(calls)
    })
}

/// f64 scratch of the batch-norm reductions.
fn scratch_f64(ctx: &std::sync::Arc<super::CudaContext>, len: u64) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(ctx, len as usize * 8)
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
    let ctx = view(x, OP)?.ctx;
    let v = |t: &Tensor| view(t, OP).map(|v| v.ptr);
    let (w, b) = (as_dtype(weight, DType::F32)?, as_dtype(bias, DType::F32)?);
    let y = empty(&ctx, dtype, shape)?;
    let affine = |mean: &Tensor, stat: &Tensor, eval: Option<f32>| -> Result<()> {
        let bufs = BatchNormFwd {
            x: v(x)?,
            y: v(&y)?,
            mean: v(mean)?,
            stat: v(stat)?,
            weight: v(&w)?,
            bias: v(&b)?,
        };
        run(&ctx, &batchnorm_fwd_plan(&bufs, dims, eval, dtype)?)
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
        let bufs = BatchNormStatsBufs {
            x: v(x)?,
            partial: partial.ptr(),
            mean: v(&mean)?,
            var: v(&var)?,
            inv_std: v(&inv_std)?,
            // Updated in place by the statistics kernel.
            running_mean: running_mean.cuda_view_mut(OP)?.ptr,
            running_var: running_var.cuda_view_mut(OP)?.ptr,
        };
        run(&ctx, &batchnorm_stats_plan(&r, &bufs, dims, &opts, dtype)?)?;
    }
    affine(&mean, &inv_std, None)?;
    Ok((y, Some(BatchNormStats { mean, inv_std })))
}

/// An f32 copy of `t` on its device that later writes to `t` do not reach.
pub(crate) fn f32_copy(t: &Tensor) -> Result<Tensor> {
    deep_copy(&as_dtype(t, DType::F32)?)
}

/// The CUDA arm of [`crate::backend::norm::batch_norm2d_bwd`]: `(dx, dweight, dbias)`, `dx` in
/// `x`'s dtype (`dy` cast to it), the parameter gradients f32 (the kernels sum in f64).
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
    let dy = as_dtype(dy, dtype)?;
    let Some(r) = kl::batchnorm_reduce(n as u64, c as u64, hw as u64).map_err(shape_err)? else {
        return Ok((
            Tensor::zeros(shape, dtype, device)?,
            Tensor::zeros(&[c], DType::F32, device)?,
            Tensor::zeros(&[c], DType::F32, device)?,
        ));
    };
    let ctx = view(x, OP)?.ctx;
    let v = |t: &Tensor| view(t, OP).map(|v| v.ptr);
    let w = as_dtype(weight, DType::F32)?;
    let partial = scratch_f64(&ctx, r.scratch_f64)?;
    let per_channel = || empty(&ctx, DType::F32, &[c]);
    let (sum_dy, sum_dyx, dw, db) = (
        per_channel()?,
        per_channel()?,
        per_channel()?,
        per_channel()?,
    );
    let dx = empty(&ctx, dtype, shape)?;
    let bufs = BatchNormBwd {
        x: v(x)?,
        dy: v(&dy)?,
        mean: v(mean)?,
        inv_std: v(inv_std)?,
        weight: v(&w)?,
        partial: partial.ptr(),
        sum_dy: v(&sum_dy)?,
        sum_dyx: v(&sum_dyx)?,
        dweight: v(&dw)?,
        dbias: v(&db)?,
        dx: v(&dx)?,
    };
    run(&ctx, &batchnorm_bwd_plan(&r, &bufs, dims, training, dtype)?)?;
    Ok((dx, dw, db))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::sim_check::{
        as_stored, assert_bits, assert_close, download, host_sim, run_plan, sample, upload,
    };
    use recycle_kernels::sim::SimBuffer;

    #[test]
    fn empty_layer_norms_launch_nothing_and_i32_is_an_error() {
        let fwd = LayerNormFwd::default();
        assert!(layernorm_fwd_plan(&fwd, 0, 768, 1e-5, DType::F32)
            .unwrap()
            .is_empty());
        assert!(layernorm_fwd_plan(&fwd, 2, 8, 1e-5, DType::I32).is_err());
    }

    fn max_abs(v: &[f32]) -> f32 {
        v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
    }

    /// The layer-norm forward plan on the kernel simulator against the CPU twins
    /// (`layer_norm_stats_reference`, `layer_norm_forward_cpu`), f32 and bf16 storage.
    #[test]
    fn layernorm_forward_on_the_simulator_matches_the_cpu_twins() {
        use crate::backend::norm as cpu;
        let Some(sim) = host_sim() else { return };
        let eps = 1e-5;
        // One block per row: a row shorter than a warp (10), rows that are not a multiple of
        // the block (1000 over 128 threads, 2500 over 512).
        for (rows, d) in [(3usize, 10usize), (5, 1000), (2, 2500)] {
            for dt in [DType::F32, DType::BF16] {
                let what = format!("layernorm {rows}x{d} {dt:?}");
                let n = rows * d;
                let x: Vec<f32> = as_stored(
                    &sample(n, 11, 3.0)
                        .iter()
                        .map(|v| v + 1.5)
                        .collect::<Vec<_>>(),
                    dt,
                );
                let w = as_stored(&sample(d, 12, 1.0), dt);
                let b = as_stored(&sample(d, 13, 0.5), dt);
                let (bx, bw, bb) = (upload(&x, dt), upload(&w, dt), upload(&b, dt));
                {
                    let what = format!("{what} forward");
                    let by = upload(&vec![0.0; n], dt);
                    let (bm, br) = (SimBuffer::zeros::<f32>(rows), SimBuffer::zeros::<f32>(rows));
                    let bufs = LayerNormFwd {
                        x: bx.ptr(),
                        weight: bw.ptr(),
                        bias: bb.ptr(),
                        y: by.ptr(),
                        mean: bm.ptr(),
                        rstd: br.ptr(),
                    };
                    let plan = layernorm_fwd_plan(&bufs, rows, d, eps, dt).unwrap();
                    assert_eq!(plan.len(), 1);
                    run_plan(sim, &plan);
                    let h = &x;
                    let (mean, rstd) = (download(&bm, DType::F32), download(&br, DType::F32));
                    let (want_mean, want_rstd) = cpu::layer_norm_stats_reference(h, d, eps);
                    // Both accumulate in f64 (in different orders, errors ~1e-16 relative)
                    // and round to f32 once: at most one f32 ulp apart.
                    assert_close(
                        &format!("{what} mean"),
                        &mean,
                        &want_mean,
                        f32::EPSILON,
                        0.0,
                    );
                    assert_close(
                        &format!("{what} rstd"),
                        &rstd,
                        &want_rstd,
                        f32::EPSILON,
                        0.0,
                    );
                    // With equal statistics the affine map rounds as the CPU does (layernorm.cu):
                    // the CPU's bits, rounded once to the storage type.
                    let mut want = vec![0.0; n];
                    cpu::layer_norm_forward_cpu(h, d, &mean, &rstd, &w, &b, &mut want);
                    assert_bits(
                        &format!("{what} y"),
                        &download(&by, dt),
                        &as_stored(&want, dt),
                    );
                }
            }
        }
    }

    /// The layer-norm backward plan (per-block partials, then their reduce) on the kernel
    /// simulator against `layer_norm_backward_reference`: more than one partial block, blocks
    /// that loop over rows.
    #[test]
    fn layernorm_backward_on_the_simulator_matches_the_cpu_twin() {
        use crate::backend::norm as cpu;
        let Some(sim) = host_sim() else { return };
        let eps = 1e-5;
        // G = min(rows, 256) blocks, each owning a partial row pair: 3 rows of 1000 (128
        // threads striding), 300 rows of 37 (blocks 0..44 handle two rows each), 2 rows of
        // 3000 (512 threads). The 256 blocks of the second cost seconds on the simulator: f32
        // only there (the storage type changes loads and stores, not the skeleton).
        let cases = [
            (3usize, 1000usize, &[DType::F32, DType::BF16][..]),
            (300, 37, &[DType::F32][..]),
            (2, 3000, &[DType::BF16][..]),
        ];
        for (rows, d, dtypes) in cases {
            let cfg = kl::layernorm_backward(rows as u64, d as u64)
                .unwrap()
                .unwrap();
            assert!(cfg.blocks > 1);
            for &dt in dtypes {
                let what = format!("layernorm {rows}x{d} {dt:?} backward");
                let n = rows * d;
                let x = as_stored(&sample(n, 21, 2.0), dt);
                let dy = as_stored(&sample(n, 22, 1.0), dt);
                let w = as_stored(&sample(d, 23, 1.5), dt);
                let (mean, rstd) = cpu::layer_norm_stats_reference(&x, d, eps);
                let (bx, bdy, bw) = (upload(&x, dt), upload(&dy, dt), upload(&w, dt));
                let (bm, br) = (SimBuffer::from_slice(&mean), SimBuffer::from_slice(&rstd));
                let bdx = upload(&vec![0.0; n], dt);
                let partial = SimBuffer::zeros::<f32>(cfg.partial_len as usize);
                let (bdw, bdb) = (SimBuffer::zeros::<f32>(d), SimBuffer::zeros::<f32>(d));
                let bufs = LayerNormBwd {
                    x: bx.ptr(),
                    dy: bdy.ptr(),
                    mean: bm.ptr(),
                    rstd: br.ptr(),
                    weight: bw.ptr(),
                    dx: bdx.ptr(),
                    partial: partial.ptr(),
                    dweight: bdw.ptr(),
                    dbias: bdb.ptr(),
                };
                let plan = layernorm_bwd_plan(&cfg, &bufs, rows, d, dt).unwrap();
                run_plan(sim, &plan);
                let mut want_dx = vec![0.0; n];
                let (want_dw, want_db) = cpu::layer_norm_backward_reference(
                    &x,
                    &dy,
                    d,
                    &mean,
                    &rstd,
                    &w,
                    Some(&mut want_dx),
                );
                // dx: the row means of g and g * xhat are f32 sums in another order (a block
                // tree, not a sequential loop), each off by a few ulps of the row's scale, so
                // the slack is absolute, 1e-5 of the largest |dx|; bf16 storage adds one
                // rounding of the result (an f32 difference can cross a rounding boundary:
                // one bf16 ulp, 2^-7 relative).
                let rel = if dt == DType::BF16 { 8e-3 } else { 1e-5 };
                let dx = download(&bdx, dt);
                assert_close(
                    &format!("{what} dx"),
                    &dx,
                    &want_dx,
                    rel,
                    1e-5 * max_abs(&want_dx),
                );
                // dweight / dbias (f32 whatever the storage): the same terms, added in another
                // order (per block b the rows b, b + G, ..., then the blocks in order; the CPU
                // adds runs of consecutive rows): 1e-5 relative, and as slack 1e-5 of the
                // largest sum for columns whose sum cancels.
                let (dw, db) = (download(&bdw, DType::F32), download(&bdb, DType::F32));
                assert_close(
                    &format!("{what} dweight"),
                    &dw,
                    &want_dw,
                    1e-5,
                    1e-5 * max_abs(&want_dw),
                );
                assert_close(
                    &format!("{what} dbias"),
                    &db,
                    &want_db,
                    1e-5,
                    1e-5 * max_abs(&want_db),
                );
            }
        }
    }

    /// The batch-norm plans on the kernel simulator against the CPU twins
    /// (`batch_norm2d_*_cpu`, `batch_norm_running_update_cpu`): statistics and the running
    /// update, the forward from batch and from running statistics, the backward in training and
    /// evaluation; f32 and bf16 storage; one split
    /// per channel and two (a split boundary inside a plane).
    #[test]
    fn batchnorm_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::norm as cpu;
        let Some(sim) = host_sim() else { return };
        let opts = BatchNormOptions {
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        };
        let f32s = |b: &SimBuffer| download(b, DType::F32);
        for (dims, splits) in [((3usize, 4usize, 7usize), 1u32), ((3, 2, 11_001), 2)] {
            let (n, c, hw) = dims;
            let r = kl::batchnorm_reduce(n as u64, c as u64, hw as u64)
                .unwrap()
                .unwrap();
            assert_eq!(r.splits, splits);
            let len = n * c * hw;
            for dt in [DType::F32, DType::BF16] {
                let what = format!("batchnorm {dims:?} {dt:?}");
                // Values offset from zero, so the statistics' shift matters.
                let x = as_stored(
                    &sample(len, 31, 2.0)
                        .iter()
                        .map(|v| v + 5.0)
                        .collect::<Vec<_>>(),
                    dt,
                );
                let dy = as_stored(&sample(len, 32, 1.0), dt);
                let w = sample(c, 33, 1.5);
                let b = sample(c, 34, 0.5);
                let old_rm = sample(c, 35, 1.0);
                let old_rv: Vec<f32> = sample(c, 36, 0.5).iter().map(|v| v + 1.0).collect();
                let (bx, bdy) = (upload(&x, dt), upload(&dy, dt));
                let (bw, bb) = (SimBuffer::from_slice(&w), SimBuffer::from_slice(&b));

                // Statistics.
                let partial = SimBuffer::zeros::<f64>(r.scratch_f64 as usize);
                let (bmean, bvar, bis) = (
                    SimBuffer::zeros::<f32>(c),
                    SimBuffer::zeros::<f32>(c),
                    SimBuffer::zeros::<f32>(c),
                );
                let (brm, brv) = (
                    SimBuffer::from_slice(&old_rm),
                    SimBuffer::from_slice(&old_rv),
                );
                let bufs = BatchNormStatsBufs {
                    x: bx.ptr(),
                    partial: partial.ptr(),
                    mean: bmean.ptr(),
                    var: bvar.ptr(),
                    inv_std: bis.ptr(),
                    running_mean: brm.ptr(),
                    running_var: brv.ptr(),
                };
                run_plan(
                    sim,
                    &batchnorm_stats_plan(&r, &bufs, dims, &opts, dt).unwrap(),
                );
                let (mean, var, inv_std) = (f32s(&bmean), f32s(&bvar), f32s(&bis));
                let (want_mean, want_var) = cpu::batch_norm2d_stats_reference(&x, n, c, hw);
                // f64 both: two passes on the CPU, one shifted pass here (errors ~1e-15
                // relative), rounded to f32 once: at most one f32 ulp apart.
                assert_close(
                    &format!("{what} mean"),
                    &mean,
                    &want_mean,
                    f32::EPSILON,
                    0.0,
                );
                assert_close(&format!("{what} var"), &var, &want_var, f32::EPSILON, 0.0);
                // From equal statistics, inv_std and the running update round as the CPU.
                let want_is: Vec<f32> = var.iter().map(|v| 1.0 / (v + opts.eps).sqrt()).collect();
                assert_bits(&format!("{what} inv_std"), &inv_std, &want_is);
                let (want_rm, want_rv) = cpu::batch_norm_running_update_cpu(
                    &old_rm,
                    &old_rv,
                    &mean,
                    &var,
                    n * hw,
                    opts.momentum,
                );
                let (rm, rv) = (f32s(&brm), f32s(&brv));
                assert_bits(&format!("{what} running_mean"), &rm, &want_rm);
                assert_bits(&format!("{what} running_var"), &rv, &want_rv);

                // Forward from the batch statistics (training) and the running ones (eval):
                // from equal statistics, the CPU's bits (batchnorm.cu), rounded once to the
                // storage type.
                for eval in [false, true] {
                    let by = upload(&vec![0.0; len], dt);
                    let (m_ptr, s_ptr) = if eval {
                        (brm.ptr(), brv.ptr())
                    } else {
                        (bmean.ptr(), bis.ptr())
                    };
                    let bufs = BatchNormFwd {
                        x: bx.ptr(),
                        y: by.ptr(),
                        mean: m_ptr,
                        stat: s_ptr,
                        weight: bw.ptr(),
                        bias: bb.ptr(),
                    };
                    let eval_eps = eval.then_some(opts.eps);
                    run_plan(sim, &batchnorm_fwd_plan(&bufs, dims, eval_eps, dt).unwrap());
                    let (m, s) = if eval {
                        (
                            rm.clone(),
                            rv.iter().map(|v| 1.0 / (v + opts.eps).sqrt()).collect(),
                        )
                    } else {
                        (mean.clone(), inv_std.clone())
                    };
                    let mut want = vec![0.0; len];
                    cpu::batch_norm2d_forward_cpu(&x, c, hw, &m, &s, &w, &b, &mut want);
                    assert_bits(
                        &format!("{what} forward (eval {eval})"),
                        &download(&by, dt),
                        &as_stored(&want, dt),
                    );
                }

                // Backward, training (batch statistics) and evaluation (running statistics).
                for training in [true, false] {
                    let what = format!("{what} backward (training {training})");
                    let (m, s): (Vec<f32>, Vec<f32>) = if training {
                        (mean.clone(), inv_std.clone())
                    } else {
                        (
                            rm.clone(),
                            rv.iter().map(|v| 1.0 / (v + opts.eps).sqrt()).collect(),
                        )
                    };
                    let (bm, bs) = (SimBuffer::from_slice(&m), SimBuffer::from_slice(&s));
                    let partial = SimBuffer::zeros::<f64>(r.scratch_f64 as usize);
                    let zeros_c = || SimBuffer::zeros::<f32>(c);
                    let (sdy, sdyx, bdw, bdb) = (zeros_c(), zeros_c(), zeros_c(), zeros_c());
                    let bdx = upload(&vec![0.0; len], dt);
                    let bufs = BatchNormBwd {
                        x: bx.ptr(),
                        dy: bdy.ptr(),
                        mean: bm.ptr(),
                        inv_std: bs.ptr(),
                        weight: bw.ptr(),
                        partial: partial.ptr(),
                        sum_dy: sdy.ptr(),
                        sum_dyx: sdyx.ptr(),
                        dweight: bdw.ptr(),
                        dbias: bdb.ptr(),
                        dx: bdx.ptr(),
                    };
                    let plan = batchnorm_bwd_plan(&r, &bufs, dims, training, dt).unwrap();
                    run_plan(sim, &plan);
                    let mut want_dx = vec![0.0; len];
                    let (want_dw, want_db) = cpu::batch_norm2d_backward_reference(
                        &x,
                        &dy,
                        n,
                        c,
                        hw,
                        &m,
                        &s,
                        &w,
                        training,
                        Some(&mut want_dx),
                    );
                    // dbias: the same f32 values added in f64 in another order, rounded once.
                    let db = f32s(&bdb);
                    assert_close(&format!("{what} dbias"), &db, &want_db, f32::EPSILON, 1e-12);
                    assert_bits(&format!("{what} sum_dy"), &f32s(&sdy), &db);
                    // dweight: the kernel rounds xhat and dy * xhat to f32 before the f64 sum
                    // (the CPU does not), each term off by at most 2 ulps: slack 2^-22 times the
                    // channel's sum of |dy * xhat|.
                    let idx = |b: usize, ch: usize| (b * c + ch) * hw..(b * c + ch + 1) * hw;
                    let abs_terms = (0..c)
                        .map(|ch| {
                            (0..n)
                                .flat_map(|bi| idx(bi, ch))
                                .map(|i| (dy[i] * (x[i] - m[ch]) * s[ch]).abs())
                                .sum::<f32>()
                        })
                        .fold(0.0f32, f32::max);
                    let dw = f32s(&bdw);
                    assert_close(
                        &format!("{what} dweight"),
                        &dw,
                        &want_dw,
                        f32::EPSILON,
                        2.0 * f32::EPSILON * abs_terms,
                    );
                    assert_bits(&format!("{what} sum_dyx"), &f32s(&sdyx), &dw);
                    let dx = download(&bdx, dt);
                    if training {
                        // The CPU computes dx in f64, the kernel in f32: a few roundings, each
                        // within an ulp of the largest term k * (|dy| + |mean dy| + |xhat mean
                        // dy xhat|); bf16 storage adds one rounding of the result (one bf16
                        // ulp, 2^-7 relative, when the f32 values straddle a boundary).
                        let count = (n * hw) as f32;
                        let scale = (0..len)
                            .map(|i| {
                                let ch = (i / hw) % c;
                                let k = (w[ch] * s[ch]).abs();
                                let xhat = ((x[i] - m[ch]) * s[ch]).abs();
                                k * (dy[i].abs()
                                    + (want_db[ch] / count).abs()
                                    + xhat * (want_dw[ch] / count).abs())
                            })
                            .fold(0.0f32, f32::max);
                        let rel = if dt == DType::BF16 {
                            8e-3
                        } else {
                            f32::EPSILON
                        };
                        assert_close(
                            &format!("{what} dx"),
                            &dx,
                            &want_dx,
                            rel,
                            8.0 * f32::EPSILON * scale,
                        );
                    } else {
                        // Evaluation: (weight * inv_std) * dy, as the CPU rounds it.
                        assert_bits(&format!("{what} dx"), &dx, &as_stored(&want_dx, dt));
                    }
                }
            }
        }
    }
}
