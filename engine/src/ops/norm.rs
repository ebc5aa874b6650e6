//! Normalisation layers: 2-d batch normalisation (ResNet) and layer normalisation (BERT).
//!
//! `batch_norm2d` follows PyTorch's `nn.BatchNorm2d`: in training it normalises each channel with
//! the batch mean and the biased variance, and moves the running statistics towards the batch
//! ones (`running = (1 - momentum) * running + momentum * batch`, with the *unbiased* variance
//! for `running_var`); in evaluation it normalises with the running statistics, which makes it
//! an affine map per channel (the teacher folds it into the preceding convolution).
//!
//! `layer_norm` normalises each row of the last dimension with its own mean and biased variance,
//! then applies a per-feature scale and shift, as `nn.LayerNorm`.
//!
//! Statistics are accumulated in f64: a channel of a ResNet batch holds up to millions of values,
//! and f32 sums of that many would lose the digits the variance depends on.

use rayon::prelude::*;

use crate::backend::softmax::rows_per_task;
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchNormOptions {
    /// Batch statistics and running-statistics update (true) or running statistics (false).
    pub training: bool,
    /// Weight of the batch statistics in the running-statistics update.
    pub momentum: f32,
    /// Added to the variance before the square root.
    pub eps: f32,
}

impl Default for BatchNormOptions {
    /// PyTorch's defaults.
    fn default() -> Self {
        BatchNormOptions {
            training: true,
            momentum: 0.1,
            eps: 1e-5,
        }
    }
}

/// Per-channel mean and biased variance of `x` laid out `[n, c, hw]` (channels in parallel).
pub fn batch_norm2d_stats_cpu(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let count = (n * hw) as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let plane = |b: usize| &x[(b * c + ch) * hw..(b * c + ch + 1) * hw];
            let sum: f64 = (0..n)
                .map(|b| plane(b).iter().map(|&v| v as f64).sum::<f64>())
                .sum();
            let mean = sum / count;
            // Two passes: the sum of squared deviations does not cancel like E[x^2] - E[x]^2.
            let sq: f64 = (0..n)
                .map(|b| {
                    plane(b)
                        .iter()
                        .map(|&v| (v as f64 - mean).powi(2))
                        .sum::<f64>()
                })
                .sum();
            (mean as f32, (sq / count) as f32)
        })
        .unzip()
}

/// `out = (x - mean[c]) * inv_std[c] * weight[c] + bias[c]` over `[n, c, hw]` (planes in parallel).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_forward_cpu(
    x: &[f32],
    c: usize,
    hw: usize,
    mean: &[f32],
    inv_std: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    if hw == 0 {
        return;
    }
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .with_min_len(rows_per_task(hw))
        .for_each(|(plane, (o, xs))| {
            let ch = plane % c;
            let scale = inv_std[ch] * weight[ch];
            // Centre first: folding the mean into one shift (`v * scale + (bias - mean * scale)`)
            // cancels catastrophically when |mean| >> std, which training-mode BatchNorm meets
            // in deep layers with few values per channel.
            for (o, &v) in o.iter_mut().zip(xs) {
                *o = (v - mean[ch]) * scale + bias[ch];
            }
        });
}

/// Gradients of batch norm over `[n, c, hw]`. `mean`/`inv_std` are the statistics the forward
/// used: the batch ones when `training` (then they depend on `x`, which adds the two mean terms
/// to `dx`), the running ones otherwise. Returns `(dweight, dbias)` and fills `dx` when given.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_backward_cpu(
    x: &[f32],
    dy: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    mean: &[f32],
    inv_std: &[f32],
    weight: &[f32],
    training: bool,
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let idx = |b: usize, ch: usize| (b * c + ch) * hw..(b * c + ch + 1) * hw;
    // Per channel: sum(dy) and sum(dy * xhat).
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut sdy, mut sdyx) = (0f64, 0f64);
            let (m, is) = (mean[ch] as f64, inv_std[ch] as f64);
            for b in 0..n {
                for (&g, &v) in dy[idx(b, ch)].iter().zip(&x[idx(b, ch)]) {
                    sdy += g as f64;
                    sdyx += g as f64 * ((v as f64 - m) * is);
                }
            }
            (sdy, sdyx)
        })
        .collect();
    let dweight: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
    let dbias: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
    if let Some(dx) = dx {
        if hw == 0 {
            return (dweight, dbias);
        }
        let count = (n * hw) as f32;
        dx.par_chunks_mut(hw)
            .enumerate()
            .with_min_len(rows_per_task(hw))
            .for_each(|(plane, d)| {
                let ch = plane % c;
                let r = plane * hw..(plane + 1) * hw;
                let k = weight[ch] * inv_std[ch];
                if training {
                    // dx = k * (dy - mean(dy) - xhat * mean(dy * xhat))
                    // In f64: the three terms nearly cancel when the upstream gradient is
                    // mostly explained by the batch mean (deep layers, few values per channel),
                    // and f32 would leave only rounding noise.
                    let (mdy, mdyx) = (sums[ch].0 / count as f64, sums[ch].1 / count as f64);
                    let (m, is, k) = (mean[ch] as f64, inv_std[ch] as f64, k as f64);
                    for ((d, &g), &v) in d.iter_mut().zip(&dy[r.clone()]).zip(&x[r]) {
                        let xhat = (v as f64 - m) * is;
                        *d = (k * (g as f64 - mdy - xhat * mdyx)) as f32;
                    }
                } else {
                    for (d, &g) in d.iter_mut().zip(&dy[r]) {
                        *d = k * g;
                    }
                }
            });
    }
    (dweight, dbias)
}

/// New running statistics: `(1 - m) * running + m * batch`, with the batch variance made
/// unbiased (`* count / (count - 1)`) as PyTorch does.
pub fn batch_norm_running_update_cpu(
    running_mean: &[f32],
    running_var: &[f32],
    batch_mean: &[f32],
    batch_var: &[f32],
    count: usize,
    momentum: f32,
) -> (Vec<f32>, Vec<f32>) {
    let unbias = count as f32 / (count as f32 - 1.0);
    let mix = |old: f32, new: f32| (1.0 - momentum) * old + momentum * new;
    let mean = running_mean
        .iter()
        .zip(batch_mean)
        .map(|(&o, &b)| mix(o, b))
        .collect();
    let var = running_var
        .iter()
        .zip(batch_var)
        .map(|(&o, &b)| mix(o, b * unbias))
        .collect();
    (mean, var)
}

fn check_channel_vector(
    op: &'static str,
    name: &str,
    t: &Tensor,
    x_shape: &[usize],
    c: usize,
) -> Result<()> {
    t.expect_float(op)?;
    if t.shape() != [c] {
        return Err(Error::shape(
            op,
            format!(
                "input {x_shape:?} has {c} channels, {name} has shape {:?} (expected [{c}])",
                t.shape()
            ),
        ));
    }
    Ok(())
}

/// Batch normalisation of `x` (`[N, C, H, W]`) with per-channel `weight` and `bias` (`[C]`).
/// In training mode `running_mean` and `running_var` (f32 `[C]`) are updated in place, on any
/// tape (as PyTorch does under `no_grad`); in evaluation they are only read.
pub fn batch_norm2d(
    tape: &Tape,
    x: &Var,
    weight: &Var,
    bias: &Var,
    running_mean: &Tensor,
    running_var: &Tensor,
    opts: BatchNormOptions,
) -> Result<Var> {
    const OP: &str = "batch_norm2d";
    let xt = x.tensor();
    xt.expect_float(OP)?;
    xt.expect_rank(OP, "input", 4)?;
    let shape = xt.shape().to_vec();
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    check_channel_vector(OP, "weight", weight.tensor(), &shape, c)?;
    check_channel_vector(OP, "bias", bias.tensor(), &shape, c)?;
    check_channel_vector(OP, "running_mean", running_mean, &shape, c)?;
    check_channel_vector(OP, "running_var", running_var, &shape, c)?;
    if !(opts.eps >= 0.0 && opts.eps.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("eps {} must be finite and >= 0", opts.eps),
        ));
    }
    if !(0.0..=1.0).contains(&opts.momentum) {
        return Err(Error::invalid(
            OP,
            format!("momentum {} must be in [0, 1]", opts.momentum),
        ));
    }
    if opts.training {
        running_mean.expect_dtype("batch_norm2d (running_mean)", DType::F32)?;
        running_var.expect_dtype("batch_norm2d (running_var)", DType::F32)?;
        if n * hw < 2 {
            return Err(Error::invalid(
                OP,
                format!(
                    "training needs more than one value per channel to estimate a variance, \
                     input {shape:?} has {}",
                    n * hw
                ),
            ));
        }
    }

    let on = [
        x.tensor(),
        weight.tensor(),
        bias.tensor(),
        running_mean,
        running_var,
    ];
    match crate::cuda::common_device(OP, &on)? {
        Device::Cpu => {}
        d => {
            return crate::on_cuda!(
                d,
                crate::cuda::norm::batch_norm2d(
                    tape,
                    x,
                    weight,
                    bias,
                    running_mean,
                    running_var,
                    opts
                )
            )
        }
    }
    let weight_v = weight.tensor().to_vec_f32()?;
    let bias_v = bias.tensor().to_vec_f32()?;
    // Read everything before writing the running statistics: they may be views of one buffer,
    // and a write guard must not be held while another guard on that buffer is alive.
    let (old_mean, old_var) = (running_mean.to_vec_f32()?, running_var.to_vec_f32()?);
    let (mean, var, inv_std, out) = {
        let xs = xt.read_f32()?;
        let (mean, var) = if opts.training {
            batch_norm2d_stats_cpu(&xs, n, c, hw)
        } else {
            (old_mean.clone(), old_var.clone())
        };
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + opts.eps).sqrt()).collect();
        let mut out = vec![0f32; xs.len()];
        batch_norm2d_forward_cpu(&xs, c, hw, &mean, &inv_std, &weight_v, &bias_v, &mut out);
        (mean, var, inv_std, out)
    };
    if opts.training {
        let (rm, rv) =
            batch_norm_running_update_cpu(&old_mean, &old_var, &mean, &var, n * hw, opts.momentum);
        running_mean.write_f32()?.copy_from_slice(&rm);
        running_var.write_f32()?.copy_from_slice(&rv);
    }

    let y = Tensor::f32(out, &shape)?;
    let saved_x = xt.clone();
    let training = opts.training;
    Ok(tape.record(
        y,
        &[x, weight, bias],
        Box::new(move |g, needs| {
            let xs = saved_x.read_f32()?;
            let dy = g.read_f32()?;
            let mut dx = needs[0].then(|| vec![0f32; xs.len()]);
            let (dw, db) = batch_norm2d_backward_cpu(
                &xs,
                &dy,
                n,
                c,
                hw,
                &mean,
                &inv_std,
                &weight_v,
                training,
                dx.as_deref_mut(),
            );
            Ok(vec![
                dx.map(|d| Tensor::f32(d, &shape)).transpose()?,
                needs[1].then(|| Tensor::f32(dw, &[c])).transpose()?,
                needs[2].then(|| Tensor::f32(db, &[c])).transpose()?,
            ])
        }),
    ))
}

/// Per-row mean and `1 / sqrt(biased variance + eps)` of `x` viewed as rows of length `d`.
pub fn layer_norm_stats_cpu(x: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    if d == 0 {
        return (Vec::new(), Vec::new());
    }
    x.par_chunks(d)
        .with_min_len(rows_per_task(d))
        .map(|row| {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
        })
        .unzip()
}

/// `out = (x - mean) * rstd * weight + bias`, row by row.
pub fn layer_norm_forward_cpu(
    x: &[f32],
    d: usize,
    mean: &[f32],
    rstd: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    if d == 0 {
        return;
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .enumerate()
        .with_min_len(rows_per_task(d))
        .for_each(|(r, (o, row))| {
            for (j, (o, &v)) in o.iter_mut().zip(row).enumerate() {
                *o = (v - mean[r]) * rstd[r] * weight[j] + bias[j];
            }
        });
}

/// Gradients of layer norm: fills `dx` when given, returns `(dweight, dbias)`.
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * weight`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_cpu(
    x: &[f32],
    dy: &[f32],
    d: usize,
    mean: &[f32],
    rstd: &[f32],
    weight: &[f32],
    dx: Option<&mut [f32]>,
) -> (Vec<f32>, Vec<f32>) {
    if d == 0 {
        return (Vec::new(), Vec::new());
    }
    let rows_per_block = rows_per_task(d);
    let block = rows_per_block * d;
    // dweight/dbias sum over rows: partial sums per fixed block of rows in parallel, then added
    // in block order, so the result is the same however rayon schedules the blocks.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(block)
        .zip(dy.par_chunks(block))
        .enumerate()
        .map(|(blk, (xs, gs))| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            for (i, (row, g)) in xs.chunks(d).zip(gs.chunks(d)).enumerate() {
                let r = blk * rows_per_block + i;
                for j in 0..d {
                    dw[j] += g[j] * (row[j] - mean[r]) * rstd[r];
                    db[j] += g[j];
                }
            }
            (dw, db)
        })
        .collect();
    let (mut dweight, mut dbias) = (vec![0f32; d], vec![0f32; d]);
    for (pw, pb) in partials {
        dweight.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        dbias.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    if let Some(dx) = dx {
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
            .enumerate()
            .with_min_len(rows_per_block)
            .for_each(|(r, (out, (row, g)))| {
                let (mut mg, mut mgx) = (0f32, 0f32);
                for j in 0..d {
                    let gw = g[j] * weight[j];
                    mg += gw;
                    mgx += gw * (row[j] - mean[r]) * rstd[r];
                }
                mg /= d as f32;
                mgx /= d as f32;
                for j in 0..d {
                    let xhat = (row[j] - mean[r]) * rstd[r];
                    out[j] = rstd[r] * (g[j] * weight[j] - mg - xhat * mgx);
                }
            });
    }
    (dweight, dbias)
}

/// Layer normalisation over the last dimension of `x` (`[..., D]`) with `weight` and `bias`
/// (`[D]`).
pub fn layer_norm(tape: &Tape, x: &Var, weight: &Var, bias: &Var, eps: f32) -> Result<Var> {
    const OP: &str = "layer_norm";
    let xt = x.tensor();
    xt.expect_float(OP)?;
    if xt.rank() == 0 {
        return Err(Error::shape(
            OP,
            "input is a scalar; it needs a last dimension to normalise over".to_string(),
        ));
    }
    let shape = xt.shape().to_vec();
    let d = *shape.last().expect("rank >= 1");
    for (name, t) in [("weight", weight.tensor()), ("bias", bias.tensor())] {
        t.expect_float(OP)?;
        if t.shape() != [d] {
            return Err(Error::shape(
                OP,
                format!(
                    "input {shape:?} has last dimension {d}, {name} has shape {:?} (expected [{d}])",
                    t.shape()
                ),
            ));
        }
    }
    if !(eps >= 0.0 && eps.is_finite()) {
        return Err(Error::invalid(
            OP,
            format!("eps {eps} must be finite and >= 0"),
        ));
    }
    match crate::cuda::common_device(OP, &[xt, weight.tensor(), bias.tensor()])? {
        Device::Cpu => {}
        d => return crate::on_cuda!(d, crate::cuda::norm::layer_norm(tape, x, weight, bias, eps)),
    }
    let weight_v = weight.tensor().to_vec_f32()?;
    let bias_v = bias.tensor().to_vec_f32()?;
    let (mean, rstd, out) = {
        let xs = xt.read_f32()?;
        let (mean, rstd) = layer_norm_stats_cpu(&xs, d, eps);
        let mut out = vec![0f32; xs.len()];
        layer_norm_forward_cpu(&xs, d, &mean, &rstd, &weight_v, &bias_v, &mut out);
        (mean, rstd, out)
    };
    let y = Tensor::f32(out, &shape)?;
    let saved_x = xt.clone();
    Ok(tape.record(
        y,
        &[x, weight, bias],
        Box::new(move |g, needs| {
            let xs = saved_x.read_f32()?;
            let dy = g.read_f32()?;
            let mut dx = needs[0].then(|| vec![0f32; xs.len()]);
            let (dw, db) =
                layer_norm_backward_cpu(&xs, &dy, d, &mean, &rstd, &weight_v, dx.as_deref_mut());
            Ok(vec![
                dx.map(|v| Tensor::f32(v, &shape)).transpose()?,
                needs[1].then(|| Tensor::f32(dw, &[d])).transpose()?,
                needs[2].then(|| Tensor::f32(db, &[d])).transpose()?,
            ])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn vec_t(v: &[f32]) -> Tensor {
        Tensor::f32(v.to_vec(), &[v.len()]).unwrap()
    }

    #[test]
    fn batch_norm_training_forward_and_running_stats() {
        // N=2, C=2, H=1, W=2: channel 0 holds 1, 2, 3, 4; channel 1 holds 10, 10, 14, 14.
        let x = Tensor::f32(vec![1., 2., 10., 10., 3., 4., 14., 14.], &[2, 2, 1, 2]).unwrap();
        let tape = Tape::inference();
        let (xv, w, b) = (
            tape.constant(x),
            tape.constant(vec_t(&[2.0, 1.0])),
            tape.constant(vec_t(&[0.5, -1.0])),
        );
        let rm = vec_t(&[0.0, 1.0]);
        let rv = vec_t(&[1.0, 2.0]);
        let opts = BatchNormOptions {
            eps: 0.0,
            ..Default::default()
        };
        let y = batch_norm2d(&tape, &xv, &w, &b, &rm, &rv, opts).unwrap();
        let y = y.tensor().to_vec_f32().unwrap();
        // Channel 0: mean 2.5, biased var 1.25; channel 1: mean 12, var 4.
        let s = 1.25f32.sqrt();
        let want = [
            2.0 * (1.0 - 2.5) / s + 0.5,
            2.0 * (2.0 - 2.5) / s + 0.5,
            -1.0 - 1.0,
            -1.0 - 1.0,
            2.0 * (3.0 - 2.5) / s + 0.5,
            2.0 * (4.0 - 2.5) / s + 0.5,
            1.0 - 1.0,
            1.0 - 1.0,
        ];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
        // Unbiased variances 5/3 and 16/3.
        let rm = rm.to_vec_f32().unwrap();
        let rv = rv.to_vec_f32().unwrap();
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - (0.9 + 1.2)).abs() < 1e-5);
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
        assert!((rv[1] - (1.8 + 0.1 * 16.0 / 3.0)).abs() < 1e-5);
    }

    #[test]
    fn batch_norm_eval_uses_running_stats_and_leaves_them() {
        let x = Tensor::f32(vec![1.0, 3.0, 5.0, 7.0], &[1, 2, 1, 2]).unwrap();
        let tape = Tape::inference();
        let (xv, w, b) = (
            tape.constant(x),
            tape.constant(vec_t(&[1.0, 3.0])),
            tape.constant(vec_t(&[0.0, 1.0])),
        );
        let (rm, rv) = (vec_t(&[1.0, 5.0]), vec_t(&[4.0, 1.0]));
        let opts = BatchNormOptions {
            training: false,
            eps: 0.0,
            ..Default::default()
        };
        let y = batch_norm2d(&tape, &xv, &w, &b, &rm, &rv, opts).unwrap();
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![0.0, 1.0, 1.0, 7.0]);
        assert_eq!(rm.to_vec_f32().unwrap(), vec![1.0, 5.0]);
        assert_eq!(rv.to_vec_f32().unwrap(), vec![4.0, 1.0]);
    }

    #[test]
    fn batch_norm_gradients_in_both_modes() {
        let x = randn(&[3, 4, 2, 3], 1);
        let w = Tensor::randn(&[4], 1.0, 0.3, 2, DType::F32, Device::Cpu).unwrap();
        let b = randn(&[4], 3);
        for training in [true, false] {
            let rm = Tensor::randn(&[4], 0.0, 0.1, 4, DType::F32, Device::Cpu).unwrap();
            let rv = Tensor::rand_uniform(&[4], 0.5, 1.5, 5, DType::F32, Device::Cpu).unwrap();
            let opts = BatchNormOptions {
                training,
                ..Default::default()
            };
            let worst = GradCheck::default()
                .run(&[x.clone(), w.clone(), b.clone()], &[0, 1, 2], |t, v| {
                    batch_norm2d(t, &v[0], &v[1], &v[2], &rm, &rv, opts)
                })
                .unwrap();
            assert!(worst < 1e-2, "training={training}: {worst}");
        }
    }

    #[test]
    fn batch_norm_running_stats_may_share_one_buffer() {
        // Running statistics are often views of one flat buffer: no deadlock, both updated.
        let buf = Tensor::f32(vec![0.0, 0.0, 1.0, 1.0], &[4]).unwrap();
        let (rm, rv) = (buf.view(0, &[2]).unwrap(), buf.view(2, &[2]).unwrap());
        let tape = Tape::inference();
        let x = tape.constant(randn(&[2, 2, 2, 2], 9));
        let w = tape.constant(vec_t(&[1.0, 1.0]));
        let b = tape.constant(vec_t(&[0.0, 0.0]));
        batch_norm2d(&tape, &x, &w, &b, &rm, &rv, Default::default()).unwrap();
        let v = buf.to_vec_f32().unwrap();
        assert!(v[0] != 0.0 && v[2] != 1.0, "{v:?}");
    }

    #[test]
    fn batch_norm_errors() {
        let tape = Tape::inference();
        let x = tape.constant(randn(&[2, 3, 2, 2], 1));
        let w3 = tape.constant(vec_t(&[1.0; 3]));
        let w2 = tape.constant(vec_t(&[1.0; 2]));
        let r3 = vec_t(&[0.0; 3]);
        let r2 = vec_t(&[0.0; 2]);
        let opts = BatchNormOptions::default();
        let err = batch_norm2d(&tape, &x, &w2, &w3, &r3, &r3, opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3, 2, 2]") && err.contains("weight") && err.contains("[2]"));
        let err = batch_norm2d(&tape, &x, &w3, &w3, &r3, &r2, opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("running_var"), "{err}");
        let x3 = tape.constant(randn(&[2, 3, 4], 1));
        assert!(batch_norm2d(&tape, &x3, &w3, &w3, &r3, &r3, opts).is_err());
        let one = tape.constant(randn(&[1, 3, 1, 1], 1));
        let err = batch_norm2d(&tape, &one, &w3, &w3, &r3, &r3, opts)
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than one value"), "{err}");
        let eval = BatchNormOptions {
            training: false,
            ..opts
        };
        assert!(batch_norm2d(&tape, &one, &w3, &w3, &r3, &r3, eval).is_ok());
        let bad = BatchNormOptions {
            momentum: 2.0,
            ..opts
        };
        assert!(batch_norm2d(&tape, &x, &w3, &w3, &r3, &r3, bad).is_err());
    }

    #[test]
    fn layer_norm_forward_matches_definition() {
        let x = vec![1.0f32, 2.0, 3.0, 6.0, -1.0, -1.0, 1.0, 1.0];
        let tape = Tape::inference();
        let y = layer_norm(
            &tape,
            &tape.constant(Tensor::f32(x, &[2, 1, 4]).unwrap()),
            &tape.constant(vec_t(&[1.0, 2.0, 1.0, 1.0])),
            &tape.constant(vec_t(&[0.0, 0.0, 0.0, 1.0])),
            0.0,
        )
        .unwrap();
        assert_eq!(y.shape(), &[2, 1, 4]);
        let y = y.tensor().to_vec_f32().unwrap();
        // Row 0: mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5.
        let s = 3.5f32.sqrt();
        let want = [-2.0 / s, -2.0 / s, 0.0, 3.0 / s + 1.0, -1.0, -2.0, 1.0, 2.0];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn layer_norm_gradients() {
        let x = Tensor::randn(&[5, 3, 8], 0.5, 2.0, 1, DType::F32, Device::Cpu).unwrap();
        let w = Tensor::randn(&[8], 1.0, 0.5, 2, DType::F32, Device::Cpu).unwrap();
        let b = randn(&[8], 3);
        GradCheck::default()
            .run(&[x, w, b], &[0, 1, 2], |t, v| {
                layer_norm(t, &v[0], &v[1], &v[2], 1e-5)
            })
            .unwrap();
    }

    #[test]
    fn layer_norm_parameter_gradients_sum_over_many_row_blocks() {
        // More rows than one reduction block holds, so several partial sums are combined.
        let (rows, d) = (5000, 8);
        let x = randn(&[rows, d], 5);
        let dy = randn(&[rows, d], 6);
        let tape = Tape::recording();
        let (xv, w, b) = (
            tape.watch(x.clone()),
            tape.watch(vec_t(&[1.0; 8])),
            tape.watch(vec_t(&[0.0; 8])),
        );
        let y = layer_norm(&tape, &xv, &w, &b, 1e-5).unwrap();
        let g = tape.backward_with(&y, dy.clone()).unwrap();
        let (xs, gs) = (x.to_vec_f32().unwrap(), dy.to_vec_f32().unwrap());
        let (mut dw, mut db) = (vec![0f64; d], vec![0f64; d]);
        for (row, gr) in xs.chunks(d).zip(gs.chunks(d)) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                dw[j] += gr[j] as f64 * (row[j] as f64 - mean) / (var + 1e-5).sqrt();
                db[j] += gr[j] as f64;
            }
        }
        let got_w = g.get(&w).unwrap().to_vec_f32().unwrap();
        let got_b = g.get(&b).unwrap().to_vec_f32().unwrap();
        for j in 0..d {
            assert!(
                (got_w[j] as f64 - dw[j]).abs() < 1e-2,
                "{got_w:?} vs {dw:?}"
            );
            assert!(
                (got_b[j] as f64 - db[j]).abs() < 1e-2,
                "{got_b:?} vs {db:?}"
            );
        }
    }

    #[test]
    fn empty_inputs_are_fine() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::f32(vec![], &[0, 4]).unwrap());
        let w4 = tape.constant(vec_t(&[1.0; 4]));
        assert_eq!(
            layer_norm(&tape, &x, &w4, &w4, 1e-5).unwrap().shape(),
            &[0, 4]
        );
        let x = tape.constant(Tensor::f32(vec![], &[2, 4, 0, 3]).unwrap());
        let r4 = vec_t(&[0.0; 4]);
        let eval = BatchNormOptions {
            training: false,
            ..Default::default()
        };
        let y = batch_norm2d(&tape, &x, &w4, &w4, &r4, &r4, eval).unwrap();
        assert_eq!(y.shape(), &[2, 4, 0, 3]);
    }

    #[test]
    fn layer_norm_errors() {
        let tape = Tape::inference();
        let x = tape.constant(randn(&[2, 4], 1));
        let w4 = tape.constant(vec_t(&[1.0; 4]));
        let w3 = tape.constant(vec_t(&[1.0; 3]));
        let err = layer_norm(&tape, &x, &w4, &w3, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 4]") && err.contains("bias") && err.contains("[3]"),
            "{err}"
        );
        assert!(layer_norm(&tape, &x, &w4, &w4, -1.0).is_err());
        let s = tape.constant(Tensor::f32(vec![1.0], &[]).unwrap());
        assert!(layer_norm(&tape, &s, &w4, &w4, 1e-5).is_err());
    }
}
