//! Finite-difference gradient checks, used by every op with a backward.
//!
//! For an op `f(x_1, ..., x_n) -> y`, a fixed random projection `r` turns `y` into the scalar
//! `L = <y, r>`; `backward_with(y, r)` gives the analytic dL/dx_i, and central differences
//! `(L(x + h e_j) - L(x - h e_j)) / 2h` give the numeric one for a sample of elements `j`.
//! Arithmetic is f32, so the comparison is relative to the gradient's scale.

use crate::{rng, Error, Result, Tape, Tensor, Var};

#[derive(Debug, Clone)]
pub struct GradCheck {
    /// Step of the central difference.
    pub step: f32,
    /// Allowed |analytic - numeric| relative to max(1, largest |numeric| of that input).
    pub tolerance: f32,
    /// Elements checked per input (all when the input is smaller).
    pub samples: usize,
    pub seed: u64,
}

impl Default for GradCheck {
    fn default() -> Self {
        GradCheck {
            step: 1e-2,
            tolerance: 1e-2,
            samples: 48,
            seed: 1234,
        }
    }
}

impl GradCheck {
    /// Checks the gradient of `f` with respect to each input listed in `wrt` (indices into
    /// `inputs`); other inputs (labels, indices, masks) are passed as constants.
    /// Returns the largest relative error seen, or an error naming the input and element.
    pub fn run<F>(&self, inputs: &[Tensor], wrt: &[usize], f: F) -> Result<f32>
    where
        F: Fn(&Tape, &[Var]) -> Result<Var>,
    {
        // Analytic gradients.
        let tape = Tape::recording();
        let vars: Vec<Var> = inputs
            .iter()
            .enumerate()
            .map(|(i, t)| {
                if wrt.contains(&i) {
                    tape.watch(t.deep_copy().expect("copy input"))
                } else {
                    tape.constant(t.clone())
                }
            })
            .collect();
        let y = f(&tape, &vars)?;
        let projection: Vec<f32> = (0..y.tensor().elem_count() as u64)
            .map(|i| rng::normal_at(self.seed ^ 0x5151, i))
            .collect();
        let r = Tensor::f32(projection.clone(), y.shape())?;
        let grads = tape.backward_with(&y, r)?;

        let objective = |xs: &[Tensor]| -> Result<f64> {
            let tape = Tape::inference();
            let vars: Vec<Var> = xs.iter().map(|t| tape.constant(t.clone())).collect();
            let y = f(&tape, &vars)?;
            let yv = y.tensor().to_vec_f32()?;
            Ok(yv
                .iter()
                .zip(&projection)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum())
        };

        let mut worst = 0f32;
        for &i in wrt {
            let analytic = match grads.get(&vars[i]) {
                Some(g) => g.to_vec_f32()?,
                None => vec![0.0; inputs[i].elem_count()],
            };
            let n = inputs[i].elem_count();
            let picks: Vec<usize> = if n <= self.samples {
                (0..n).collect()
            } else {
                (0..self.samples as u64)
                    .map(|k| (rng::bits_at(self.seed + i as u64, k) % n as u64) as usize)
                    .collect()
            };
            let mut numeric = Vec::with_capacity(picks.len());
            for &j in &picks {
                let mut xs: Vec<Tensor> = inputs.to_vec();
                let mut plus = inputs[i].to_vec_f32()?;
                let base = plus[j];
                plus[j] = base + self.step;
                xs[i] = Tensor::f32(plus.clone(), inputs[i].shape())?;
                let lp = objective(&xs)?;
                plus[j] = base - self.step;
                xs[i] = Tensor::f32(plus, inputs[i].shape())?;
                let lm = objective(&xs)?;
                numeric.push(((lp - lm) / (2.0 * self.step as f64)) as f32);
            }
            let scale = numeric.iter().fold(1f32, |m, v| m.max(v.abs()));
            for (k, &j) in picks.iter().enumerate() {
                let err = (analytic[j] - numeric[k]).abs() / scale;
                worst = worst.max(err);
                if err > self.tolerance || !analytic[j].is_finite() {
                    return Err(Error::Autograd(format!(
                        "gradient check failed for input {i} (shape {:?}) at element {j}: \
                         analytic {} vs numeric {} (relative error {err:.2e} > {:.1e})",
                        inputs[i].shape(),
                        analytic[j],
                        numeric[k],
                        self.tolerance
                    )));
                }
            }
        }
        Ok(worst)
    }
}
