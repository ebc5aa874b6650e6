//! The CUDA arm of `layer_norm` and `batch_norm2d` (kernels `layernorm.cu`, `batchnorm.cu`).
//! **Compiled, not run on a GPU.**
//!
//! Layer norm: the kernels take the affine parameters in the activations' type (a bf16
//! activation casts f32 parameters to bf16), keep the per-row mean and 1/std (f32) for the
//! backward, whose parameter gradients are per-block partial sums added in block order (no
//! atomics). Batch norm: parameters and statistics are f32 (cast when they are not); training
//! computes the batch statistics in f64 (split per channel, partials added in order) and
//! updates the running statistics on the device, as the CPU op does on any tape.

use recycle_kernels::launch::{self as kl, BatchnormReduce, LayernormBackward};
use recycle_kernels::names;

use super::common::{as_dtype, empty, kernel, rows_cfg, run, view};
use super::elementwise::{cast, deep_copy};
use super::launch::{shape_err, Arg, KernelCall};
use super::{common_device, kernel_suffix, DeviceBuffer};
use crate::ops::norm::BatchNormOptions;
use crate::{DType, Device, Result, Tape, Tensor, Var};

// ---------------------------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------------------------

#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_fwd_plan(
    x: u64,
    weight: u64,
    bias: u64,
    y: u64,
    mean: u64,
    rstd: u64,
    rows: usize,
    d: usize,
    eps: f32,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("layernorm_fwd", kernel_suffix("layer_norm", dtype)?)?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(0), // no fused residual
        Arg::Ptr(0),
        Arg::Ptr(weight),
        Arg::Ptr(bias),
        Arg::Ptr(y),
        Arg::Ptr(mean),
        Arg::Ptr(rstd),
        Arg::u32(k, "the row length", d)?,
        Arg::F32(eps),
    ];
    Ok(rows_cfg(k, rows, d)?
        .map(|cfg| KernelCall::new(k, cfg, args))
        .into_iter()
        .collect())
}

/// dx (always written) and the parameter gradients (f32, overwritten) from `partial`
/// (`cfg.partial_len` f32 of scratch).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layernorm_bwd_plan(
    cfg: &LayernormBackward,
    x: u64,
    dy: u64,
    mean: u64,
    rstd: u64,
    weight: u64,
    dx: u64,
    partial: u64,
    dweight: u64,
    dbias: u64,
    rows: usize,
    d: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("layernorm_bwd", kernel_suffix("layer_norm", dtype)?)?;
    let r = names::layernorm::layernorm_bwd_reduce;
    Ok(vec![
        KernelCall::new(
            k,
            cfg.main,
            vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(0), // no residual gradient to add
                Arg::Ptr(mean),
                Arg::Ptr(rstd),
                Arg::Ptr(weight),
                Arg::Ptr(dx),
                Arg::Ptr(partial),
                Arg::u32(k, "the number of rows", rows)?,
                Arg::u32(k, "the row length", d)?,
            ],
        ),
        KernelCall::new(
            r,
            cfg.reduce,
            vec![
                Arg::Ptr(partial),
                Arg::U32(cfg.blocks),
                Arg::u32(r, "the row length", d)?,
                Arg::Ptr(dweight),
                Arg::Ptr(dbias),
                Arg::I32(0),
            ],
        ),
    ])
}

/// An f32 tensor of `len` zeros or `dtype` zeros, for the gradients of empty shapes.
fn zeros(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
    Tensor::zeros(shape, dtype, device)
}

/// `t` (f32 on the device) in `dtype`.
fn to(t: Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == DType::F32 {
        Ok(t)
    } else {
        cast(&t, dtype)
    }
}

/// The CUDA arm of `layer_norm` (validated by the caller).
pub(crate) fn layer_norm(tape: &Tape, x: &Var, weight: &Var, bias: &Var, eps: f32) -> Result<Var> {
    const OP: &str = "layer_norm";
    common_device(OP, &[x.tensor(), weight.tensor(), bias.tensor()])?;
    let xt = x.tensor().clone();
    let dtype = xt.dtype();
    let shape = xt.shape().to_vec();
    let d = *shape.last().expect("validated: rank >= 1");
    let rows = xt.elem_count().checked_div(d).unwrap_or(0);
    let device = xt.device();
    let ctx = view(&xt, OP)?.ctx;
    let (w, b) = (
        as_dtype(weight.tensor(), dtype)?,
        as_dtype(bias.tensor(), dtype)?,
    );
    let y = empty(&ctx, dtype, &shape)?;
    let mean = empty(&ctx, DType::F32, &[rows])?;
    let rstd = empty(&ctx, DType::F32, &[rows])?;
    let v = |t: &Tensor| view(t, OP).map(|v| v.ptr);
    let plan = layernorm_fwd_plan(
        v(&xt)?,
        v(&w)?,
        v(&b)?,
        v(&y)?,
        v(&mean)?,
        v(&rstd)?,
        rows,
        d,
        eps,
        dtype,
    )?;
    run(&ctx, &plan)?;
    let (w_dtype, b_dtype) = (weight.tensor().dtype(), bias.tensor().dtype());
    Ok(tape.record(
        y,
        &[x, weight, bias],
        Box::new(move |g, needs| {
            let dy = as_dtype(g, dtype)?;
            let Some(cfg) = kl::layernorm_backward(rows as u64, d as u64).map_err(shape_err)?
            else {
                return Ok(vec![
                    needs[0].then(|| zeros(&shape, dtype, device)).transpose()?,
                    needs[1].then(|| zeros(&[d], w_dtype, device)).transpose()?,
                    needs[2].then(|| zeros(&[d], b_dtype, device)).transpose()?,
                ]);
            };
            let dx = empty(&ctx, dtype, &shape)?;
            let partial = empty(&ctx, DType::F32, &[cfg.partial_len as usize])?;
            let dw = empty(&ctx, DType::F32, &[d])?;
            let db = empty(&ctx, DType::F32, &[d])?;
            let plan = layernorm_bwd_plan(
                &cfg,
                v(&xt)?,
                v(&dy)?,
                v(&mean)?,
                v(&rstd)?,
                v(&w)?,
                v(&dx)?,
                v(&partial)?,
                v(&dw)?,
                v(&db)?,
                rows,
                d,
                dtype,
            )?;
            run(&ctx, &plan)?;
            Ok(vec![
                needs[0].then_some(dx),
                needs[1].then(|| to(dw, w_dtype)).transpose()?,
                needs[2].then(|| to(db, b_dtype)).transpose()?,
            ])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Batch norm
// ---------------------------------------------------------------------------------------------

/// Training statistics: per-channel mean, biased variance and inv_std (f32 `[c]`), and the
/// running statistics updated in place. `partial` holds `r.scratch_f64` f64.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_stats_plan(
    r: &BatchnormReduce,
    x: u64,
    partial: u64,
    mean: u64,
    var: u64,
    inv_std: u64,
    running_mean: u64,
    running_var: u64,
    (n, c, hw): (usize, usize, usize),
    opts: &BatchNormOptions,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(
        "batchnorm_stats_partial",
        kernel_suffix("batch_norm2d", dtype)?,
    )?;
    let f = names::batchnorm::batchnorm_stats_finish;
    Ok(vec![
        KernelCall::new(
            k,
            r.partial,
            vec![
                Arg::Ptr(x),
                Arg::Ptr(partial),
                Arg::u32(k, "the batch size", n)?,
                Arg::u32(k, "the number of channels", c)?,
                Arg::u32(k, "the plane size", hw)?,
            ],
        ),
        KernelCall::new(
            f,
            r.finish,
            vec![
                Arg::Ptr(partial),
                Arg::u32(f, "the number of channels", c)?,
                Arg::U32(r.splits),
                Arg::u32(f, "the values per channel", n * hw)?,
                Arg::F32(opts.eps),
                Arg::F32(opts.momentum),
                Arg::I32(1),
                Arg::Ptr(mean),
                Arg::Ptr(var),
                Arg::Ptr(inv_std),
                Arg::Ptr(running_mean),
                Arg::Ptr(running_var),
            ],
        ),
    ])
}

/// The affine map: from batch statistics (`eval` None) or from the running ones (`eval`
/// Some(eps): `mean`/`stat` are the running mean and variance).
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_fwd_plan(
    x: u64,
    y: u64,
    mean: u64,
    stat: u64,
    weight: u64,
    bias: u64,
    (n, c, hw): (usize, usize, usize),
    eval: Option<f32>,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let s = kernel_suffix("batch_norm2d", dtype)?;
    let k = kernel(
        if eval.is_some() {
            "batchnorm_eval_fwd"
        } else {
            "batchnorm_fwd"
        },
        s,
    )?;
    let mut args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::Ptr(mean),
        Arg::Ptr(stat),
        Arg::Ptr(weight),
        Arg::Ptr(bias),
        Arg::u32(k, "the number of channels", c)?,
        Arg::u32(k, "the plane size", hw)?,
    ];
    if let Some(eps) = eval {
        args.push(Arg::F32(eps));
    }
    Ok(kl::planes(k, (n * c) as u64, hw as u64)
        .map_err(shape_err)?
        .map(|cfg| KernelCall::new(k, cfg, args))
        .into_iter()
        .collect())
}

/// Backward: the per-channel sums (into `sum_dy`, `sum_dyx`, and the parameter gradients
/// `dweight`, `dbias`, f32 overwritten), then dx.
#[allow(clippy::too_many_arguments)]
pub(crate) fn batchnorm_bwd_plan(
    r: &BatchnormReduce,
    x: u64,
    dy: u64,
    mean: u64,
    inv_std: u64,
    weight: u64,
    partial: u64,
    sums: (u64, u64),
    dweight: u64,
    dbias: u64,
    dx: u64,
    (n, c, hw): (usize, usize, usize),
    training: bool,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let s = kernel_suffix("batch_norm2d", dtype)?;
    let kp = kernel("batchnorm_bwd_partial", s)?;
    let kf = names::batchnorm::batchnorm_bwd_finish;
    let kx = kernel("batchnorm_bwd_dx", s)?;
    let mut calls = vec![
        KernelCall::new(
            kp,
            r.partial,
            vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(mean),
                Arg::Ptr(inv_std),
                Arg::Ptr(partial),
                Arg::u32(kp, "the batch size", n)?,
                Arg::u32(kp, "the number of channels", c)?,
                Arg::u32(kp, "the plane size", hw)?,
            ],
        ),
        KernelCall::new(
            kf,
            r.finish,
            vec![
                Arg::Ptr(partial),
                Arg::u32(kf, "the number of channels", c)?,
                Arg::U32(r.splits),
                Arg::Ptr(sums.0),
                Arg::Ptr(sums.1),
                Arg::Ptr(dweight),
                Arg::Ptr(dbias),
                Arg::I32(0),
            ],
        ),
    ];
    if let Some(cfg) = kl::planes(kx, (n * c) as u64, hw as u64).map_err(shape_err)? {
        calls.push(KernelCall::new(
            kx,
            cfg,
            vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(mean),
                Arg::Ptr(inv_std),
                Arg::Ptr(weight),
                Arg::Ptr(sums.0),
                Arg::Ptr(sums.1),
                Arg::Ptr(dx),
                Arg::u32(kx, "the number of channels", c)?,
                Arg::u32(kx, "the plane size", hw)?,
                Arg::u32(kx, "the values per channel", n * hw)?,
                Arg::I32(training as i32),
            ],
        ));
    }
    Ok(calls)
}

/// f64 scratch of the batch-norm reductions.
fn scratch_f64(ctx: &std::sync::Arc<super::CudaContext>, len: u64) -> Result<DeviceBuffer> {
    DeviceBuffer::alloc(ctx, len as usize * 8)
}

/// The CUDA arm of `batch_norm2d` (validated by the caller, `n * hw >= 2` when training).
pub(crate) fn batch_norm2d(
    tape: &Tape,
    x: &Var,
    weight: &Var,
    bias: &Var,
    running_mean: &Tensor,
    running_var: &Tensor,
    opts: BatchNormOptions,
) -> Result<Var> {
    const OP: &str = "batch_norm2d";
    common_device(
        OP,
        &[
            x.tensor(),
            weight.tensor(),
            bias.tensor(),
            running_mean,
            running_var,
        ],
    )?;
    let xt = x.tensor().clone();
    let dtype = xt.dtype();
    let shape = xt.shape().to_vec();
    let dims = (shape[0], shape[1], shape[2] * shape[3]);
    let (n, c, hw) = dims;
    let device = xt.device();
    let ctx = view(&xt, OP)?.ctx;
    let v = |t: &Tensor| view(t, OP).map(|v| v.ptr);
    let (w, b) = (
        as_dtype(weight.tensor(), DType::F32)?,
        as_dtype(bias.tensor(), DType::F32)?,
    );
    let y = empty(&ctx, dtype, &shape)?;
    // The statistics the backward uses: the batch's (training) or the running ones (eval).
    let (mean, inv_std) = if opts.training {
        let mean = empty(&ctx, DType::F32, &[c])?;
        let var = empty(&ctx, DType::F32, &[c])?;
        let inv_std = empty(&ctx, DType::F32, &[c])?;
        if let Some(r) = kl::batchnorm_reduce(n as u64, c as u64, hw as u64).map_err(shape_err)? {
            let partial = scratch_f64(&ctx, r.scratch_f64)?;
            let plan = batchnorm_stats_plan(
                &r,
                v(&xt)?,
                partial.ptr(),
                v(&mean)?,
                v(&var)?,
                v(&inv_std)?,
                // Updated in place by the statistics kernel.
                running_mean.cuda_view_mut(OP)?.ptr,
                running_var.cuda_view_mut(OP)?.ptr,
                dims,
                &opts,
                dtype,
            )?;
            run(&ctx, &plan)?;
        }
        let plan = batchnorm_fwd_plan(
            v(&xt)?,
            v(&y)?,
            v(&mean)?,
            v(&inv_std)?,
            v(&w)?,
            v(&b)?,
            dims,
            None,
            dtype,
        )?;
        run(&ctx, &plan)?;
        (Some(mean), Some(inv_std))
    } else {
        let (rm, rv) = (
            as_dtype(running_mean, DType::F32)?,
            as_dtype(running_var, DType::F32)?,
        );
        let plan = batchnorm_fwd_plan(
            v(&xt)?,
            v(&y)?,
            v(&rm)?,
            v(&rv)?,
            v(&w)?,
            v(&b)?,
            dims,
            Some(opts.eps),
            dtype,
        )?;
        run(&ctx, &plan)?;
        (None, None)
    };
    // Evaluation: the running statistics as they are now (the backward may run after they
    // changed), copied only when a backward can need them.
    let eval_stats = if !opts.training && tape.is_recording() {
        Some((
            deep_copy(&as_dtype(running_mean, DType::F32)?)?,
            running_var.to_vec_f32()?,
        ))
    } else {
        None
    };
    let training = opts.training;
    let eps = opts.eps;
    let (w_dtype, b_dtype) = (weight.tensor().dtype(), bias.tensor().dtype());
    Ok(tape.record(
        y,
        &[x, weight, bias],
        Box::new(move |g, needs| {
            let dy = as_dtype(g, dtype)?;
            let Some(r) = kl::batchnorm_reduce(n as u64, c as u64, hw as u64).map_err(shape_err)?
            else {
                return Ok(vec![
                    needs[0].then(|| zeros(&shape, dtype, device)).transpose()?,
                    needs[1].then(|| zeros(&[c], w_dtype, device)).transpose()?,
                    needs[2].then(|| zeros(&[c], b_dtype, device)).transpose()?,
                ]);
            };
            let (mean, inv_std) = match (&mean, &inv_std, &eval_stats) {
                (Some(m), Some(s), _) => (m.clone(), s.clone()),
                (_, _, Some((m, var))) => {
                    // inv_std as the CPU computes it, in f32 on the host (a [c] vector).
                    let s: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
                    (m.clone(), Tensor::from_slice(&s, &[c], device)?)
                }
                _ => unreachable!("training keeps batch statistics, eval running ones"),
            };
            let partial = scratch_f64(&ctx, r.scratch_f64)?;
            let sum_dy = empty(&ctx, DType::F32, &[c])?;
            let sum_dyx = empty(&ctx, DType::F32, &[c])?;
            let dw = empty(&ctx, DType::F32, &[c])?;
            let db = empty(&ctx, DType::F32, &[c])?;
            let dx = empty(&ctx, dtype, &shape)?;
            let plan = batchnorm_bwd_plan(
                &r,
                v(&xt)?,
                v(&dy)?,
                v(&mean)?,
                v(&inv_std)?,
                v(&w)?,
                partial.ptr(),
                (v(&sum_dy)?, v(&sum_dyx)?),
                v(&dw)?,
                v(&db)?,
                v(&dx)?,
                dims,
                training,
                dtype,
            )?;
            run(&ctx, &plan)?;
            Ok(vec![
                needs[0].then_some(dx),
                needs[1].then(|| to(dw, w_dtype)).transpose()?,
                needs[2].then(|| to(db, b_dtype)).transpose()?,
            ])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_all(calls: &[KernelCall]) {
        assert!(!calls.is_empty());
        for c in calls {
            c.check().unwrap_or_else(|e| panic!("{}: {e}", c.kernel));
        }
    }

    #[test]
    fn norm_plans_match_the_kernel_abi() {
        for dt in [DType::F32, DType::BF16] {
            check_all(&layernorm_fwd_plan(1, 2, 3, 4, 5, 6, 512, 768, 1e-12, dt).unwrap());
            let cfg = kl::layernorm_backward(512, 768).unwrap().unwrap();
            check_all(&layernorm_bwd_plan(&cfg, 1, 2, 3, 4, 5, 6, 7, 8, 9, 512, 768, dt).unwrap());
            let dims = (8, 64, 56 * 56);
            let r = kl::batchnorm_reduce(8, 64, 56 * 56).unwrap().unwrap();
            let opts = BatchNormOptions::default();
            let plan = batchnorm_stats_plan(&r, 1, 2, 3, 4, 5, 6, 7, dims, &opts, dt).unwrap();
            assert_eq!(plan.len(), 2);
            check_all(&plan);
            check_all(&batchnorm_fwd_plan(1, 2, 3, 4, 5, 6, dims, None, dt).unwrap());
            check_all(&batchnorm_fwd_plan(1, 2, 3, 4, 5, 6, dims, Some(1e-5), dt).unwrap());
            for training in [false, true] {
                let plan =
                    batchnorm_bwd_plan(&r, 1, 2, 3, 4, 5, 6, (7, 8), 9, 10, 11, dims, training, dt)
                        .unwrap();
                assert_eq!(plan.len(), 3);
                check_all(&plan);
            }
        }
        assert!(
            layernorm_fwd_plan(1, 2, 3, 4, 5, 6, 0, 768, 1e-5, DType::F32)
                .unwrap()
                .is_empty()
        );
        assert!(layernorm_fwd_plan(1, 2, 3, 4, 5, 6, 2, 8, 1e-5, DType::I32).is_err());
    }
}
