//! How far a device's result is from the CPU's: element by element, relative to the element
//! (f32 storage) or to the tensor's scale (bf16 storage).

use crate::{DType, Result, Tensor};

/// The error of `device` against the CPU's `cpu` in `dtype` storage: infinite for another
/// shape; [`max_scaled_err`] for bf16, [`max_rel_err`] otherwise.
pub fn error(dtype: DType, device: &Tensor, cpu: &Tensor) -> Result<f64> {
    if device.shape() != cpu.shape() {
        return Ok(f64::INFINITY);
    }
    let (d, c) = (device.to_vec_f32()?, cpu.to_vec_f32()?);
    Ok(match dtype {
        DType::BF16 => max_scaled_err(&d, &c),
        _ => max_rel_err(&d, &c),
    })
}

/// Largest element error of `gpu` against the oracle `cpu`, `|gpu - cpu| / max(|cpu|, 1e-3 ·
/// max|cpu|)`; infinite for a length mismatch or a non-finite value where the CPU has a finite
/// one.
pub fn max_rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    max_err_over(gpu, cpu, |c, scale| {
        c.abs().max((1e-3 * scale).max(f64::MIN_POSITIVE))
    })
}

/// Largest element error of `gpu` against `cpu` relative to the tensor's scale,
/// `|gpu - cpu| / max|cpu|` (non-finite values as in [`max_rel_err`]): the measure of bf16
/// storage, whose intermediates the GPU rounds to bf16 while the CPU op keeps them in f32.
pub fn max_scaled_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    max_err_over(gpu, cpu, |_, scale| scale.max(f64::MIN_POSITIVE))
}

/// The largest `|gpu - cpu| / denominator(cpu, max|cpu|)`; infinite for a length mismatch or a
/// non-finite value where the CPU has a finite one, zero where both agree on a non-finite one.
fn max_err_over(gpu: &[f32], cpu: &[f32], denominator: impl Fn(f64, f64) -> f64) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max((v as f64).abs()));
    gpu.iter().zip(cpu).fold(0f64, |worst, (&g, &c)| {
        let e = if !c.is_finite() {
            // The oracle itself is not finite (a NaN row by definition): the GPU must agree.
            if g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()) {
                0.0
            } else {
                f64::INFINITY
            }
        } else if !g.is_finite() {
            f64::INFINITY
        } else {
            ((g as f64) - (c as f64)).abs() / denominator(c as f64, scale)
        };
        worst.max(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_counts_nan_and_scale() {
        assert_eq!(max_rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((max_rel_err(&[1.001, 2.0], &[1.0, 2.0]) - 1e-3).abs() < 1e-6);
        // A poisoned (never written) element is a failure, whatever the tolerance.
        assert_eq!(max_rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(max_rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        // Near zero the error is relative to the tensor's scale, not to the tiny value.
        let e = max_rel_err(&[1e-8, 100.0], &[0.0, 100.0]);
        assert!(e < 1e-6, "{e}");
        // Where the oracle is NaN (a row of -inf), the GPU must be NaN too.
        assert_eq!(max_rel_err(&[f32::NAN], &[f32::NAN]), 0.0);
        assert_eq!(max_rel_err(&[0.0], &[f32::NAN]), f64::INFINITY);
    }

    #[test]
    fn scaled_error_is_relative_to_the_tensor_scale() {
        assert_eq!(max_scaled_err(&[1.0, -4.0], &[1.0, -4.0]), 0.0);
        // An element near zero is measured against the largest value, not against itself.
        assert!((max_scaled_err(&[0.02, 4.0], &[0.01, 4.0]) - 2.5e-3).abs() < 1e-9);
        // A wrong element as large as 2% of the scale still fails a 2e-2 tolerance.
        assert!(max_scaled_err(&[0.1, 4.0], &[0.0, 4.0]) > 2e-2);
        assert_eq!(max_scaled_err(&[f32::NAN, 4.0], &[1.0, 4.0]), f64::INFINITY);
        assert_eq!(max_scaled_err(&[f32::NAN], &[f32::NAN]), 0.0);
        assert_eq!(max_scaled_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
    }

    #[test]
    fn a_shape_mismatch_is_an_infinite_error() {
        let a = Tensor::f32(vec![1.0; 6], &[2, 3]).unwrap();
        let b = Tensor::f32(vec![1.0; 6], &[3, 2]).unwrap();
        assert_eq!(error(DType::F32, &a, &b).unwrap(), f64::INFINITY);
        assert_eq!(error(DType::F32, &a, &a).unwrap(), 0.0);
    }
}
