//! The normalisation family at the backend level: layer norm ([`layer_norm_fwd`],
//! [`layer_norm_bwd`]) and 2-d batch norm ([`batch_norm2d_fwd`], [`batch_norm2d_eval_stats`],
//! [`batch_norm2d_bwd`]), dispatched by device, with the CPU arm below them and the CUDA arm in
//! `crate::cuda::norm` (kernels `layernorm.cu`, `batchnorm.cu`).
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
//! Batch norm's statistics and gradient sums run in f32 lanes per plane (one image's channel),
//! widened to f64 across planes (`norm_lanes`): a channel of a ResNet batch holds up to
//! millions of values, and f32 sums of that many would lose the digits the variance depends
//! on. The readable f64 loops stay below as the reference (`batch_norm2d_*_reference`).
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32 (parameter gradients f32); the
//! CUDA arm keeps the activations' dtype and returns parameter gradients in the parameters'
//! dtype. The saved statistics (mean and 1/std) are f32 on either.

use rayon::prelude::*;

use super::norm_lanes;
use super::softmax::rows_per_task;
use super::BatchNormOptions;
use crate::{DType, Device, Error, Result, Tensor};

// ---------------------------------------------------------------------------------------------
// Layer norm
// ---------------------------------------------------------------------------------------------

/// Layer norm of `x` (`[..., D]`) with `weight` and `bias` (`[D]`): the output and the per-row
/// statistics its backward needs, `(y, mean, rstd)` (`mean` and `rstd = 1 / sqrt(var + eps)`
/// f32 `[rows]`), on `x`'s device.
pub fn layer_norm_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor, Tensor)> {
    const OP: &str = "layer_norm";
    x.expect_float(OP)?;
    if x.rank() == 0 {
        return Err(Error::shape(
            OP,
            "input is a scalar; it needs a last dimension to normalise over".to_string(),
        ));
    }
    let shape = x.shape().to_vec();
    let d = *shape.last().expect("rank >= 1");
    for (name, t) in [("weight", weight), ("bias", bias)] {
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
    match crate::cuda::common_device(OP, &[x, weight, bias])? {
        Device::Cpu => {
            let weight_v = weight.to_vec_f32()?;
            let bias_v = bias.to_vec_f32()?;
            let xs = x.read_f32()?;
            let (mean, rstd) = layer_norm_stats_cpu(&xs, d, eps);
            let mut out = vec![0f32; xs.len()];
            layer_norm_forward_cpu(&xs, d, &mean, &rstd, &weight_v, &bias_v, &mut out);
            let rows = mean.len();
            Ok((
                Tensor::f32(out, &shape)?,
                Tensor::f32(mean, &[rows])?,
                Tensor::f32(rstd, &[rows])?,
            ))
        }
        dev => crate::on_cuda!(dev, crate::cuda::norm::layer_norm_fwd(x, weight, bias, eps)),
    }
}

/// The gradients of [`layer_norm_fwd`] from its input `x`, the output gradient `dy`, the saved
/// `mean` and `rstd` and `weight`: `(dx, dweight, dbias)`, `dx` only when `need_dx`.
pub fn layer_norm_bwd(
    x: &Tensor,
    dy: &Tensor,
    mean: &Tensor,
    rstd: &Tensor,
    weight: &Tensor,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    const OP: &str = "layer_norm";
    check_same_shape(OP, "output gradient", dy, x)?;
    let shape = x.shape().to_vec();
    let d = *shape.last().unwrap_or(&1);
    match crate::cuda::common_device(OP, &[x, dy, mean, rstd, weight])? {
        Device::Cpu => {
            let weight_v = weight.to_vec_f32()?;
            let (mean, rstd) = (mean.to_vec_f32()?, rstd.to_vec_f32()?);
            let xs = x.read_f32()?;
            let dys = dy.read_f32()?;
            let mut dx = need_dx.then(|| vec![0f32; xs.len()]);
            let (dw, db) =
                layer_norm_backward_cpu(&xs, &dys, d, &mean, &rstd, &weight_v, dx.as_deref_mut());
            Ok((
                dx.map(|v| Tensor::f32(v, &shape)).transpose()?,
                Tensor::f32(dw, &[d])?,
                Tensor::f32(db, &[d])?,
            ))
        }
        dev => crate::on_cuda!(
            dev,
            crate::cuda::norm::layer_norm_bwd(x, dy, mean, rstd, weight).map(|(dx, dw, db)| (
                need_dx.then_some(dx),
                dw,
                db
            ))
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Batch norm
// ---------------------------------------------------------------------------------------------

/// The per-channel statistics a batch-norm backward needs: `mean` and `inv_std`
/// (`1 / sqrt(var + eps)`), f32 `[C]`, on the input's device.
#[derive(Debug, Clone)]
pub struct BatchNormStats {
    pub mean: Tensor,
    pub inv_std: Tensor,
}

/// Batch normalisation of `x` (`[N, C, H, W]`) with per-channel `weight` and `bias` (`[C]`).
/// In training the batch statistics normalise and are returned, and `running_mean` and
/// `running_var` (f32 `[C]`) are updated in place; in evaluation the running statistics
/// normalise, are only read, and no statistics are returned (see
/// [`batch_norm2d_eval_stats`]).
pub fn batch_norm2d_fwd(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    opts: BatchNormOptions,
) -> Result<(Tensor, Option<BatchNormStats>)> {
    const OP: &str = "batch_norm2d";
    x.expect_float(OP)?;
    x.expect_rank(OP, "input", 4)?;
    let shape = x.shape().to_vec();
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    check_channel_vector(OP, "weight", weight, &shape, c)?;
    check_channel_vector(OP, "bias", bias, &shape, c)?;
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
    let on = [x, weight, bias, running_mean, running_var];
    match crate::cuda::common_device(OP, &on)? {
        Device::Cpu => {}
        dev => {
            return crate::on_cuda!(
                dev,
                crate::cuda::norm::batch_norm2d_fwd(
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
    let weight_v = weight.to_vec_f32()?;
    let bias_v = bias.to_vec_f32()?;
    // Read everything before writing the running statistics: they may be views of one buffer,
    // and a write guard must not be held while another guard on that buffer is alive.
    let (old_mean, old_var) = (running_mean.to_vec_f32()?, running_var.to_vec_f32()?);
    let (mean, var, inv_std, out) = {
        let xs = x.read_f32()?;
        let (mean, var) = if opts.training {
            batch_norm2d_stats_cpu(&xs, n, c, hw)
        } else {
            (old_mean.clone(), old_var.clone())
        };
        let inv_std = inv_std_cpu(&var, opts.eps);
        let mut out = super::scratch::zeroed(xs.len());
        batch_norm2d_forward_cpu(&xs, c, hw, &mean, &inv_std, &weight_v, &bias_v, &mut out);
        (mean, var, inv_std, out)
    };
    let y = Tensor::f32(out, &shape)?;
    if !opts.training {
        return Ok((y, None));
    }
    let (rm, rv) =
        batch_norm_running_update_cpu(&old_mean, &old_var, &mean, &var, n * hw, opts.momentum);
    running_mean.write_f32()?.copy_from_slice(&rm);
    running_var.write_f32()?.copy_from_slice(&rv);
    let stats = BatchNormStats {
        mean: Tensor::f32(mean, &[c])?,
        inv_std: Tensor::f32(inv_std, &[c])?,
    };
    Ok((y, Some(stats)))
}

/// The statistics an evaluation-mode batch norm normalised with, as they are now: a copy of
/// `running_mean` and `1 / sqrt(running_var + eps)` (f32, as the CPU forward computes it), for
/// a backward that may run after the running statistics changed.
pub fn batch_norm2d_eval_stats(
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f32,
) -> Result<BatchNormStats> {
    const OP: &str = "batch_norm2d";
    let device = crate::cuda::common_device(OP, &[running_mean, running_var])?;
    let c = running_var.elem_count();
    // A [C] vector: 1/std is computed on the host on either device, so both round as the CPU.
    let inv_std = inv_std_cpu(&running_var.to_vec_f32()?, eps);
    let mean = match device {
        Device::Cpu => Tensor::f32(running_mean.to_vec_f32()?, &[c])?,
        dev => crate::on_cuda!(dev, crate::cuda::norm::f32_copy(running_mean))?,
    };
    Ok(BatchNormStats {
        mean,
        inv_std: Tensor::from_slice(&inv_std, &[c], device)?,
    })
}

/// The gradients of batch norm from its input `x`, the output gradient `dy`, the statistics
/// the forward normalised with and `weight`: `(dx, dweight, dbias)`, `dx` only when `need_dx`.
/// `training` says the statistics were the batch's (then they depend on `x`).
pub fn batch_norm2d_bwd(
    x: &Tensor,
    dy: &Tensor,
    stats: &BatchNormStats,
    weight: &Tensor,
    training: bool,
    need_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    const OP: &str = "batch_norm2d";
    x.expect_rank(OP, "input", 4)?;
    check_same_shape(OP, "output gradient", dy, x)?;
    let shape = x.shape().to_vec();
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    let on = [x, dy, &stats.mean, &stats.inv_std, weight];
    match crate::cuda::common_device(OP, &on)? {
        Device::Cpu => {
            let weight_v = weight.to_vec_f32()?;
            let (mean, inv_std) = (stats.mean.to_vec_f32()?, stats.inv_std.to_vec_f32()?);
            let xs = x.read_f32()?;
            let dys = dy.read_f32()?;
            let mut dx = need_dx.then(|| super::scratch::zeroed(xs.len()));
            let (dw, db) = batch_norm2d_backward_cpu(
                &xs,
                &dys,
                n,
                c,
                hw,
                &mean,
                &inv_std,
                &weight_v,
                training,
                dx.as_deref_mut(),
            );
            Ok((
                dx.map(|d| Tensor::f32(d, &shape)).transpose()?,
                Tensor::f32(dw, &[c])?,
                Tensor::f32(db, &[c])?,
            ))
        }
        dev => crate::on_cuda!(
            dev,
            crate::cuda::norm::batch_norm2d_bwd(
                x,
                dy,
                &stats.mean,
                &stats.inv_std,
                weight,
                training
            )
            .map(|(dx, dw, db)| (need_dx.then_some(dx), dw, db))
        ),
    }
}

/// `1 / sqrt(var + eps)`, element by element, in f32.
fn inv_std_cpu(var: &[f32], eps: f32) -> Vec<f32> {
    var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
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

/// `t` has the shape of `like`.
fn check_same_shape(op: &'static str, what: &str, t: &Tensor, like: &Tensor) -> Result<()> {
    if t.shape() != like.shape() {
        return Err(Error::shape(
            op,
            format!(
                "the {what} {:?} differs from the input {:?}",
                t.shape(),
                like.shape()
            ),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: kernels over slices
// ---------------------------------------------------------------------------------------------

/// Per-channel mean and biased variance of `x` laid out `[n, c, hw]` (planes in parallel, f32
/// lanes within a plane, f64 across planes; [`batch_norm2d_stats_reference`] is the f64 loop).
pub fn batch_norm2d_stats_cpu(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    norm_lanes::stats(x, n, c, hw)
}

/// `out = (x - mean[c]) * inv_std[c] * weight[c] + bias[c]` over `[n, c, hw]` (planes in
/// parallel, in vectors; bit-identical to [`batch_norm2d_forward_reference`]).
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
    norm_lanes::forward(x, c, hw, mean, inv_std, weight, bias, out)
}

/// Gradients of batch norm over `[n, c, hw]`. `mean`/`inv_std` are the statistics the forward
/// used: the batch ones when `training` (then they depend on `x`, which adds the two mean terms
/// to `dx`), the running ones otherwise. Returns `(dweight, dbias)` and fills `dx` when given.
/// Both sums in one pass per plane in f32 lanes, f64 across planes, `dx` in f32: within f32
/// rounding of [`batch_norm2d_backward_reference`] (its sums and `dx` in f64).
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
    norm_lanes::backward(x, dy, n, c, hw, mean, inv_std, weight, training, dx)
}

/// The reference of [`batch_norm2d_stats_cpu`]: per-channel mean and biased variance, two
/// passes in f64 (channels in parallel).
pub fn batch_norm2d_stats_reference(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
) -> (Vec<f32>, Vec<f32>) {
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

/// The reference of [`batch_norm2d_forward_cpu`]: the loop, planes in parallel.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_forward_reference(
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

/// The reference of [`batch_norm2d_backward_cpu`]: one running f64 sum per channel, `dx` in
/// f64.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm2d_backward_reference(
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

/// Per-row mean and `1 / sqrt(biased variance + eps)` of `x` viewed as rows of length `d`
/// (rows in parallel, f32 lanes about each row's mean, the variance put together in f64;
/// [`layer_norm_stats_reference`] is the f64 loop).
pub fn layer_norm_stats_cpu(x: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    norm_lanes::layer_stats(x, d, eps)
}

/// `out = (x - mean) * rstd * weight + bias`, row by row, in vectors (bit-identical to
/// [`layer_norm_forward_reference`]).
pub fn layer_norm_forward_cpu(
    x: &[f32],
    d: usize,
    mean: &[f32],
    rstd: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    norm_lanes::layer_forward(x, d, mean, rstd, weight, bias, out)
}

/// Gradients of layer norm: fills `dx` when given, returns `(dweight, dbias)`.
/// `dx = rstd * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * weight`. The parameter
/// gradients are bit-identical to [`layer_norm_backward_reference`]; `dx`'s two row sums run
/// in lanes, within f32 rounding of the reference's running sums.
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
    norm_lanes::layer_backward(x, dy, d, mean, rstd, weight, dx)
}

/// The reference of [`layer_norm_stats_cpu`]: two passes per row in f64.
pub fn layer_norm_stats_reference(x: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
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

/// The reference of [`layer_norm_forward_cpu`].
pub fn layer_norm_forward_reference(
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

/// The reference of [`layer_norm_backward_cpu`]: running f32 sums per row.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_backward_reference(
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
