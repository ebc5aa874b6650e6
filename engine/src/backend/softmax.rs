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

use super::vmath::{exp_fast, LANES};
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

// The row kernels in f32 lanes: sums and maxima in `LANES` partial results folded pairwise,
// exponentials through `vmath::exp_fast` (2 ulp), compiled for AVX-512 and for the baseline
// and picked at run time (as `norm_lanes` does). The scalar loops below them,
// `*_row_reference` (libm's `exp`, sums in order), are their oracle: the tests hold the two
// within a few ulp of each other.

/// `out = softmax(input)` for one row.
pub fn softmax_row_cpu(input: &[f32], out: &mut [f32]) {
    pick::softmax_row(input, out)
}

/// `out = log_softmax(input) = (input - max) - ln(sum(exp(input - max)))` for one row.
/// Subtracting `max` first keeps the digits of `input - max` when the logits are large.
pub fn log_softmax_row_cpu(input: &[f32], out: &mut [f32]) {
    pick::log_softmax_row(input, out)
}

/// Gradient of softmax for one row, from its output `y`: `dx = y * (dy - <dy, y>)`.
pub fn softmax_backward_row_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    pick::softmax_backward_row(y, dy, dx)
}

/// Gradient of log-softmax for one row, from its output `y`: `dx = dy - exp(y) * sum(dy)`.
pub fn log_softmax_backward_row_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    pick::log_softmax_backward_row(y, dy, dx)
}

/// [`softmax_row_cpu`] as plain scalar loops (the oracle of the lane kernels).
pub fn softmax_row_reference(input: &[f32], out: &mut [f32]) {
    let max = input.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// [`log_softmax_row_cpu`] as plain scalar loops.
pub fn log_softmax_row_reference(input: &[f32], out: &mut [f32]) {
    let max = input.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = input.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max) - log_sum;
    }
}

/// [`softmax_backward_row_cpu`] as plain scalar loops.
pub fn softmax_backward_row_reference(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = yi * (gi - dot);
    }
}

/// [`log_softmax_backward_row_cpu`] as plain scalar loops.
pub fn log_softmax_backward_row_reference(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let sum: f32 = dy.iter().sum();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = gi - yi.exp() * sum;
    }
}

/// `[LANES]` partial sums folded pairwise into one.
#[inline(always)]
fn fold_sum(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// The largest value of `x` (NaN ignored, as `f32::max` does; `-inf` when empty).
#[inline(always)]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for xs in &mut chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(xs[i]);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `out = exp(x - max)`, returning the sum of `out`.
#[inline(always)]
fn exp_shifted(x: &[f32], max: f32, out: &mut [f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut oc = out.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (os, xs) in (&mut oc).zip(&mut xc) {
        for i in 0..LANES {
            os[i] = exp_fast(xs[i] - max);
            acc[i] += os[i];
        }
    }
    let mut tail = 0f32;
    for (o, &v) in oc.into_remainder().iter_mut().zip(xc.remainder()) {
        *o = exp_fast(v - max);
        tail += *o;
    }
    fold_sum(acc) + tail
}

#[inline(always)]
fn softmax_row_generic(input: &[f32], out: &mut [f32]) {
    let max = row_max(input);
    let inv = 1.0 / exp_shifted(input, max, out);
    out.iter_mut().for_each(|o| *o *= inv);
}

#[inline(always)]
fn log_softmax_row_generic(input: &[f32], out: &mut [f32]) {
    let max = row_max(input);
    // `out` holds the exponentials until the log of their sum is known.
    let log_sum = exp_shifted(input, max, out).ln();
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max) - log_sum;
    }
}

#[inline(always)]
fn softmax_backward_row_generic(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let mut acc = [0f32; LANES];
    let mut yc = y.chunks_exact(LANES);
    let mut gc = dy.chunks_exact(LANES);
    for (ys, gs) in (&mut yc).zip(&mut gc) {
        for i in 0..LANES {
            acc[i] += ys[i] * gs[i];
        }
    }
    let tail: f32 = yc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    let dot = fold_sum(acc) + tail;
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = yi * (gi - dot);
    }
}

#[inline(always)]
fn log_softmax_backward_row_generic(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let mut acc = [0f32; LANES];
    let mut gc = dy.chunks_exact(LANES);
    for gs in &mut gc {
        for i in 0..LANES {
            acc[i] += gs[i];
        }
    }
    let sum = fold_sum(acc) + gc.remainder().iter().sum::<f32>();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = gi - exp_fast(yi) * sum;
    }
}

/// The AVX-512 copies of the row kernels (the same code, compiled for 16-lane vectors) and the
/// functions that pick them where the CPU has AVX-512F.
mod pick {
    use super::*;

    macro_rules! lanes_fn {
        ($name:ident, $fast:ident, $generic:ident, ($($arg:ident: $ty:ty),*)) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn $fast($($arg: $ty),*) {
                $generic($($arg),*)
            }

            #[inline]
            pub(super) fn $name($($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { $fast($($arg),*) };
                }
                $generic($($arg),*)
            }
        };
    }

    lanes_fn!(softmax_row, softmax_row_avx512, softmax_row_generic,
        (input: &[f32], out: &mut [f32]));
    lanes_fn!(log_softmax_row, log_softmax_row_avx512, log_softmax_row_generic,
        (input: &[f32], out: &mut [f32]));
    lanes_fn!(softmax_backward_row, softmax_backward_row_avx512, softmax_backward_row_generic,
        (y: &[f32], dy: &[f32], dx: &mut [f32]));
    lanes_fn!(log_softmax_backward_row, log_softmax_backward_row_avx512,
        log_softmax_backward_row_generic, (y: &[f32], dy: &[f32], dx: &mut [f32]));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of every length up to a few vectors (tails included) and the attention and
    /// vocabulary widths: small and large logits, masked entries, a single huge one.
    fn rows() -> Vec<Vec<f32>> {
        let mut out = Vec::new();
        for (seed, len) in [1, 2, 7, 15, 16, 17, 31, 33, 64, 128, 129, 1000, 30522]
            .into_iter()
            .enumerate()
        {
            let scale = [0.1, 1.0, 8.0, 40.0][seed % 4];
            let mut row: Vec<f32> = (0..len)
                .map(|i| scale * crate::rng::normal_at(seed as u64 + 11, i as u64))
                .collect();
            if len > 3 {
                row[len / 2] = -1e9; // a masked key
                row[1] += 80.0;
            }
            out.push(row);
        }
        out
    }

    /// `|got - want| <= rel * |want| + slack[i]` (plus a floor of `rel` times a thousandth of
    /// the row's largest value, for entries that underflow).
    fn assert_close(what: &str, got: &[f32], want: &[f32], rel: f32, slack: &[f32]) {
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (g - w).abs();
            let bound = rel * (w.abs() + 1e-3 * scale) + slack.get(i).copied().unwrap_or(0.0);
            assert!(err <= bound, "{what}[{i}] of {}: {g} vs {w}", got.len());
        }
    }

    #[test]
    fn lane_kernels_match_the_scalar_reference() {
        for x in rows() {
            let n = x.len();
            let dy: Vec<f32> = (0..n).map(|i| crate::rng::normal_at(5, i as u64)).collect();
            let (mut got, mut want) = (vec![0f32; n], vec![0f32; n]);
            softmax_row_cpu(&x, &mut got);
            softmax_row_reference(&x, &mut want);
            assert_close("softmax", &got, &want, 4e-6, &[]);
            // The backward passes reduce `dy` (or `dy * y`) to one sum, in lanes here and in
            // order in the reference: either may be off by the summation bound
            // `n * 2^-24 * sum |terms|`, times the factor the sum is multiplied by.
            let sum_bound = |terms: f32| n as f32 * f32::EPSILON / 2.0 * terms;
            let y = want.clone();
            let abs_dot: f32 = y.iter().zip(&dy).map(|(a, b)| (a * b).abs()).sum();
            let slack: Vec<f32> = y.iter().map(|v| v.abs() * sum_bound(abs_dot)).collect();
            softmax_backward_row_cpu(&y, &dy, &mut got);
            softmax_backward_row_reference(&y, &dy, &mut want);
            assert_close("softmax backward", &got, &want, 1e-5, &slack);

            log_softmax_row_cpu(&x, &mut got);
            log_softmax_row_reference(&x, &mut want);
            assert_close("log_softmax", &got, &want, 2e-6, &[]);
            let y = want.clone();
            let abs_sum: f32 = dy.iter().map(|v| v.abs()).sum();
            let slack: Vec<f32> = y.iter().map(|v| v.exp() * sum_bound(abs_sum)).collect();
            log_softmax_backward_row_cpu(&y, &dy, &mut got);
            log_softmax_backward_row_reference(&y, &dy, &mut want);
            assert_close("log_softmax backward", &got, &want, 1e-5, &slack);
        }
    }

    #[test]
    fn undefined_rows_stay_nan_as_in_the_reference() {
        let x = [f32::NEG_INFINITY; 20];
        let mut out = [0f32; 20];
        softmax_row_cpu(&x, &mut out);
        assert!(out.iter().all(|v| v.is_nan()));
        let mut x = [0.5f32; 20];
        x[3] = f32::INFINITY;
        softmax_row_cpu(&x, &mut out);
        assert!(out[3].is_nan());
        // A row of one value: exactly 1.
        softmax_row_cpu(&[3.0], &mut out[..1]);
        assert_eq!(out[0], 1.0);
    }
}
