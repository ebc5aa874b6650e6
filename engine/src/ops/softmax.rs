//! Softmax and log-softmax over the last dimension, on the tape: one forward and one backward
//! for every device. The work is done by the backend-level functions of
//! `crate::backend::softmax` (CPU arm and CUDA arm beneath them), which also hold the row
//! kernels and the numerics.

use crate::backend::softmax::{softmax_bwd, softmax_fwd};
use crate::backend::SoftmaxKind;
use crate::{Result, Tape, Var};

/// Softmax over the last dimension of `x` (any rank >= 1, f32 or bf16). On the CPU the output
/// is f32; on a GPU it keeps `x`'s dtype.
pub fn softmax(tape: &Tape, x: &Var) -> Result<Var> {
    last_dim_op(tape, x, SoftmaxKind::Softmax)
}

/// Log-softmax over the last dimension of `x` (any rank >= 1, f32 or bf16). On the CPU the
/// output is f32; on a GPU it keeps `x`'s dtype.
pub fn log_softmax(tape: &Tape, x: &Var) -> Result<Var> {
    last_dim_op(tape, x, SoftmaxKind::LogSoftmax)
}

/// Shared body of softmax and log_softmax: both backward passes need only the output.
fn last_dim_op(tape: &Tape, x: &Var, kind: SoftmaxKind) -> Result<Var> {
    let y = softmax_fwd(x.tensor(), kind)?;
    let saved = y.clone();
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            Ok(vec![Some(softmax_bwd(&saved, g, kind)?)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device, Tensor};

    fn naive_softmax(row: &[f64]) -> Vec<f64> {
        let e: Vec<f64> = row.iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn forward_matches_naive_and_is_stable() {
        // Second row would overflow exp() without the max subtraction.
        let x = vec![1.0f32, 2.0, 3.0, -1.0, 1000.0, 1001.0, 999.0, 1000.5];
        let tape = Tape::inference();
        let xv = tape.constant(Tensor::f32(x.clone(), &[2, 4]).unwrap());
        let y = softmax(&tape, &xv).unwrap().tensor().to_vec_f32().unwrap();
        let ly = log_softmax(&tape, &xv)
            .unwrap()
            .tensor()
            .to_vec_f32()
            .unwrap();
        for r in 0..2 {
            let shifted: Vec<f64> = x[r * 4..r * 4 + 4]
                .iter()
                .map(|&v| v as f64 - x[r * 4] as f64)
                .collect();
            let want = naive_softmax(&shifted);
            for c in 0..4 {
                let (got, lgot) = (y[r * 4 + c] as f64, ly[r * 4 + c] as f64);
                assert!((got - want[c]).abs() < 1e-6, "{got} vs {}", want[c]);
                assert!(
                    (lgot - want[c].ln()).abs() < 1e-5,
                    "{lgot} vs {}",
                    want[c].ln()
                );
            }
        }
        assert!(y.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bf16_input_is_widened() {
        let tape = Tape::inference();
        let x = Tensor::f32(vec![0.5, -0.25, 2.0], &[3]).unwrap();
        let xb = tape.constant(x.cast(DType::BF16).unwrap());
        let y = softmax(&tape, &xb).unwrap();
        assert_eq!(y.tensor().dtype(), DType::F32);
        let want = naive_softmax(&[0.5, -0.25, 2.0]);
        for (g, w) in y.tensor().to_vec_f32().unwrap().iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Tensor::randn(&[3, 5, 7], 0.0, 2.0, 11, DType::F32, Device::Cpu).unwrap();
        let check = GradCheck::default();
        check
            .run(std::slice::from_ref(&x), &[0], |t, v| softmax(t, &v[0]))
            .unwrap();
        check.run(&[x], &[0], |t, v| log_softmax(t, &v[0])).unwrap();
    }

    #[test]
    fn errors_on_scalar_and_integer_input() {
        let tape = Tape::inference();
        let s = tape.constant(Tensor::f32(vec![1.0], &[]).unwrap());
        let err = softmax(&tape, &s).unwrap_err().to_string();
        assert!(err.contains("softmax") && err.contains("scalar"), "{err}");
        let i = tape.constant(Tensor::from_vec(vec![1i32, 2], &[2], Device::Cpu).unwrap());
        assert!(log_softmax(&tape, &i).is_err());
    }
}
