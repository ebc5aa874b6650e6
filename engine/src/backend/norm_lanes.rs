//! The CPU normalisations in f32 lanes: the kernels `norm.rs`'s batch-norm and layer-norm
//! entry points run, with the readable loops kept there as their reference
//! (`batch_norm2d_*_reference`, `layer_norm_*_reference`).
//!
//! Batch norm works plane by plane (one image's channel, `H*W` values), planes in parallel, so
//! a batch with few channels still fills the threads; layer norm row by row. Within a plane or
//! row, sums run in [`LANES`] f32 partial sums (AVX-512 vectors where the CPU has them) folded
//! pairwise; a plane holds at most a few thousand values, so each partial sum adds a few
//! hundred at most. Batch norm's per-plane sums are widened to f64 and added per channel in
//! image order: the digits the variance depends on survive a channel of millions of values,
//! and the result is the same on any number of threads.
//!
//! The variance never cancels: each plane's (row's) sums are taken about its own mean `c`
//! (the values are still in L1 from the sum), and the squared deviations about a channel's
//! mean `m` are put together exactly from them,
//! `sum (v - m)^2 = sum (v - c)^2 + 2 (c - m) sum (v - c) + hw (c - m)^2` per plane.

use rayon::prelude::*;

use super::softmax::rows_per_task;
use super::vmath::LANES;

/// One plane's sums about `c`, its mean rounded to f32: `sum (v - c)` and `sum (v - c)^2`.
#[derive(Debug, Clone, Copy, Default)]
struct PlaneMoments {
    centre: f64,
    dev: f64,
    sq: f64,
}

/// `[LANES]` partial sums folded pairwise into one.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

#[inline(always)]
fn moments_generic(x: &[f32]) -> PlaneMoments {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for xs in &mut chunks {
        for i in 0..LANES {
            acc[i] += xs[i];
        }
    }
    let sum = fold(acc) + chunks.remainder().iter().sum::<f32>();
    let c = sum / x.len().max(1) as f32;
    let (mut dev, mut sq) = ([0f32; LANES], [0f32; LANES]);
    let mut chunks = x.chunks_exact(LANES);
    for xs in &mut chunks {
        for i in 0..LANES {
            let d = xs[i] - c;
            dev[i] += d;
            sq[i] += d * d;
        }
    }
    let (mut dev_t, mut sq_t) = (0f32, 0f32);
    for &v in chunks.remainder() {
        dev_t += v - c;
        sq_t += (v - c) * (v - c);
    }
    PlaneMoments {
        centre: c as f64,
        dev: (fold(dev) + dev_t) as f64,
        sq: (fold(sq) + sq_t) as f64,
    }
}

/// `(sum dy, sum dy * (x - m))` of one plane.
#[inline(always)]
fn grad_sums_generic(x: &[f32], dy: &[f32], m: f32) -> (f64, f64) {
    let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
    let mut xc = x.chunks_exact(LANES);
    let mut gc = dy.chunks_exact(LANES);
    for (xs, gs) in (&mut xc).zip(&mut gc) {
        for i in 0..LANES {
            sg[i] += gs[i];
            sgx[i] += gs[i] * (xs[i] - m);
        }
    }
    let (mut sg_t, mut sgx_t) = (0f32, 0f32);
    for (&v, &g) in xc.remainder().iter().zip(gc.remainder()) {
        sg_t += g;
        sgx_t += g * (v - m);
    }
    ((fold(sg) + sg_t) as f64, (fold(sgx) + sgx_t) as f64)
}

/// `out = (x - m) * scale + shift` (the reference's order of operations: bit-identical).
#[inline(always)]
fn normalise_generic(x: &[f32], out: &mut [f32], m: f32, scale: f32, shift: f32) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - m) * scale + shift;
    }
}

/// `dx = k * ((dy - mdy) - (x - m) * c2)`: the training-mode input gradient, `c2` the mean of
/// `dy * xhat` times `1/std`.
#[inline(always)]
fn grad_input_generic(x: &[f32], dy: &[f32], dx: &mut [f32], m: f32, k: f32, mdy: f32, c2: f32) {
    for ((d, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
        *d = k * ((g - mdy) - (v - m) * c2);
    }
}

/// One row of layer norm: `out = (x - m) * r * weight + bias` (the reference's order of
/// operations: bit-identical).
#[inline(always)]
fn layer_row_generic(x: &[f32], out: &mut [f32], m: f32, r: f32, weight: &[f32], bias: &[f32]) {
    for (((o, &v), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
        *o = (v - m) * r * w + b;
    }
}

/// Adds one row's terms to layer norm's parameter gradients: `dw += dy * (x - m) * r`,
/// `db += dy` (element by element, as the reference).
#[inline(always)]
fn layer_param_grads_generic(
    x: &[f32],
    dy: &[f32],
    m: f32,
    r: f32,
    dw: &mut [f32],
    db: &mut [f32],
) {
    for (((dw, db), &g), &v) in dw.iter_mut().zip(db.iter_mut()).zip(dy).zip(x) {
        *dw += g * (v - m) * r;
        *db += g;
    }
}

/// One row of layer norm's input gradient: with `g = dy * weight`,
/// `dx = r * (g - mean(g) - xhat * mean(g * xhat))`, both means summed in lanes.
#[inline(always)]
fn layer_grad_input_generic(x: &[f32], dy: &[f32], weight: &[f32], m: f32, r: f32, dx: &mut [f32]) {
    let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
    let mut xc = x.chunks_exact(LANES);
    let mut gc = dy.chunks_exact(LANES);
    let mut wc = weight.chunks_exact(LANES);
    for ((xs, gs), ws) in (&mut xc).zip(&mut gc).zip(&mut wc) {
        for i in 0..LANES {
            let gw = gs[i] * ws[i];
            sg[i] += gw;
            sgx[i] += gw * (xs[i] - m);
        }
    }
    let (mut sg_t, mut sgx_t) = (0f32, 0f32);
    for ((&v, &g), &w) in xc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .zip(wc.remainder())
    {
        sg_t += g * w;
        sgx_t += g * w * (v - m);
    }
    let d = x.len() as f32;
    let mg = (fold(sg) + sg_t) / d;
    let mgx = (fold(sgx) + sgx_t) * r / d;
    for (((o, &v), &g), &w) in dx.iter_mut().zip(x).zip(dy).zip(weight) {
        let xhat = (v - m) * r;
        *o = r * (g * w - mg - xhat * mgx);
    }
}

/// The AVX-512 copies of the kernels above (the same code, compiled for 16-lane vectors) and
/// the functions that pick them where the CPU has AVX-512F.
mod pick {
    use super::*;

    macro_rules! lanes_fn {
        ($name:ident, $fast:ident, $generic:ident, ($($arg:ident: $ty:ty),*) -> $ret:ty) => {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f")]
            fn $fast($($arg: $ty),*) -> $ret {
                $generic($($arg),*)
            }

            #[inline]
            pub(super) fn $name($($arg: $ty),*) -> $ret {
                #[cfg(target_arch = "x86_64")]
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { $fast($($arg),*) };
                }
                $generic($($arg),*)
            }
        };
    }

    lanes_fn!(moments, moments_avx512, moments_generic, (x: &[f32]) -> PlaneMoments);
    lanes_fn!(grad_sums, grad_sums_avx512, grad_sums_generic,
        (x: &[f32], dy: &[f32], m: f32) -> (f64, f64));
    lanes_fn!(normalise, normalise_avx512, normalise_generic,
        (x: &[f32], out: &mut [f32], m: f32, scale: f32, shift: f32) -> ());
    lanes_fn!(grad_input, grad_input_avx512, grad_input_generic,
        (x: &[f32], dy: &[f32], dx: &mut [f32], m: f32, k: f32, mdy: f32, c2: f32) -> ());
    lanes_fn!(layer_row, layer_row_avx512, layer_row_generic,
        (x: &[f32], out: &mut [f32], m: f32, r: f32, weight: &[f32], bias: &[f32]) -> ());
    lanes_fn!(layer_param_grads, layer_param_grads_avx512, layer_param_grads_generic,
        (x: &[f32], dy: &[f32], m: f32, r: f32, dw: &mut [f32], db: &mut [f32]) -> ());
    lanes_fn!(layer_grad_input, layer_grad_input_avx512, layer_grad_input_generic,
        (x: &[f32], dy: &[f32], weight: &[f32], m: f32, r: f32, dx: &mut [f32]) -> ());
}

/// Per-channel mean and biased variance of `x` laid out `[n, c, hw]`.
pub(super) fn stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    if n * hw == 0 {
        return (vec![f32::NAN; c], vec![f32::NAN; c]);
    }
    let planes: Vec<PlaneMoments> = x[..n * c * hw]
        .par_chunks(hw)
        .with_min_len(rows_per_task(hw))
        .map(pick::moments)
        .collect();
    let count = (n * hw) as f64;
    (0..c)
        .map(|ch| {
            let of_channel = || (0..n).map(|b| &planes[b * c + ch]);
            // `hw * c + sum (v - c)`: exact but for the small deviations' rounding, where an
            // f32 sum of the values themselves would lose digits to a large mean.
            let mean = of_channel()
                .map(|p| hw as f64 * p.centre + p.dev)
                .sum::<f64>()
                / count;
            let sq: f64 = of_channel()
                .map(|p| {
                    let shift = p.centre - mean;
                    p.sq + 2.0 * shift * p.dev + hw as f64 * shift * shift
                })
                .sum();
            (mean as f32, (sq / count).max(0.0) as f32)
        })
        .unzip()
}

/// `out = (x - mean[c]) * inv_std[c] * weight[c] + bias[c]` over `[n, c, hw]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward(
    x: &[f32],
    c: usize,
    hw: usize,
    mean: &[f32],
    inv_std: &[f32],
    weight: &[f32],
    bias: &[f32],
    out: &mut [f32],
) {
    if hw == 0 || c == 0 {
        return;
    }
    out.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .with_min_len(rows_per_task(hw))
        .for_each(|(plane, (o, xs))| {
            let ch = plane % c;
            pick::normalise(xs, o, mean[ch], inv_std[ch] * weight[ch], bias[ch]);
        });
}

/// Gradients of batch norm over `[n, c, hw]` (see `batch_norm2d_backward_cpu`): returns
/// `(dweight, dbias)` and fills `dx` when given.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
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
    if hw == 0 || n == 0 {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let len = n * c * hw;
    let planes: Vec<(f64, f64)> = x[..len]
        .par_chunks(hw)
        .zip(dy[..len].par_chunks(hw))
        .enumerate()
        .with_min_len(rows_per_task(hw))
        .map(|(plane, (xs, gs))| pick::grad_sums(xs, gs, mean[plane % c]))
        .collect();
    // Per channel, in image order: sum(dy) and sum(dy * xhat).
    let sums: Vec<(f64, f64)> = (0..c)
        .map(|ch| {
            let (sdy, sdyx) = (0..n)
                .map(|b| planes[b * c + ch])
                .fold((0f64, 0f64), |(a, b), (p, q)| (a + p, b + q));
            (sdy, sdyx * inv_std[ch] as f64)
        })
        .collect();
    let dweight = sums.iter().map(|s| s.1 as f32).collect();
    let dbias = sums.iter().map(|s| s.0 as f32).collect();
    if let Some(dx) = dx {
        let count = (n * hw) as f64;
        dx[..len]
            .par_chunks_mut(hw)
            .zip(x[..len].par_chunks(hw).zip(dy[..len].par_chunks(hw)))
            .enumerate()
            .with_min_len(rows_per_task(hw))
            .for_each(|(plane, (d, (xs, gs)))| {
                let ch = plane % c;
                let k = weight[ch] * inv_std[ch];
                if training {
                    let mdy = (sums[ch].0 / count) as f32;
                    let c2 = (sums[ch].1 / count * inv_std[ch] as f64) as f32;
                    pick::grad_input(xs, gs, d, mean[ch], k, mdy, c2);
                } else {
                    pick::normalise(gs, d, 0.0, k, 0.0);
                }
            });
    }
    (dweight, dbias)
}

/// Per-row mean and `1 / sqrt(biased variance + eps)` of `x` viewed as rows of length `d`.
pub(super) fn layer_stats(x: &[f32], d: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    if d == 0 {
        return (Vec::new(), Vec::new());
    }
    x.par_chunks_exact(d)
        .with_min_len(rows_per_task(d))
        .map(|row| {
            let p = pick::moments(row);
            let mean = p.centre + p.dev / d as f64;
            // sum (v - mean)^2 = sum (v - c)^2 - (sum (v - c))^2 / d, both terms small.
            let var = ((p.sq - p.dev * p.dev / d as f64) / d as f64).max(0.0);
            (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
        })
        .unzip()
}

/// `out = (x - mean) * rstd * weight + bias`, row by row.
pub(super) fn layer_forward(
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
    out.par_chunks_exact_mut(d)
        .zip(x.par_chunks_exact(d))
        .enumerate()
        .with_min_len(rows_per_task(d))
        .for_each(|(r, (o, row))| pick::layer_row(row, o, mean[r], rstd[r], weight, bias));
}

/// Gradients of layer norm (see `layer_norm_backward_cpu`): fills `dx` when given, returns
/// `(dweight, dbias)`, summed over fixed blocks of rows in parallel and the blocks in order.
#[allow(clippy::too_many_arguments)]
pub(super) fn layer_backward(
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
    let rows = mean.len();
    let (x, dy) = (&x[..rows * d], &dy[..rows * d]);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = x
        .par_chunks(block)
        .zip(dy.par_chunks(block))
        .enumerate()
        .map(|(blk, (xs, gs))| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            for (i, (row, g)) in xs.chunks_exact(d).zip(gs.chunks_exact(d)).enumerate() {
                let r = blk * rows_per_block + i;
                pick::layer_param_grads(row, g, mean[r], rstd[r], &mut dw, &mut db);
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
        dx[..rows * d]
            .par_chunks_exact_mut(d)
            .zip(x.par_chunks_exact(d).zip(dy.par_chunks_exact(d)))
            .enumerate()
            .with_min_len(rows_per_block)
            .for_each(|(r, (out, (row, g)))| {
                pick::layer_grad_input(row, g, weight, mean[r], rstd[r], out)
            });
    }
    (dweight, dbias)
}

#[cfg(test)]
#[path = "norm_lanes_tests.rs"]
mod tests;
