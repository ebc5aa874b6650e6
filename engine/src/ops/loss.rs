//! Cross-entropy with integer labels on the tape, as PyTorch's `F.cross_entropy(logits,
//! labels, ignore_index=..., label_smoothing=..., reduction="mean")`: one forward and one
//! backward for every device. The work, the numerics (ignored rows, smoothing, a batch that
//! ignores every row) and the checks are in `crate::backend::loss` (CPU arm and CUDA arm).

pub use crate::backend::CrossEntropyOptions;

use crate::backend::loss::{cross_entropy_bwd, cross_entropy_fwd};
use crate::{Result, Tape, Tensor, Var};

/// Mean cross-entropy of `logits` (`[N, C]`, f32 or bf16) against `labels` (i32 `[N]`); a
/// scalar (shape `[]`). See `crate::backend::loss` for ignored rows and smoothing.
pub fn cross_entropy(
    tape: &Tape,
    logits: &Var,
    labels: &Tensor,
    opts: CrossEntropyOptions,
) -> Result<Var> {
    let (out, saved) = cross_entropy_fwd(logits.tensor(), labels, &opts)?;
    let saved_logits = logits.tensor().clone();
    Ok(tape.record(
        out,
        &[logits],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            Ok(vec![Some(cross_entropy_bwd(
                &saved_logits,
                &saved,
                g,
                &opts,
            )?)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::DType;
    use crate::Device;

    fn labels(v: &[i32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), &[v.len()], Device::Cpu).unwrap()
    }

    /// Straight from the definition, in f64.
    fn naive(x: &[f32], y: &[i32], c: usize, ignore: Option<i32>, eps: f64) -> f64 {
        let (mut total, mut kept) = (0f64, 0usize);
        for (r, &label) in y.iter().enumerate() {
            if Some(label) == ignore {
                continue;
            }
            let row: Vec<f64> = x[r * c..(r + 1) * c].iter().map(|&v| v as f64).collect();
            let z: f64 = row.iter().map(|v| v.exp()).sum();
            let logp: Vec<f64> = row.iter().map(|v| v - z.ln()).collect();
            let nll = -logp[label as usize];
            let smooth = -logp.iter().sum::<f64>() / c as f64;
            total += (1.0 - eps) * nll + eps * smooth;
            kept += 1;
        }
        total / kept as f64
    }

    #[test]
    fn forward_matches_definition() {
        let x = Tensor::randn(&[5, 4], 0.0, 3.0, 3, DType::F32, Device::Cpu).unwrap();
        let xv = x.to_vec_f32().unwrap();
        let y = [2, -100, 0, 3, 1];
        let tape = Tape::inference();
        let lv = tape.constant(x);
        for eps in [0.0f32, 0.2] {
            let opts = CrossEntropyOptions {
                label_smoothing: eps,
                ..Default::default()
            };
            let got = cross_entropy(&tape, &lv, &labels(&y), opts).unwrap();
            assert_eq!(got.shape(), &[] as &[usize]);
            let got = got.tensor().to_scalar_f32().unwrap() as f64;
            let want = naive(&xv, &y, 4, Some(-100), eps as f64);
            assert!(
                (got - want).abs() < 1e-5 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        }
        // Uniform logits: loss is ln(C) whatever the label.
        let u = tape.constant(Tensor::f32(vec![7.0; 6], &[2, 3]).unwrap());
        let l = cross_entropy(&tape, &u, &labels(&[0, 2]), Default::default()).unwrap();
        assert!((l.tensor().to_scalar_f32().unwrap() - 3f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn gradient_is_softmax_minus_target_over_kept_rows() {
        let x = Tensor::randn(&[6, 5], 0.0, 2.0, 8, DType::F32, Device::Cpu).unwrap();
        let y = labels(&[4, 0, 7, 2, 7, 1]);
        for eps in [0.0f32, 0.1] {
            let opts = CrossEntropyOptions {
                ignore_index: Some(7),
                label_smoothing: eps,
            };
            let y2 = y.clone();
            GradCheck::default()
                .run(std::slice::from_ref(&x), &[0], move |t, v| {
                    cross_entropy(t, &v[0], &y2, opts)
                })
                .unwrap();
        }
        // Ignored rows get exactly zero.
        let tape = Tape::recording();
        let xv = tape.watch(x);
        let opts = CrossEntropyOptions {
            ignore_index: Some(7),
            label_smoothing: 0.0,
        };
        let loss = cross_entropy(&tape, &xv, &y, opts).unwrap();
        let g = tape.backward(&loss).unwrap();
        let g = g.get(&xv).unwrap().to_vec_f32().unwrap();
        assert!(g[10..15].iter().chain(&g[20..25]).all(|&v| v == 0.0));
        // Each kept row sums to zero (softmax and target both sum to one).
        assert!(g[0..5].iter().sum::<f32>().abs() < 1e-6);
    }

    #[test]
    fn all_rows_ignored_gives_zero_loss_and_gradient() {
        let tape = Tape::recording();
        let x = tape.watch(Tensor::randn(&[3, 4], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap());
        let loss = cross_entropy(&tape, &x, &labels(&[-100; 3]), Default::default()).unwrap();
        assert_eq!(loss.tensor().to_scalar_f32().unwrap(), 0.0);
        let g = tape.backward(&loss).unwrap();
        assert!(g
            .get(&x)
            .unwrap()
            .to_vec_f32()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn errors_name_the_problem() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::zeros(&[3, 4], DType::F32, Device::Cpu).unwrap());
        let err = cross_entropy(&tape, &x, &labels(&[0, 4, 1]), Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1") && err.contains("label 4"), "{err}");
        let no_ignore = CrossEntropyOptions {
            ignore_index: None,
            label_smoothing: 0.0,
        };
        let err = cross_entropy(&tape, &x, &labels(&[0, -100, 1]), no_ignore)
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 1") && err.contains("-100"), "{err}");
        let err = cross_entropy(&tape, &x, &labels(&[0, 1]), Default::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 4]") && err.contains("[2]"), "{err}");
        let f = Tensor::zeros(&[3], DType::F32, Device::Cpu).unwrap();
        assert!(cross_entropy(&tape, &x, &f, Default::default()).is_err());
        let bad = CrossEntropyOptions {
            ignore_index: None,
            label_smoothing: 1.5,
        };
        assert!(cross_entropy(&tape, &x, &labels(&[0, 1, 2]), bad).is_err());
        let x3 = tape.constant(Tensor::zeros(&[3, 4, 1], DType::F32, Device::Cpu).unwrap());
        assert!(cross_entropy(&tape, &x3, &labels(&[0, 1, 2]), Default::default()).is_err());
    }
}
