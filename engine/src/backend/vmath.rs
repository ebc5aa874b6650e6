//! Branch-free f32 math for the CPU kernels: each function is `#[inline(always)]` and free of
//! data-dependent branches, so a loop over [`LANES`]-wide chunks that calls it compiles to
//! AVX-512 vectors inside a `#[target_feature(enable = "avx512f")]` function (and to SSE2 in
//! the baseline copy beside it). Each has a double-precision reference in its tests.

/// Lanes of the vectorised loops: one AVX-512 register of f32.
pub(crate) const LANES: usize = 16;

/// `e^x` in f32 to about 2 ulp for `x <= 88` (Cephes' `expf`: `x = n ln 2 + r`, a degree-6
/// polynomial for `e^r`, `2^n` written into the exponent), 0 below -87.3 (where the exact
/// value is subnormal), +inf above 88. Branch-free, so loops over it vectorise.
#[inline(always)]
pub(crate) fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    /// 1.5 * 2^23: adding it rounds to an integer, held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.0;
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    let two_n = f32::from_bits(((t.to_bits() as i32 - MAGIC.to_bits() as i32 + 127) << 23) as u32);
    let y = e * two_n;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `e^(-x²/2)` for `|x| <= 14` (0 beyond 13.2, where it underflows), to about 3 ulp. Rounding
/// `x²/2` before the exponential would cost up to 1e-6 relative at `|x| = 7`, so `x` is split
/// into `hi` (12 significant bits, `hi²` exact) and `lo`: `e^(-hi²/2) · e^(-d)` with
/// `d = hi·lo + lo²/2`, `|d| < 0.025`, whose exponential is a cubic to 1e-8.
#[inline(always)]
pub(crate) fn gauss(x: f32) -> f32 {
    let hi = f32::from_bits(x.to_bits() & 0xffff_f000);
    let lo = x - hi;
    let d = hi * lo + 0.5 * lo * lo;
    let e_d = 1.0 - d * (1.0 - d * (0.5 - d * (1.0 / 6.0)));
    exp_fast(-0.5 * hi * hi) * e_d
}

/// Coefficients of the normal CDF `Phi` (least-squares fits to double-precision `erf`/`erfc`,
/// relative error below 2e-7 on their intervals).
#[allow(clippy::excessive_precision)]
mod cdf {
    /// `Phi(x) = 1/2 + x · P(x²)` for `|x| < SMALL`.
    pub const SMALL: f32 = 1.2;
    pub const P: [f32; 8] = [
        0.398_942_291_736_602_8,
        -0.066_490_381_956_100_46,
        0.009_973_555_803_298_95,
        -0.001_187_321_613_542_735_6,
        0.000_115_416_056_360_118_09,
        -9.416_191_460_331_902e-6,
        6.417_009_217_329_905e-7,
        -3.016_901_217_733_903e-8,
    ];
    /// `Phi(-|x|) = e^(-x²/2) · Q(t)` with `t = 1/(1 + |x|)` for `SMALL <= |x| <= TAIL`.
    pub const TAIL: f32 = 7.5;
    pub const Q: [f32; 13] = [
        3.844_520_961_138_187e-6,
        0.398_737_072_944_641_1,
        0.403_827_220_201_492_3,
        -0.068_231_701_850_891_11,
        -0.180_977_866_053_581_24,
        -4.531_515_121_459_961,
        17.290_594_100_952_15,
        -29.117_549_896_240_234,
        23.219_667_434_692_383,
        -0.513_339_459_896_087_6,
        -14.364_645_957_946_777,
        9.684_269_905_090_332,
        -1.579_125_285_120_620_6,
    ];
}

/// `c[0] + c[1] z + c[2] z² + ...` (Horner, no fused multiply-add: the same rounding in the
/// vector and the baseline copies).
#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], z: f32) -> f32 {
    let mut acc = c[N - 1];
    for k in (0..N - 1).rev() {
        acc = acc * z + c[k];
    }
    acc
}

/// The standard normal CDF `Phi(x)` and its density's unscaled part `e^(-x²/2)`, together
/// (GELU's forward needs the first, its backward both). Near 0, `1/2 + x P(x²)`; in the tails
/// the smaller of `Phi(x)` and `1 - Phi(x)`, `e^(-x²/2) Q(1/(1+|x|))`, keeps its relative
/// accuracy (about 4e-7 at worst), so `x · Phi(x)` stays accurate for negative `x` and
/// `x - x · Phi(-x)` rounds once for positive `x`. Returned as `(Phi(x), 1 - Phi(x), e^(-x²/2))`
/// with each of the two CDF values computed without cancellation where it is small. NaN in,
/// NaN out (in the first two).
#[inline(always)]
pub(crate) fn normal_cdf(x: f32) -> (f32, f32, f32) {
    let a = x.abs();
    let g = gauss(a.min(14.0));
    // The tail, Phi(-|x|); t is clamped where the fit ends (beyond it Phi(-|x|) < 4e-14).
    let t = 1.0 / (1.0 + a.min(cdf::TAIL));
    let tail = g * horner(&cdf::Q, t);
    let near = x * horner(&cdf::P, x * x);
    let small = a < cdf::SMALL;
    let (lower, upper) = if small {
        (0.5 + near, 0.5 - near)
    } else if x > 0.0 {
        (1.0 - tail, tail)
    } else {
        (tail, 1.0 - tail)
    };
    // NaN fails every comparison above and lands in the last arm; keep it NaN.
    let lower = if x.is_nan() { x } else { lower };
    let upper = if x.is_nan() { x } else { upper };
    (lower, upper, g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::activation::normal_cdf as normal_cdf64;

    #[test]
    fn exp_fast_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=2_000_000 {
            let x = -87.0 + 175.0 * i as f32 / 2_000_000.0;
            let want = (x as f64).exp();
            let got = exp_fast(x) as f64;
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp_fast(0.0), 1.0);
        assert_eq!(exp_fast(-100.0), 0.0);
        assert_eq!(exp_fast(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_fast(100.0), f32::INFINITY);
        assert!(exp_fast(f32::NAN).is_nan());
    }

    #[test]
    fn gauss_is_within_four_ulp() {
        let mut worst = 0f64;
        for i in 0..=100_000 {
            let x = 13.0 * i as f32 / 100_000.0;
            let want = (-0.5 * (x as f64) * (x as f64)).exp();
            worst = worst.max((gauss(x) as f64 - want).abs() / want);
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(gauss(14.0), 0.0);
    }

    #[test]
    fn normal_cdf_matches_double_precision() {
        let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
        for i in 0..=200_000 {
            let x = -7.5 + 15.0 * i as f32 / 200_000.0;
            let (lower, upper, _) = normal_cdf(x);
            let want = normal_cdf64(x as f64);
            worst_abs = worst_abs.max((lower as f64 - want).abs());
            // The smaller of the two keeps its relative accuracy.
            let (got, want) = if want < 0.5 {
                (lower, want)
            } else {
                (upper, normal_cdf64(-(x as f64)))
            };
            worst_rel = worst_rel.max((got as f64 - want).abs() / want);
        }
        assert!(worst_abs < 1.2e-7, "worst absolute error {worst_abs}");
        assert!(worst_rel < 6e-7, "worst relative error {worst_rel}");
        assert!(normal_cdf(f32::NAN).0.is_nan() && normal_cdf(f32::NAN).1.is_nan());
        assert_eq!(normal_cdf(f32::INFINITY).0, 1.0);
        assert_eq!(normal_cdf(f32::NEG_INFINITY).0, 0.0);
    }
}
