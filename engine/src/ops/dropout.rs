//! Inverted dropout on the tape (BERT's hidden and attention dropout): one forward and one
//! backward for every device. The mask rule (a pure function of the seed and the element's
//! index, so the backward recomputes it and nothing is stored), the kernels and the numerics
//! are in `crate::backend::dropout`.

pub use crate::backend::dropout::{keep, keep_scale};

use crate::backend::dropout::{dropout_bwd, dropout_fwd};
use crate::{Error, Result, Tape, Var};

/// Dropout with drop probability `p` in `[0, 1)`. With `!training` or `p == 0` it is the
/// identity (the input itself is returned, nothing is recorded); otherwise see
/// `crate::backend::dropout` for the exact mask rule.
pub fn dropout(tape: &Tape, x: &Var, p: f32, seed: u64, training: bool) -> Result<Var> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::invalid(
            "dropout",
            format!("drop probability {p} must be in [0, 1)"),
        ));
    }
    x.tensor().expect_float("dropout")?;
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    let out = dropout_fwd(x.tensor(), p, seed)?;
    let dtype = x.tensor().dtype();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| dropout_bwd(g, p, seed, dtype))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::{rng, Tensor};
    use crate::{DType, Device};

    fn ones(shape: &[usize]) -> Tensor {
        Tensor::ones(shape, DType::F32, Device::Cpu).unwrap()
    }

    #[test]
    fn identity_when_not_training_or_p_zero() {
        let tape = Tape::recording();
        let x = tape.watch(ones(&[10]));
        for (p, training) in [(0.5, false), (0.0, true)] {
            let y = dropout(&tape, &x, p, 1, training).unwrap();
            assert!(y.tensor().same_storage(x.tensor()));
            assert_eq!(y.id(), x.id());
        }
        assert!(tape.is_empty());
    }

    #[test]
    fn mask_follows_the_shared_rule_and_is_reproducible() {
        let tape = Tape::inference();
        let (p, seed) = (0.3f32, 42);
        let x =
            tape.constant(Tensor::randn(&[50, 40], 0.0, 1.0, 3, DType::F32, Device::Cpu).unwrap());
        let xv = x.tensor().to_vec_f32().unwrap();
        let a = dropout(&tape, &x, p, seed, true)
            .unwrap()
            .into_tensor()
            .to_vec_f32()
            .unwrap();
        let b = dropout(&tape, &x, p, seed, true)
            .unwrap()
            .into_tensor()
            .to_vec_f32()
            .unwrap();
        assert_eq!(a, b);
        for (i, (y, x)) in a.iter().zip(&xv).enumerate() {
            let kept = rng::uniform_at(seed, i as u64) >= p;
            assert_eq!(
                *y,
                if kept { x * (1.0 / (1.0 - p)) } else { 0.0 },
                "element {i}"
            );
        }
        let c = dropout(&tape, &x, p, seed + 1, true)
            .unwrap()
            .into_tensor()
            .to_vec_f32()
            .unwrap();
        assert_ne!(a, c, "another seed gives another mask");
    }

    #[test]
    fn kept_fraction_and_mean_on_a_large_tensor() {
        let tape = Tape::inference();
        let n = 1 << 20;
        for p in [0.1f32, 0.5, 0.9] {
            let y = dropout(&tape, &tape.constant(ones(&[n])), p, 7, true).unwrap();
            let yv = y.tensor().to_vec_f32().unwrap();
            let kept = yv.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            // Binomial standard deviation is sqrt(p(1-p)/n) < 5e-4; allow ~6 of them.
            assert!((kept - (1.0 - p as f64)).abs() < 3e-3, "p {p}: kept {kept}");
            let mean = yv.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
            assert!(
                (mean - 1.0).abs() < 3e-3 / (1.0 - p as f64),
                "p {p}: mean {mean}"
            );
        }
    }

    #[test]
    fn backward_applies_the_same_mask() {
        let tape = Tape::recording();
        let (p, seed) = (0.4f32, 9);
        let x = tape.watch(ones(&[1000]));
        let y = dropout(&tape, &x, p, seed, true).unwrap();
        let yv = y.tensor().to_vec_f32().unwrap();
        let g = tape.backward_with(&y, ones(&[1000])).unwrap();
        // With x = 1 and an upstream gradient of 1, the gradient equals the output.
        assert_eq!(g.get(&x).unwrap().to_vec_f32().unwrap(), yv);

        let inputs = [Tensor::randn(&[6, 7], 0.0, 1.0, 1, DType::F32, Device::Cpu).unwrap()];
        GradCheck::default()
            .run(&inputs, &[0], |tape, v| dropout(tape, &v[0], 0.5, 11, true))
            .unwrap();
    }

    #[test]
    fn bad_probabilities_are_errors() {
        let tape = Tape::recording();
        let x = tape.watch(ones(&[4]));
        for p in [-0.1, 1.0, 1.5, f32::NAN] {
            for training in [true, false] {
                let err = dropout(&tape, &x, p, 0, training).unwrap_err();
                assert!(matches!(err, Error::Invalid { .. }), "p {p}: {err}");
            }
        }
    }
}
