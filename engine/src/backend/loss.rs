//! Cross-entropy with integer labels at the backend level ([`cross_entropy_fwd`],
//! [`cross_entropy_bwd`]), dispatched by device, with the CPU arm below them and the CUDA arm in
//! `crate::cuda::loss` (kernels `cross_entropy.cu`); as PyTorch's `F.cross_entropy(logits, labels,
//! ignore_index=..., label_smoothing=..., reduction="mean")`.
//!
//! Per kept row `i` (label not the ignore index), with `lse = log(sum_c exp(x_ic))`:
//! `loss_i = (1 - eps) * (lse - x_{i,y_i}) + eps * mean_c(lse - x_ic)`, and the loss is the mean
//! of `loss_i` over kept rows. The gradient of a kept row is
//! `(softmax(x_i) - ((1 - eps) * onehot(y_i) + eps / C)) / kept`; ignored rows get zero.
//!
//! Masked-LM batches ignore most positions, and a batch may by chance ignore all of them.
//! PyTorch then returns NaN (0/0), which would poison the weights through the optimizer; here
//! the loss is 0 and the gradient is zero, so such a step is a no-op.
//!
//! Forward keeps only the per-row log-normaliser (one f32 per row): backward rebuilds
//! `softmax = exp(x - lse)` from the logits in one pass.

//!
//! Storage types: the logits are f32 or bf16 on either arm; the loss is an f32 scalar; the
//! gradient is f32 on the CPU and in the logits' dtype on a GPU.

use rayon::prelude::*;

use super::softmax::rows_per_task;
use super::CrossEntropyOptions;
use crate::{DType, Device, Error, Result, Tensor};

/// What a cross-entropy backward needs besides the logits, kept by [`cross_entropy_fwd`] on the
/// logits' device: the labels (i32 `[N]`, a copy the caller's later writes do not reach on the
/// CPU), each row's log-normaliser (f32 `[N]`) and the number of kept rows.
#[derive(Debug, Clone)]
pub struct CrossEntropySaved {
    pub labels: Tensor,
    pub lse: Tensor,
    pub kept: usize,
}

/// Mean cross-entropy of `logits` (`[N, C]`, float) against `labels` (i32 `[N]`): the loss (an
/// f32 scalar, shape `[]`) and what its backward needs. The labels are checked on the host.
pub fn cross_entropy_fwd(
    logits: &Tensor,
    labels: &Tensor,
    opts: &CrossEntropyOptions,
) -> Result<(Tensor, CrossEntropySaved)> {
    const OP: &str = "cross_entropy";
    logits.expect_float(OP)?;
    logits.expect_rank(OP, "logits", 2)?;
    labels.expect_dtype(OP, DType::I32)?;
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    if labels.shape() != [rows] {
        return Err(Error::shape(
            OP,
            format!(
                "logits {:?} need labels [{rows}], got labels {:?}",
                logits.shape(),
                labels.shape()
            ),
        ));
    }
    if classes == 0 {
        return Err(Error::shape(
            OP,
            format!("logits {:?} have no classes", logits.shape()),
        ));
    }
    let eps = opts.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::invalid(
            OP,
            format!("label_smoothing {eps} must be in [0, 1]"),
        ));
    }
    match logits.device() {
        Device::Cpu => crate::cuda::cpu_only(OP, [labels])?,
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(
                d,
                crate::cuda::loss::cross_entropy_fwd(logits, labels, opts)
            );
        }
    }
    let labels_v = labels.read_i32()?.to_vec();
    let kept = cross_entropy_check_labels_cpu(&labels_v, classes, opts.ignore_index)?;
    let (loss, lse) = cross_entropy_forward_cpu(&logits.read_f32()?, &labels_v, classes, opts);
    let saved = CrossEntropySaved {
        labels: Tensor::from_vec(labels_v, &[rows], Device::Cpu)?,
        lse: Tensor::f32(lse, &[rows])?,
        kept,
    };
    Ok((Tensor::f32(vec![loss], &[])?, saved))
}

/// The gradient of [`cross_entropy_fwd`] with respect to the logits, from the logits, what the
/// forward kept and the upstream gradient `dy` of the loss (a scalar, read on the host).
pub fn cross_entropy_bwd(
    logits: &Tensor,
    saved: &CrossEntropySaved,
    dy: &Tensor,
    opts: &CrossEntropyOptions,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    logits.expect_rank(OP, "logits", 2)?;
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    if saved.labels.shape() != [rows] || saved.lse.shape() != [rows] {
        return Err(Error::shape(
            OP,
            format!(
                "logits {:?} need labels and log-normalisers [{rows}], got {:?} and {:?}",
                logits.shape(),
                saved.labels.shape(),
                saved.lse.shape()
            ),
        ));
    }
    let scale = cross_entropy_grad_scale(dy.to_scalar_f32()?, saved.kept);
    match crate::cuda::common_device(OP, &[logits, &saved.labels, &saved.lse])? {
        Device::Cpu => {
            let mut d = vec![0f32; rows * classes];
            cross_entropy_backward_cpu(
                &logits.read_f32()?,
                &saved.labels.read_i32()?,
                &saved.lse.read_f32()?,
                classes,
                opts,
                scale,
                &mut d,
            );
            Tensor::f32(d, logits.shape())
        }
        d => crate::on_cuda!(
            d,
            crate::cuda::loss::cross_entropy_bwd(logits, saved, opts, scale)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: kernels over slices
// ---------------------------------------------------------------------------------------------

/// The factor of the cross-entropy gradient for an upstream gradient `upstream` over `kept`
/// labelled rows: the loss is their mean, and a batch with every row ignored has loss and
/// gradient zero. Shared by both arms (computed before dispatch).
pub(crate) fn cross_entropy_grad_scale(upstream: f32, kept: usize) -> f32 {
    if kept == 0 {
        0.0
    } else {
        upstream / kept as f32
    }
}

/// Checks every label is a class in `[0, classes)` or the ignore index; returns the number of
/// kept rows. The error names the first offending row and its value.
pub fn cross_entropy_check_labels_cpu(
    labels: &[i32],
    classes: usize,
    ignore_index: Option<i32>,
) -> Result<usize> {
    let mut kept = 0;
    for (row, &y) in labels.iter().enumerate() {
        if Some(y) == ignore_index {
            continue;
        }
        if y < 0 || y as usize >= classes {
            return Err(Error::invalid(
                "cross_entropy",
                format!(
                    "label {y} at row {row} is outside [0, {classes}){}",
                    match ignore_index {
                        Some(i) => format!(" and is not the ignore index {i}"),
                        None => String::new(),
                    }
                ),
            ));
        }
        kept += 1;
    }
    Ok(kept)
}

/// Log-normaliser `ln(sum(exp(row)))` of one row, stable for large logits.
pub fn log_sum_exp_row_cpu(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    max + sum.ln()
}

/// Forward over `[rows, classes]` logits with labels already validated: returns the mean loss
/// over kept rows (0 when none is kept) and each row's log-normaliser (saved for backward).
pub fn cross_entropy_forward_cpu(
    logits: &[f32],
    labels: &[i32],
    classes: usize,
    opts: &CrossEntropyOptions,
) -> (f32, Vec<f32>) {
    let eps = opts.label_smoothing as f64;
    let per_row: Vec<(f32, f64)> = logits
        .par_chunks(classes)
        .zip(labels.par_iter())
        .with_min_len(rows_per_task(classes))
        .map(|(row, &y)| {
            let lse = log_sum_exp_row_cpu(row);
            if Some(y) == opts.ignore_index {
                return (lse, 0.0);
            }
            let nll = lse as f64 - row[y as usize] as f64;
            let mean_x = row.iter().map(|&v| v as f64).sum::<f64>() / classes as f64;
            let smooth = lse as f64 - mean_x;
            (lse, (1.0 - eps) * nll + eps * smooth)
        })
        .collect();
    let kept = labels
        .iter()
        .filter(|&&y| Some(y) != opts.ignore_index)
        .count();
    // Summed in row order so the result does not depend on how rayon split the rows.
    let total: f64 = per_row.iter().map(|(_, l)| l).sum();
    let loss = if kept == 0 {
        0.0
    } else {
        (total / kept as f64) as f32
    };
    (loss, per_row.into_iter().map(|(lse, _)| lse).collect())
}

/// `dlogits = scale * (softmax - smoothed target)` for kept rows, 0 for ignored rows; `scale`
/// is the upstream gradient divided by the number of kept rows.
pub fn cross_entropy_backward_cpu(
    logits: &[f32],
    labels: &[i32],
    lse: &[f32],
    classes: usize,
    opts: &CrossEntropyOptions,
    scale: f32,
    dlogits: &mut [f32],
) {
    let eps = opts.label_smoothing;
    let off = eps / classes as f32;
    let on = 1.0 - eps + off;
    dlogits
        .par_chunks_mut(classes)
        .zip(logits.par_chunks(classes))
        .zip(labels.par_iter().zip(lse.par_iter()))
        .with_min_len(rows_per_task(classes))
        .for_each(|((d, row), (&y, &lse))| {
            if Some(y) == opts.ignore_index {
                d.fill(0.0);
                return;
            }
            for (c, (d, &x)) in d.iter_mut().zip(row).enumerate() {
                let target = if c == y as usize { on } else { off };
                *d = scale * ((x - lse).exp() - target);
            }
        });
}
