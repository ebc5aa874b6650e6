//! The CUDA arm of the cross-entropy's backend-level functions (`crate::backend::loss`): the
//! `cross_entropy` kernel family. No tape here: the op and its one backward are in
//! `crate::ops::loss`. The fused distillation loss has its own file, `kd_loss.rs`.

use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use super::common::{dptr, empty, host_i32, on_gpu_i32, rows_cfg, view, with_float};
use super::elementwise::float_inputs;
use super::launch::{fit_u32, launch};
use crate::backend::loss::{cross_entropy_check_labels_cpu, CrossEntropySaved};
use crate::backend::CrossEntropyOptions;
use crate::{DType, Result, Tensor};

/// The CUDA arm of [`crate::backend::loss::cross_entropy_fwd`] (shapes and options validated
/// there): per-row lse and loss, then the mean over the kept rows. The labels are checked on
/// the host (copied back when they are on the GPU), as the CPU arm does.
pub(crate) fn cross_entropy_fwd(
    logits: &Tensor,
    labels: &Tensor,
    opts: &CrossEntropyOptions,
) -> Result<(Tensor, CrossEntropySaved)> {
    const OP: &str = "cross_entropy";
    let name = "cross_entropy_fwd";
    let dtype = float_inputs(OP, &[logits])?;
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    let labels_host = host_i32(labels)?;
    let kept = cross_entropy_check_labels_cpu(&labels_host, classes, opts.ignore_index)?;
    let ctx = view(logits, OP)?.ctx;
    let labels_dev = on_gpu_i32(&ctx, labels, &labels_host)?;
    let lse = empty(&ctx, DType::F32, &[rows])?;
    let row_loss = empty(&ctx, DType::F32, &[rows])?;
    let out = empty(&ctx, DType::F32, &[])?;
    let n_classes = fit_u32(name, "the number of classes", classes)?;
    if let Some(cfg) = rows_cfg(name, rows, classes)? {
        with_float!(OP, dtype, |T| launch(
            &ctx,
            &k::cross_entropy_fwd::<T>(
                cfg,
                dptr(logits, OP)?,
                dptr(&labels_dev, OP)?,
                dptr(&lse, OP)?,
                dptr(&row_loss, OP)?,
                n_classes,
                opts.ignore_index.unwrap_or(0),
                opts.ignore_index.is_some() as i32,
                opts.label_smoothing,
            )
        ))?;
    }
    let r = "cross_entropy_reduce";
    launch(
        &ctx,
        &k::cross_entropy_reduce(
            kl::single_block(),
            dptr(&row_loss, OP)?,
            fit_u32(r, "the number of rows", rows)?,
            fit_u32(r, "the number of kept rows", kept)?,
            dptr(&out, OP)?,
        ),
    )?;
    let saved = CrossEntropySaved {
        labels: labels_dev,
        lse,
        kept,
    };
    Ok((out, saved))
}

/// The CUDA arm of [`crate::backend::loss::cross_entropy_bwd`]: the gradient in the logits'
/// dtype, `scale` the upstream gradient over the kept rows.
pub(crate) fn cross_entropy_bwd(
    logits: &Tensor,
    saved: &CrossEntropySaved,
    opts: &CrossEntropyOptions,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let name = "cross_entropy_bwd";
    let dtype = float_inputs(OP, &[logits])?;
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    let ctx = view(logits, OP)?.ctx;
    let d = empty(&ctx, dtype, logits.shape())?;
    let Some(cfg) = rows_cfg(name, rows, classes)? else {
        return Ok(d);
    };
    let n_classes = fit_u32(name, "the number of classes", classes)?;
    with_float!(OP, dtype, |T| launch(
        &ctx,
        &k::cross_entropy_bwd::<T>(
            cfg,
            dptr(logits, OP)?,
            dptr(&saved.labels, OP)?,
            dptr(&saved.lse, OP)?,
            dptr(&d, OP)?,
            n_classes,
            opts.ignore_index.unwrap_or(0),
            opts.ignore_index.is_some() as i32,
            opts.label_smoothing,
            scale,
        )
    ))?;
    Ok(d)
}
