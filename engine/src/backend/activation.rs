//! The activations at the backend level — `relu` (ResNet), `gelu` (BERT) and `tanh` —
//! [`activation_fwd`] and [`activation_bwd`], dispatched by device, with the CPU arm below them
//! and the CUDA arm in `crate::cuda::elementwise` (kernels `activation.cu`).
//!
//! GELU is the exact form `x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))`, as `torch.nn.GELU()` by
//! default and Hugging Face BERT's `"gelu"` compute it, not the tanh approximation: a student
//! trained here must match a teacher trained in PyTorch. Rust's std has no `erf`, and the
//! engine takes no `libm` dependency, so `erf` below is a double-precision implementation
//! (rational approximations on four intervals, accurate to under one unit in the last place).

//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm keeps its input's
//! dtype.

use std::f64::consts::{FRAC_1_SQRT_2, PI};

use super::elementwise::{map_cpu, zip_map_cpu};
use super::Activation;
use crate::{Device, Result, Tensor};

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
        let s = 1.0 / (a * a);
        let (r, q) = if a < 1.0 / 0.35 {
            (poly(&RA, s), poly1(&SA, s))
        } else {
            (poly(&RB, s), poly1(&SB, s))
        };
        // exp(-a^2) with a split at `hi` (a with the low 32 bits of its mantissa cleared, so
        // hi^2 is exact): exp(-hi^2) * exp((hi - a)(hi + a)) loses no accuracy to rounding a^2.
        let hi = f64::from_bits(a.to_bits() & 0xffff_ffff_0000_0000);
        let erfc = (-hi * hi - 0.5625).exp() * ((hi - a) * (hi + a) + r / q).exp() / a;
        1.0 - erfc
    } else {
        // erfc(6) < 2e-17: erf is 1 to double precision.
        1.0
    };
    value.copysign(x)
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

/// Standard normal CDF `Phi(x) = (1 + erf(x / sqrt 2)) / 2`.
#[inline]
fn normal_cdf(x: f64) -> f64 {
    0.5 * (1.0 + erf(x * FRAC_1_SQRT_2))
}

/// Exact GELU, `x * Phi(x)`, evaluated in f64 and rounded once.
pub fn gelu_forward_cpu(x: &[f32]) -> Vec<f32> {
    map_cpu(x, |v| {
        let v = v as f64;
        (v * normal_cdf(v)) as f32
    })
}

/// `g * d/dx [x Phi(x)] = g * (Phi(x) + x phi(x))`, with `phi` the standard normal density.
pub fn gelu_backward_cpu(x: &[f32], g: &[f32]) -> Vec<f32> {
    let inv_sqrt_2pi = 1.0 / (2.0 * PI).sqrt();
    zip_map_cpu(x, g, |x, g| {
        let x = x as f64;
        let density = inv_sqrt_2pi * (-0.5 * x * x).exp();
        (g as f64 * (normal_cdf(x) + x * density)) as f32
    })
}

pub fn tanh_forward_cpu(x: &[f32]) -> Vec<f32> {
    map_cpu(x, f32::tanh)
}

/// `g * (1 - y^2)` from the output `y = tanh(x)`.
pub fn tanh_backward_cpu(y: &[f32], g: &[f32]) -> Vec<f32> {
    zip_map_cpu(y, g, |y, g| g * (1.0 - y * y))
}
