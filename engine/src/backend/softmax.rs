//! The softmax family at the backend level: [`softmax_fwd`] and [`softmax_bwd`] over the last
//! dimension, dispatched by device, with the CPU arm below them (the row kernels, which
//! attention, the norms and the losses also use on rows they hold) and the CUDA arm in
//! `crate::cuda::softmax` (kernels `softmax.cu`).
//!
//! Both subtract the row maximum before exponentiating, so large logits (a confident teacher,
//! a temperature below one) do not overflow. A row whose entries are all `-inf` has no defined
//! distribution; its softmax is NaN, as in PyTorch. Callers that mask (attention) use a large
//! finite negative instead.
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm keeps its input's
//! dtype (bf16 activations stay bf16), as every CUDA op does.

use rayon::prelude::*;

use super::SoftmaxKind;
use crate::{Device, Error, Result, Tensor};

/// `softmax(x)` or `log_softmax(x)` over the last dimension of `x` (float, rank >= 1), on
/// `x`'s device.
pub fn softmax_fwd(x: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let op = kind.op_name();
    check_float_rows(op, "input", x)?;
    match x.device() {
        Device::Cpu => {
            let row_len = *x.shape().last().expect("rank >= 1");
            let mut out = vec![0f32; x.elem_count()];
            let forward = match kind {
                SoftmaxKind::Softmax => softmax_forward_cpu,
                SoftmaxKind::LogSoftmax => log_softmax_forward_cpu,
            };
            forward(&x.read_f32()?, row_len, &mut out);
            Tensor::f32(out, x.shape())
        }
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::softmax::softmax_fwd(x, kind)),
    }
}

/// The gradient of [`softmax_fwd`] with respect to its input, from its output `y` and the
/// gradient `dy` of `y` (same shape and device), on `y`'s device.
pub fn softmax_bwd(y: &Tensor, dy: &Tensor, kind: SoftmaxKind) -> Result<Tensor> {
    let op = kind.op_name();
    check_float_rows(op, "output", y)?;
    check_float_rows(op, "output gradient", dy)?;
    if dy.shape() != y.shape() {
        return Err(Error::shape(
            op,
            format!(
                "the output gradient {:?} differs from the output {:?}",
                dy.shape(),
                y.shape()
            ),
        ));
    }
    if dy.device() != y.device() {
        return Err(Error::invalid(
            op,
            format!(
                "the output is on {:?} and its gradient on {:?}; move them to one device",
                y.device(),
                dy.device()
            ),
        ));
    }
    match y.device() {
        Device::Cpu => {
            let row_len = *y.shape().last().expect("rank >= 1");
            let mut dx = vec![0f32; y.elem_count()];
            let backward = match kind {
                SoftmaxKind::Softmax => softmax_backward_cpu,
                SoftmaxKind::LogSoftmax => log_softmax_backward_cpu,
            };
            backward(&y.read_f32()?, &dy.read_f32()?, row_len, &mut dx);
            Tensor::f32(dx, y.shape())
        }
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::softmax::softmax_bwd(y, dy, kind))
        }
    }
}

/// A float tensor with a last dimension to normalise over.
fn check_float_rows(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    t.expect_float(op)?;
    if t.rank() == 0 {
        return Err(Error::shape(
            op,
            format!("the {what} is a scalar; it needs a last dimension to normalise over"),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: row kernels over slices
// ---------------------------------------------------------------------------------------------

/// Rows handed to one rayon task: enough elements (about 16K) that the split pays for itself.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// `out = softmax(input)` for one row.
pub fn softmax_row_cpu(input: &[f32], out: &mut [f32]) {
    let max = input.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `out = log_softmax(input) = (input - max) - ln(sum(exp(input - max)))` for one row.
/// Subtracting `max` first keeps the digits of `input - max` when the logits are large.
pub fn log_softmax_row_cpu(input: &[f32], out: &mut [f32]) {
    let max = input.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = input.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max) - log_sum;
    }
}

/// Gradient of softmax for one row, from its output `y`: `dx = y * (dy - <dy, y>)`.
pub fn softmax_backward_row_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = yi * (gi - dot);
    }
}

/// Gradient of log-softmax for one row, from its output `y`: `dx = dy - exp(y) * sum(dy)`.
pub fn log_softmax_backward_row_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let sum: f32 = dy.iter().sum();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = gi - yi.exp() * sum;
    }
}

/// Softmax of every row of length `row_len` in `x` (rows in parallel).
pub fn softmax_forward_cpu(x: &[f32], row_len: usize, out: &mut [f32]) {
    apply_rows(x, row_len, out, softmax_row_cpu);
}

/// Log-softmax of every row of length `row_len` in `x` (rows in parallel).
pub fn log_softmax_forward_cpu(x: &[f32], row_len: usize, out: &mut [f32]) {
    apply_rows(x, row_len, out, log_softmax_row_cpu);
}

/// Softmax backward for every row, from the forward output `y` and upstream `dy`.
pub fn softmax_backward_cpu(y: &[f32], dy: &[f32], row_len: usize, dx: &mut [f32]) {
    apply_rows2(y, dy, row_len, dx, softmax_backward_row_cpu);
}

/// Log-softmax backward for every row, from the forward output `y` and upstream `dy`.
pub fn log_softmax_backward_cpu(y: &[f32], dy: &[f32], row_len: usize, dx: &mut [f32]) {
    apply_rows2(y, dy, row_len, dx, log_softmax_backward_row_cpu);
}

fn apply_rows(x: &[f32], row_len: usize, out: &mut [f32], f: fn(&[f32], &mut [f32])) {
    if row_len == 0 {
        return;
    }
    out.par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .with_min_len(rows_per_task(row_len))
        .for_each(|(o, i)| f(i, o));
}

fn apply_rows2(
    a: &[f32],
    b: &[f32],
    row_len: usize,
    out: &mut [f32],
    f: fn(&[f32], &[f32], &mut [f32]),
) {
    if row_len == 0 {
        return;
    }
    out.par_chunks_mut(row_len)
        .zip(a.par_chunks(row_len).zip(b.par_chunks(row_len)))
        .with_min_len(rows_per_task(row_len))
        .for_each(|(o, (a, b))| f(a, b, o));
}
