//! Cross-entropy with integer labels, as PyTorch's `F.cross_entropy(logits, labels,
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

use rayon::prelude::*;

use crate::backend::softmax::rows_per_task;
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOptions {
    /// Rows whose label equals this value contribute neither loss nor gradient.
    pub ignore_index: Option<i32>,
    /// Weight `eps` in [0, 1] of the uniform distribution mixed into the target.
    pub label_smoothing: f32,
}

impl Default for CrossEntropyOptions {
    /// PyTorch's defaults: `ignore_index = -100`, no smoothing.
    fn default() -> Self {
        CrossEntropyOptions {
            ignore_index: Some(-100),
            label_smoothing: 0.0,
        }
    }
}

/// The factor of the cross-entropy gradient for an upstream gradient `upstream` over `kept`
/// labelled rows: the loss is their mean, and a batch with every row ignored has loss and
/// gradient zero. Shared by the CPU and CUDA backwards.
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

/// Mean cross-entropy of `logits` (`[N, C]`, f32 or bf16) against `labels` (i32 `[N]`); a
/// scalar (shape `[]`). See the module doc for ignored rows and smoothing.
pub fn cross_entropy(
    tape: &Tape,
    logits: &Var,
    labels: &Tensor,
    opts: CrossEntropyOptions,
) -> Result<Var> {
    const OP: &str = "cross_entropy";
    let lt = logits.tensor();
    lt.expect_float(OP)?;
    lt.expect_rank(OP, "logits", 2)?;
    labels.expect_dtype(OP, DType::I32)?;
    let (rows, classes) = (lt.shape()[0], lt.shape()[1]);
    if labels.shape() != [rows] {
        return Err(Error::shape(
            OP,
            format!(
                "logits {:?} need labels [{rows}], got labels {:?}",
                lt.shape(),
                labels.shape()
            ),
        ));
    }
    if classes == 0 {
        return Err(Error::shape(
            OP,
            format!("logits {:?} have no classes", lt.shape()),
        ));
    }
    let eps = opts.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::invalid(
            OP,
            format!("label_smoothing {eps} must be in [0, 1]"),
        ));
    }
    match lt.device() {
        Device::Cpu => crate::cuda::cpu_only(OP, [labels])?,
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(
                d,
                crate::cuda::loss::cross_entropy(tape, logits, labels, opts)
            );
        }
    }
    let labels_v = labels.read_i32()?.to_vec();
    let kept = cross_entropy_check_labels_cpu(&labels_v, classes, opts.ignore_index)?;
    let (loss, lse) = cross_entropy_forward_cpu(&lt.read_f32()?, &labels_v, classes, &opts);
    let out = Tensor::f32(vec![loss], &[])?;
    let saved_logits = lt.clone();
    let shape = lt.shape().to_vec();
    Ok(tape.record(
        out,
        &[logits],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let scale = cross_entropy_grad_scale(g.to_scalar_f32()?, kept);
            let mut d = vec![0f32; rows * classes];
            cross_entropy_backward_cpu(
                &saved_logits.read_f32()?,
                &labels_v,
                &lse,
                classes,
                &opts,
                scale,
                &mut d,
            );
            Ok(vec![Some(Tensor::f32(d, &shape)?)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::Device;

    fn labels(v: &[i32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), &[v.len()], Device::Cpu).unwrap()
    }

    /// Straight from the definition, in f64.
    fn naive(x: &[f32], y: &[i32], c: usize, ignore: Option<i32>, eps: f64) -> f64 {
        let (mut total, mut kept) = (0f64, 0usize);
        for (r, &label) in y.iter().enumerate() {
            if Some(label) == ignore {
                continue;
            }
            let row: Vec<f64> = x[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            let logp: Vec<f64> = row.iter().map(|v| v - z.ln()).collect();
            let nll = -logp[label as usize];
            let smooth = -logp.iter().sum::<f64>() / c as f64;
            total += (1.0 - eps) * nll + eps * smooth;
            kept += 1;
        }
        total / kept as f64
    }

    #[test]
    fn forward_matches_definition() {
        let x = Tensor::randn(&[5, 4], 0.0, 3.0, 3, DType::F32, Device::Cpu).unwrap();
        let xv = x.to_vec_f32().unwrap();
        let y = [2, -100, 0, 3, 1];
        let tape = Tape::inference();
        let lv = tape.constant(x);
        for eps in [0.0f32, 0.2] {
            let opts = CrossEntropyOptions {
                label_smoothing: eps,
                ..Default::default()
            };
            let got = cross_entropy(&tape, &lv, &labels(&y), opts).unwrap();
            assert_eq!(got.shape(), &[] as &[usize]);
            let got = got.tensor().to_scalar_f32().unwrap() as f64;
            let want = naive(&xv, &y, 4, Some(-100), eps as f64);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        // Uniform logits: loss is ln(C) whatever the label.
        let u = tape.constant(Tensor::f32(vec![7.0; 6], &[2, 3]).unwrap());
        let l = cross_entropy(&tape, &u, &labels(&[0, 2]), Default::default()).unwrap();
        assert!((l.tensor().to_scalar_f32().unwrap() - 3f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn gradient_is_softmax_minus_target_over_kept_rows() {
        let x = Tensor::randn(&[6, 5], 0.0, 2.0, 8, DType::F32, Device::Cpu).unwrap();
        let y = labels(&[4, 0, 7, 2, 7, 1]);
        for eps in [0.0f32, 0.1] {
            let opts = CrossEntropyOptions {
                ignore_index: Some(7),
                label_smoothing: eps,
            };
            let y2 = y.clone();
            GradCheck::default()
                .run(std::slice::from_ref(&x), &[0], move |t, v| {
                    cross_entropy(t, &v[0], &y2, opts)
                })
                .unwrap();
        }
        // Ignored rows get exactly zero.
        let tape = Tape::recording();
        let xv = tape.watch(x);
        let opts = CrossEntropyOptions {
            ignore_index: Some(7),
            label_smoothing: 0.0,
        };
        let loss = cross_entropy(&tape, &xv, &y, opts).unwrap();
        let g = tape.backward(&loss).unwrap();
        let g = g.get(&xv).unwrap().to_vec_f32().unwrap();
        assert!(g[10..15].iter().chain(&g[20..25]).all(|&v| v == 0.0));
        // Each kept row sums to zero (softmax and target both sum to one).
        assert!(g[0..5].iter().sum::<f32>().abs() < 1e-6);
    }

    #[test]
    fn all_rows_ignored_gives_zero_loss_and_gradient() {
        let tape = Tape::recording();
        let x = tape.watch(Tensor::randn(&[3, 4], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap());
        let loss = cross_entropy(&tape, &x, &labels(&[-100; 3]), Default::default()).unwrap();
        assert_eq!(loss.tensor().to_scalar_f32().unwrap(), 0.0);
        let g = tape.backward(&loss).unwrap();
        assert!(g
            .get(&x)
            .unwrap()
            .to_vec_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn errors_name_the_problem() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap());
        let err = cross_entropy(&tape, &x, &labels(&[0, 4, 1]), Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1") && err.contains("label 4"), "{err}");
        let no_ignore = CrossEntropyOptions {
            ignore_index: None,
            label_smoothing: 0.0,
        };
        let err = cross_entropy(&tape, &x, &labels(&[0, -100, 1]), no_ignore)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1") && err.contains("-100"), "{err}");
        let err = cross_entropy(&tape, &x, &labels(&[0, 1]), Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 4]") && err.contains("[2]"), "{err}");
        let f = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        assert!(cross_entropy(&tape, &x, &f, Default::default()).is_err());
        let bad = CrossEntropyOptions {
            ignore_index: None,
            label_smoothing: 1.5,
        };
        assert!(cross_entropy(&tape, &x, &labels(&[0, 1, 2]), bad).is_err());
        let x3 = tape.constant(Tensor::zeros(&[3, 4, 1], DType::F32, Device::Cpu).unwrap());
        assert!(cross_entropy(&tape, &x3, &labels(&[0, 1, 2]), Default::default()).is_err());
    }
}
