//! Activations on the tape: `relu` (ResNet), `gelu` (BERT, the exact erf form) and `tanh`, one
//! forward and one backward each for every device. The kernels (and the double-precision `erf`
//! GELU needs) are in `crate::backend::activation`.

use crate::backend::activation::{activation_bwd, activation_fwd};
use crate::backend::elementwise::to_compute_dtype;
use crate::backend::Activation;
use crate::{Result, Tape, Var};

/// A pointwise activation and its one backward, which reads the output (relu, tanh) or the
/// input (gelu).
fn unary(tape: &Tape, kind: Activation, x: &Var) -> Result<Var> {
    let out = activation_fwd(kind, x.tensor())?;
    let dtype = out.dtype();
    let keep = if kind.backward_reads_output() {
        out.clone()
    } else {
        x.tensor().clone()
    };
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| activation_bwd(kind, &keep, &to_compute_dtype(g, dtype)?))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

/// `max(x, 0)`.
pub fn relu(tape: &Tape, x: &Var) -> Result<Var> {
    unary(tape, Activation::Relu, x)
}

/// Exact (erf) GELU, as `torch.nn.GELU()` and BERT's `"gelu"`.
pub fn gelu(tape: &Tape, x: &Var) -> Result<Var> {
    unary(tape, Activation::Gelu, x)
}

pub fn tanh(tape: &Tape, x: &Var) -> Result<Var> {
    unary(tape, Activation::Tanh, x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::activation::coef::EFX;
    use crate::backend::activation::*;
    use crate::gradcheck::GradCheck;
    use crate::Tensor;
    use crate::{DType, Device, Error};
    use std::f64::consts::PI;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.5, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn t(v: &[f32]) -> Tensor {
        Tensor::f32(v.to_vec(), &[v.len()]).unwrap()
    }

    /// Maclaurin series of erf, an independent reference for |x| <= 2 (the terms alternate and
    /// stay below ~10 in size there, so the sum keeps about 14 correct digits).
    fn erf_series(x: f64) -> f64 {
        let (mut term, mut sum) = (x, 0.0);
        for n in 0..200 {
            let contribution = term / (2 * n + 1) as f64;
            sum += contribution;
            if contribution.abs() < 1e-18 {
                break;
            }
            term *= -x * x / (n + 1) as f64;
        }
        2.0 / PI.sqrt() * sum
    }

    #[test]
    fn erf_known_values() {
        let known = [
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (-3.0, -0.9999779095030014),
            (0.1, 0.1124629160182849),
            (-0.9, -0.7969082124228322),
            (4.0, 0.9999999845827421),
        ];
        for (x, want) in known {
            let got = erf(x);
            assert!(
                ((got - want) / want).abs() < 1e-12,
                "erf({x}) = {got}, want {want}"
            );
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(7.0), 1.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert!(erf(f64::NAN).is_nan());
        assert_eq!(erf(1e-300), 1e-300 * (1.0 + EFX));
    }

    #[test]
    fn erf_matches_series_and_is_odd_and_monotonic() {
        let mut prev = -1.0;
        for i in -400..=400 {
            let x = i as f64 * 0.005; // [-2, 2], crossing every region boundary below 2
            let e = erf(x);
            assert!(
                (e - erf_series(x)).abs() < 1e-13,
                "erf({x}) = {e} vs {}",
                erf_series(x)
            );
            assert_eq!(e, -erf(-x));
            assert!(e >= prev, "erf not monotonic at {x}");
            prev = e;
        }
        // Past 2 (regions 3 and 4), against the continued fraction of erfc (Laplace):
        // erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))).
        for i in 0..=100 {
            let x = 2.0 + i as f64 * 0.04;
            let tail = (1..=2000).rev().fold(x, |t, n| x + n as f64 / 2.0 / t);
            let erfc = (-x * x).exp() / PI.sqrt() / tail;
            assert!(
                (erf(x) - (1.0 - erfc)).abs() < 1e-15,
                "erf({x}) = {} vs {}",
                erf(x),
                1.0 - erfc
            );
        }
    }

    #[test]
    fn forward_values() {
        let tape = Tape::inference();
        let x = tape.constant(t(&[-2.0, -0.5, 0.0, 0.5, 3.0]));
        let y = relu(&tape, &x).unwrap().into_tensor().to_vec_f32().unwrap();
        assert_eq!(y, vec![0.0, 0.0, 0.0, 0.5, 3.0]);
        let nan = relu(&tape, &tape.constant(t(&[f32::NAN]))).unwrap();
        assert!(nan.tensor().to_vec_f32().unwrap()[0].is_nan());

        // x * (1 + erf(x / sqrt 2)) / 2 in double precision (Python math.erf).
        let y = gelu(&tape, &x).unwrap().into_tensor().to_vec_f32().unwrap();
        let want = [
            -0.04550026389635842,
            -0.15426876936299344,
            0.0,
            0.34573123063700656,
            2.99595030590511,
        ];
        for (a, b) in y.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-7, "{a} vs {b}");
        }

        let y = tanh(&tape, &x).unwrap().into_tensor().to_vec_f32().unwrap();
        for (a, v) in y.iter().zip([-2.0f32, -0.5, 0.0, 0.5, 3.0]) {
            assert!((a - v.tanh()).abs() < 1e-7);
        }
    }

    #[test]
    fn gradients() {
        let gc = GradCheck {
            step: 1e-3,
            ..GradCheck::default()
        };
        let x = randn(&[4, 6], 7);
        gc.run(std::slice::from_ref(&x), &[0], |tape, v| gelu(tape, &v[0]))
            .unwrap();
        gc.run(std::slice::from_ref(&x), &[0], |tape, v| tanh(tape, &v[0]))
            .unwrap();
        // relu: keep every input at least 0.1 away from the kink at 0.
        let away: Vec<f32> = x
            .to_vec_f32()
            .unwrap()
            .iter()
            .map(|v| v + 0.1f32.copysign(*v))
            .collect();
        let x = Tensor::f32(away, &[4, 6]).unwrap();
        gc.run(&[x], &[0], |tape, v| relu(tape, &v[0])).unwrap();
    }

    #[test]
    fn large_inputs_use_the_parallel_path_consistently() {
        let x = randn(&[300, 300], 3);
        let xv = x.to_vec_f32().unwrap();
        let y = gelu_forward_cpu(&xv);
        for i in (0..xv.len()).step_by(997) {
            assert_eq!(y[i], gelu_forward_cpu(&xv[i..i + 1])[0]);
        }
    }

    #[test]
    fn integer_input_is_a_dtype_error() {
        let tape = Tape::recording();
        let ids = tape.constant(Tensor::from_vec(vec![1i32, 2], &[2], Device::Cpu).unwrap());
        for op in [relu, gelu, tanh] {
            assert!(matches!(op(&tape, &ids), Err(Error::DType { .. })));
        }
    }
}
