//! The activations at the backend level — `relu` (ResNet), `gelu` (BERT) and `tanh` —
//! [`activation_fwd`] and [`activation_bwd`], dispatched by device, with the CPU arm below them
//! and the CUDA arm in `crate::cuda::elementwise` (kernels `activation.cu`).
//!
//! GELU is the exact form `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.GELU()` by
//! default and Hugging Face BERT's `"gelu"` compute it, not the tanh approximation: a student
//! trained here must match a teacher trained in PyTorch. Rust's std has no `erf`, and the
//! engine takes no `libm` dependency, so `erf` below is a double-precision implementation
//! (rational approximations on four intervals, accurate to under one unit in the last place):
//! the reference ([`gelu_forward_ref`], [`gelu_backward_ref`]). The kernels the CPU runs
//! evaluate GELU in f32, vectorised (`vmath::normal_cdf`), within 6 ulp of it.
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm keeps its input's
//! dtype.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use rayon::prelude::*;

use super::elementwise::{map_cpu, zip_map_cpu, PARALLEL_MIN};
use super::vmath::{self, LANES};
use super::Activation;
use crate::{Device, Result, Tensor};

/// Elements per rayon task of the vectorised GELU loops (a multiple of [`LANES`]).
const PAR_CHUNK: usize = 1 << 13;

/// The activation `kind` of `x`, on its device.
pub fn activation_fwd(kind: Activation, x: &Tensor) -> Result<Tensor> {
    x.expect_float(kind.name())?;
    match x.device() {
        Device::Cpu => {
            let forward = match kind {
                Activation::Relu => relu_forward_cpu,
                Activation::Gelu => gelu_forward_cpu,
                Activation::Tanh => tanh_forward_cpu,
            };
            Tensor::f32(forward(&x.read_f32()?), x.shape())
        }
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::elementwise::activation_fwd(kind, x))
        }
    }
}

/// The gradient of [`activation_fwd`] from the value its backward reads (`saved`: the output
/// when [`Activation::backward_reads_output`], else the input) and the output gradient `g`
/// (on a GPU in `saved`'s dtype).
pub fn activation_bwd(kind: Activation, saved: &Tensor, g: &Tensor) -> Result<Tensor> {
    if saved.shape() != g.shape() {
        return Err(crate::Error::shape(
            kind.name(),
            format!(
                "the output gradient {:?} differs from the saved value {:?}",
                g.shape(),
                saved.shape()
            ),
        ));
    }
    match crate::cuda::common_device(kind.name(), &[saved, g])? {
        Device::Cpu => {
            let backward = match kind {
                Activation::Relu => relu_backward_cpu,
                Activation::Gelu => gelu_backward_cpu,
                Activation::Tanh => tanh_backward_cpu,
            };
            Tensor::f32(backward(&saved.read_f32()?, &g.read_f32()?), g.shape())
        }
        d => crate::on_cuda!(d, crate::cuda::elementwise::activation_bwd(kind, saved, g)),
    }
}

// ---------------------------------------------------------------------------------------------
// erf
// ---------------------------------------------------------------------------------------------
//
// The coefficients are those of fdlibm's s_erf.c, whose notice reads:
//   Copyright (C) 1993 by Sun Microsystems, Inc. All rights reserved.
//   Developed at SunPro, a Sun Microsystems, Inc. business.
//   Permission to use, copy, modify, and distribute this software is freely granted,
//   provided that this notice is preserved.

/// The coefficients, written as published (with more digits than an f64 holds, so that they
/// can be compared with the source digit for digit).
#[allow(clippy::excessive_precision)]
pub(crate) mod coef {
    /// erf(1) rounded to single precision: region 2 approximates erf(x) - ERX.
    pub const ERX: f64 = 8.45062911510467529297e-01;
    /// 2/sqrt(pi) - 1, the slope correction for tiny arguments.
    pub const EFX: f64 = 1.28379167095512586316e-01;

    /// Region 1, |x| < 0.84375: erf(x) = x + x * P(x^2) / Q(x^2).
    pub const PP: [f64; 5] = [
        1.28379167095512558561e-01,
        -3.25042107247001499370e-01,
        -2.84817495755985104766e-02,
        -5.77027029648944159157e-03,
        -2.37630166566501626084e-05,
    ];
    pub const QQ: [f64; 5] = [
        3.97917223959155352819e-01,
        6.50222499887672944485e-02,
        5.08130628187576562776e-03,
        1.32494738004321644526e-04,
        -3.96022827877536812320e-06,
    ];

    /// Region 2, 0.84375 <= |x| < 1.25: erf(x) = ERX + P(s) / Q(s) with s = |x| - 1.
    pub const PA: [f64; 7] = [
        -2.36211856075265944077e-03,
        4.14856118683748331666e-01,
        -3.72207876035701323847e-01,
        3.18346619901161753674e-01,
        -1.10894694282396677476e-01,
        3.54783043256182359371e-02,
        -2.16637559486879084300e-03,
    ];
    pub const QA: [f64; 6] = [
        1.06420880400844228286e-01,
        5.40397917702171048937e-01,
        7.18286544141962662868e-02,
        1.26171219808761642112e-01,
        1.36370839120290507362e-02,
        1.19844998467991074170e-02,
    ];

    /// Region 3, 1.25 <= |x| < 1/0.35: erfc(x) = exp(-x^2 - 0.5625 + R(1/x^2) / S(1/x^2)) / x.
    pub const RA: [f64; 8] = [
        -9.86494403484714822705e-03,
        -6.93858572707181764372e-01,
        -1.05586262253232909814e+01,
        -6.23753324503260060396e+01,
        -1.62396669462573470355e+02,
        -1.84605092906711035994e+02,
        -8.12874355063065934246e+01,
        -9.81432934416914548592e+00,
    ];
    pub const SA: [f64; 8] = [
        1.96512716674392571292e+01,
        1.37657754143519042600e+02,
        4.34565877475229228821e+02,
        6.45387271733267880336e+02,
        4.29008140027567833386e+02,
        1.08635005541779435134e+02,
        6.57024977031928170135e+00,
        -6.04244152148580987438e-02,
    ];

    /// Region 4, 1/0.35 <= |x| < 6: the same form as region 3 with other coefficients.
    pub const RB: [f64; 7] = [
        -9.86494292470009928597e-03,
        -7.99283237680523006574e-01,
        -1.77579549177547519889e+01,
        -1.60636384855821916062e+02,
        -6.37566443368389627722e+02,
        -1.02509513161107724954e+03,
        -4.83519191608651397019e+02,
    ];
    pub const SB: [f64; 7] = [
        3.03380607434824582924e+01,
        3.25792512996573918826e+02,
        1.53672958608443695994e+03,
        3.19985821950859553908e+03,
        2.55305040643316442583e+03,
        4.74528541206955367215e+02,
        -2.24409524465858183362e+01,
    ];
}
use coef::*;

/// `c[0] + c[1] z + c[2] z^2 + ...` (Horner).
#[inline]
fn poly(c: &[f64], z: f64) -> f64 {
    c.iter().rev().fold(0.0, |acc, &k| acc * z + k)
}

/// `1 + c[0] z + c[1] z^2 + ...`: the denominators, whose constant term is 1.
#[inline]
fn poly1(c: &[f64], z: f64) -> f64 {
    1.0 + z * poly(c, z)
}

/// The error function `erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt`, to double precision.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let value = if a < 2f64.powi(-28) {
        // erf(x) ~ 2x/sqrt(pi) to double precision.
        a + EFX * a
    } else if a < 0.84375 {
        let z = a * a;
        a + a * (poly(&PP, z) / poly1(&QQ, z))
    } else if a < 1.25 {
        let s = a - 1.0;
        ERX + poly(&PA, s) / poly1(&QA, s)
    } else if a < 6.0 {
        1.0 - erfc_tail(a)
    } else {
        // erfc(6) < 2e-17: erf is 1 to double precision.
        1.0
    };
    value.copysign(x)
}

/// `erfc(a) = 1 - erf(a)` for `1.25 <= a < 28` (fdlibm's `erfc` range for these
/// coefficients), to double precision relative to itself (the tail, where `1 - erf` would
/// cancel).
pub(crate) fn erfc_tail(a: f64) -> f64 {
    let s = 1.0 / (a * a);
    let (r, q) = if a < 1.0 / 0.35 {
        (poly(&RA, s), poly1(&SA, s))
    } else {
        (poly(&RB, s), poly1(&SB, s))
    };
    // exp(-a^2) with a split at `hi` (a with the low 32 bits of its mantissa cleared, so
    // hi^2 is exact): exp(-hi^2) * exp((hi - a)(hi + a)) loses no accuracy to rounding a^2.
    let hi = f64::from_bits(a.to_bits() & 0xffff_ffff_0000_0000);
    (-hi * hi - 0.5625).exp() * ((hi - a) * (hi + a) + r / q).exp() / a
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: kernels over slices
// ---------------------------------------------------------------------------------------------

/// `max(x, 0)`; NaN stays NaN (as in PyTorch).
pub fn relu_forward_cpu(x: &[f32]) -> Vec<f32> {
    map_cpu(x, |v| if v < 0.0 { 0.0 } else { v })
}

/// `g * [y > 0]` from the output `y`: the derivative at 0 is taken as 0, as in PyTorch.
pub fn relu_backward_cpu(y: &[f32], g: &[f32]) -> Vec<f32> {
    zip_map_cpu(y, g, |y, g| if y > 0.0 { g } else { 0.0 })
}

/// Standard normal CDF `Phi(x) = (1 + erf(x / sqrt 2)) / 2`, through `erfc` in the lower
/// tail (`x <= -1.25 sqrt 2`), where `1 + erf` would cancel: accurate relative to itself.
#[inline]
pub(crate) fn normal_cdf(x: f64) -> f64 {
    let a = -x * FRAC_1_SQRT_2;
    if a < 1.25 {
        0.5 * (1.0 + erf(-a))
    } else if a < 28.0 {
        0.5 * erfc_tail(a)
    } else {
        // erfc(28) < 1e-342: below the smallest f64.
        0.0
    }
}

/// Exact GELU, `x * Phi(x)`, in f64 and rounded once: the reference of [`gelu_forward_cpu`].
pub fn gelu_forward_ref(x: &[f32]) -> Vec<f32> {
    map_cpu(x, |v| {
        let v = v as f64;
        (v * normal_cdf(v)) as f32
    })
}

/// `g * d/dx [x Phi(x)] = g * (Phi(x) + x phi(x))`, with `phi` the standard normal density, in
/// f64: the reference of [`gelu_backward_cpu`].
pub fn gelu_backward_ref(x: &[f32], g: &[f32]) -> Vec<f32> {
    let inv_sqrt_2pi = 1.0 / (2.0 * PI).sqrt();
    zip_map_cpu(x, g, |x, g| {
        let x = x as f64;
        let density = inv_sqrt_2pi * (-0.5 * x * x).exp();
        (g as f64 * (normal_cdf(x) + x * density)) as f32
    })
}

// GELU in f32, vectorised: `vmath::normal_cdf` (a polynomial near 0, the tail through one
// exponential) in 16-lane chunks, compiled for AVX-512 and for the baseline and picked at run
// time. `x * Phi(x)` is formed as `x - x * Phi(-x)` for positive `x`, so it rounds once where
// it approaches `x`. Within 6 ulp of the f64 reference where `|x| < 7.5` (relative 4e-7, from
// the fits), 3e-13 absolute beyond; the gradient within 2e-7 absolute (`tests` below).

/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    let (lower, upper, _) = vmath::normal_cdf(x);
    if x > 0.0 {
        // `upper` is 0 beyond 13.2: the clamp only keeps `inf * 0` from making NaN of +inf.
        x - x.min(16.0) * upper
    } else {
        x * lower
    }
}

#[inline(always)]
fn gelu_grad_one(x: f32, g: f32) -> f32 {
    let (lower, _, gauss) = vmath::normal_cdf(x);
    g * (lower + x * (gauss * INV_SQRT_2PI))
}

#[inline(always)]
fn gelu_fwd_generic(x: &[f32], y: &mut [f32]) {
    let mut yc = y.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    for (ys, xs) in (&mut yc).zip(&mut xc) {
        for i in 0..LANES {
            ys[i] = gelu_one(xs[i]);
        }
    }
    for (o, &v) in yc.into_remainder().iter_mut().zip(xc.remainder()) {
        *o = gelu_one(v);
    }
}

#[inline(always)]
fn gelu_bwd_generic(x: &[f32], g: &[f32], dx: &mut [f32]) {
    let mut dc = dx.chunks_exact_mut(LANES);
    let mut xc = x.chunks_exact(LANES);
    let mut gc = g.chunks_exact(LANES);
    for ((ds, xs), gs) in (&mut dc).zip(&mut xc).zip(&mut gc) {
        for i in 0..LANES {
            ds[i] = gelu_grad_one(xs[i], gs[i]);
        }
    }
    let rest = dc.into_remainder().iter_mut().zip(xc.remainder());
    for ((o, &v), &gv) in rest.zip(gc.remainder()) {
        *o = gelu_grad_one(v, gv);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_fwd_avx512(x: &[f32], y: &mut [f32]) {
    gelu_fwd_generic(x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn gelu_bwd_avx512(x: &[f32], g: &[f32], dx: &mut [f32]) {
    gelu_bwd_generic(x, g, dx)
}

fn gelu_fwd_chunk(x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { gelu_fwd_avx512(x, y) };
    }
    gelu_fwd_generic(x, y)
}

fn gelu_bwd_chunk(x: &[f32], g: &[f32], dx: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { gelu_bwd_avx512(x, g, dx) };
    }
    gelu_bwd_generic(x, g, dx)
}

/// Exact GELU, `x * Phi(x)`, in f32 (see the comment above; [`gelu_forward_ref`] is the f64
/// reference); in parallel on large inputs, element by element the same either way.
pub fn gelu_forward_cpu(x: &[f32]) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    if x.len() >= PARALLEL_MIN {
        y.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK))
            .for_each(|(y, x)| gelu_fwd_chunk(x, y));
    } else {
        gelu_fwd_chunk(x, &mut y);
    }
    y
}

/// `g * (Phi(x) + x phi(x))` in f32 ([`gelu_backward_ref`] is the f64 reference).
pub fn gelu_backward_cpu(x: &[f32], g: &[f32]) -> Vec<f32> {
    assert_eq!(
        x.len(),
        g.len(),
        "gelu_backward_cpu on slices of different lengths"
    );
    let mut dx = vec![0f32; x.len()];
    if x.len() >= PARALLEL_MIN {
        dx.par_chunks_mut(PAR_CHUNK)
            .zip(x.par_chunks(PAR_CHUNK).zip(g.par_chunks(PAR_CHUNK)))
            .for_each(|(dx, (x, g))| gelu_bwd_chunk(x, g, dx));
    } else {
        gelu_bwd_chunk(x, g, &mut dx);
    }
    dx
}

pub fn tanh_forward_cpu(x: &[f32]) -> Vec<f32> {
    map_cpu(x, f32::tanh)
}

/// `g * (1 - y^2)` from the output `y = tanh(x)`.
pub fn tanh_backward_cpu(y: &[f32], g: &[f32]) -> Vec<f32> {
    zip_map_cpu(y, g, |y, g| g * (1.0 - y * y))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dense grid on [-10, 10], every 2^12th f32 (all binades), and the specials: the f32
    /// kernels against the f64 reference.
    #[test]
    fn gelu_kernels_match_the_f64_reference() {
        let mut x: Vec<f32> = (0u32..)
            .map(|i| f32::from_bits(i << 12))
            .take_while(|v| *v <= 10.0)
            .chain((0..200_000).map(|i| i as f32 * 5e-5))
            .flat_map(|v| [v, -v])
            .collect();
        x.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -1e-30]);
        let g: Vec<f32> = (0..x.len()).map(|i| 1.0 - (i % 7) as f32 * 0.25).collect();
        let (y, y_ref) = (gelu_forward_cpu(&x), gelu_forward_ref(&x));
        let (dx, dx_ref) = (gelu_backward_cpu(&x, &g), gelu_backward_ref(&x, &g));
        let (mut worst_ulp, mut worst_abs, mut worst_grad, mut at) = (0f64, 0f64, 0f64, 0f32);
        for i in 0..x.len() {
            if y_ref[i].is_nan() {
                assert!(
                    y[i].is_nan() && dx[i].is_nan(),
                    "gelu({}) should be NaN",
                    x[i]
                );
                continue;
            }
            let err = (y[i] as f64 - y_ref[i] as f64).abs();
            worst_abs = worst_abs.max(err);
            // Normal outputs only: below 1e-37 an ulp is a subnormal step.
            if x[i].abs() < 7.5 && y_ref[i].abs() > 1e-37 {
                let ulp = (y_ref[i].abs().next_up() - y_ref[i].abs()) as f64;
                if err / ulp > worst_ulp {
                    worst_ulp = err / ulp;
                    at = x[i];
                }
            }
            if dx_ref[i].is_nan() {
                assert!(dx[i].is_nan(), "gelu'({}) should be NaN", x[i]);
            } else {
                worst_grad = worst_grad.max((dx[i] as f64 - dx_ref[i] as f64).abs());
            }
        }
        assert!(worst_ulp <= 6.0, "forward: {worst_ulp} ulp at {at}");
        eprintln!("gelu: {worst_ulp} ulp, {worst_abs} absolute; gradient {worst_grad} absolute");
        assert!(worst_abs <= 2.4e-7, "forward: {worst_abs} absolute");
        assert!(worst_grad <= 2.5e-7, "backward: {worst_grad} absolute");
        assert_eq!(gelu_forward_cpu(&[f32::INFINITY])[0], f32::INFINITY);
        assert_eq!(gelu_forward_cpu(&[0.0])[0], 0.0);
    }

    #[test]
    fn the_parallel_path_is_element_by_element() {
        let x: Vec<f32> = (0..PARALLEL_MIN + 37)
            .map(|i| ((i * 7919) % 2000) as f32 * 0.005 - 5.0)
            .collect();
        let g: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.1).collect();
        let (y, dx) = (gelu_forward_cpu(&x), gelu_backward_cpu(&x, &g));
        for i in (0..x.len()).step_by(101).chain([x.len() - 1]) {
            assert_eq!(y[i], gelu_forward_cpu(&x[i..i + 1])[0]);
            assert_eq!(dx[i], gelu_backward_cpu(&x[i..i + 1], &g[i..i + 1])[0]);
        }
    }
}
