//! AdamW exactly as `torch.optim.AdamW` (the paper's BERT optimizer).
//!
//! Per element, at step `t` (counting from 1) with learning rate `lr`:
//!
//! ```text
//! p = p * (1 - lr * weight_decay)                      decoupled decay, scaled by lr
//! m = m + (1 - beta1) * (g - m)                        = beta1 * m + (1 - beta1) * g
//! v = v * beta2 + (1 - beta2) * g * g
//! p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! The first moment is updated as PyTorch does it, with `lerp` (written `m + w * (g - m)` for
//! a weight below one half and `g - (g - m) * (1 - w)` otherwise), and every other expression
//! keeps PyTorch's order of operations, so results match its single-tensor path to an ulp or
//! so per step. Bias corrections and the other per-step scalars are computed in f64, as
//! Python computes them, then rounded to f32 ([`AdamWStep`]).
//!
//! Note that PyTorch's AdamW scales the decay by the learning rate (`lr * weight_decay`), unlike
//! Composer's `DecoupledAdamW` (`weight_decay * lr / initial_lr`, as [`super::Sgdw`] does).

use rayon::prelude::*;

use super::{
    check_step, next_step, state_tensor, step_tensor, Optimizer, StateReader, CHUNK, STEP_KEY,
};
use crate::params::round_to_working_cpu;
use crate::{Device, Error, FlatParams, Result, Tensor};

/// Name of the first moment (running mean of gradients) in the optimizer state.
pub const EXP_AVG_KEY: &str = "optimizer.exp_avg";
/// Name of the second moment (running mean of squared gradients) in the optimizer state.
pub const EXP_AVG_SQ_KEY: &str = "optimizer.exp_avg_sq";

/// The scalars of one AdamW step, computed on the host (a CUDA kernel takes the same).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Multiplier applied to every parameter first: `1 - lr * weight_decay`.
    pub decay: f32,
    /// Weight of the new gradient in the first moment: `1 - beta1` (a `lerp` weight).
    pub grad_weight: f32,
    pub beta2: f32,
    /// Weight of the squared gradient in the second moment: `1 - beta2`.
    pub sq_weight: f32,
    /// `-lr / (1 - beta1^t)`.
    pub neg_step_size: f32,
    /// `sqrt(1 - beta2^t)`.
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
}

/// PyTorch's `lerp(start, end, weight)` for f32, branch for branch (it keeps the result
/// exact at both ends).
#[inline]
fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// One AdamW step over matching slices, in place.
pub fn adamw_update_cpu(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamWStep,
) -> Result<()> {
    let n = param.len();
    if grad.len() != n || exp_avg.len() != n || exp_avg_sq.len() != n {
        return Err(Error::shape(
            "adamw_update_cpu",
            format!(
                "param has {n} elements, grad {}, exp_avg {}, exp_avg_sq {}",
                grad.len(),
                exp_avg.len(),
                exp_avg_sq.len()
            ),
        ));
    }
    update_lanes(param, grad, exp_avg, exp_avg_sq, s);
    Ok(())
}

/// [`adamw_update_cpu`] element by element, `lerp` and all: the oracle of the lane loop, which
/// must match it bit for bit.
pub fn adamw_update_reference(
    param: &mut [f32],
    grad: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    s: &AdamWStep,
) {
    for i in 0..param.len() {
        let g = grad[i];
        let p = param[i] * s.decay;
        let m = lerp(exp_avg[i], g, s.grad_weight);
        let v = exp_avg_sq[i] * s.beta2 + s.sq_weight * g * g;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        let denom = v.sqrt() / s.bias_correction2_sqrt + s.eps;
        param[i] = p + s.neg_step_size * m / denom;
    }
}

/// One element of the update with `lerp`'s branch chosen by the caller (`SMALL_WEIGHT`: the
/// weight is below one half), so a loop over it has no branch and vectorises. The same
/// operations in the same order as [`adamw_update_reference`]: the same bits.
#[inline(always)]
fn update_one<const SMALL_WEIGHT: bool>(
    p: &mut f32,
    g: f32,
    m: &mut f32,
    v: &mut f32,
    s: &AdamWStep,
) {
    let decayed = *p * s.decay;
    let w = s.grad_weight;
    let m_new = if SMALL_WEIGHT {
        *m + w * (g - *m)
    } else {
        g - (g - *m) * (1.0 - w)
    };
    let v_new = *v * s.beta2 + s.sq_weight * g * g;
    *m = m_new;
    *v = v_new;
    let denom = v_new.sqrt() / s.bias_correction2_sqrt + s.eps;
    *p = decayed + s.neg_step_size * m_new / denom;
}

#[inline(always)]
fn update_generic(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    let small = s.grad_weight.abs() < 0.5;
    let all = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
    if small {
        all.for_each(|(((p, &g), m), v)| update_one::<true>(p, g, m, v, s));
    } else {
        all.for_each(|(((p, &g), m), v)| update_one::<false>(p, g, m, v, s));
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn update_avx512(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    update_generic(p, g, m, v, s)
}

/// The update over slices of equal length, in AVX-512 vectors where the CPU has them (the
/// square root and division of 16 lanes at once; the baseline build has only SSE2).
fn update_lanes(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: &AdamWStep) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        return unsafe { update_avx512(p, g, m, v, s) };
    }
    update_generic(p, g, m, v, s)
}

/// AdamW over a flat buffer (see the module doc).
#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// The moments on the GPU, once a step ran there (then they are the current ones).
    device_exp_avg: Option<Tensor>,
    device_exp_avg_sq: Option<Tensor>,
    steps: u64,
}

impl AdamW {
    /// An optimizer for a buffer of `num_params` parameters. Errors on what PyTorch rejects:
    /// betas outside `[0, 1)`, negative `eps` or `weight_decay`.
    pub fn new(
        num_params: usize,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    ) -> Result<Self> {
        let opt = AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            exp_avg: vec![0.0; num_params],
            exp_avg_sq: vec![0.0; num_params],
            device_exp_avg: None,
            device_exp_avg_sq: None,
            steps: 0,
        };
        opt.validate()?;
        Ok(opt)
    }

    /// `torch.optim.AdamW`'s defaults: betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    pub fn torch_default(num_params: usize) -> Result<Self> {
        Self::new(num_params, 0.9, 0.999, 1e-8, 1e-2)
    }

    /// Checks the hyper-parameters (they are public fields, so a step re-checks them).
    pub fn validate(&self) -> Result<()> {
        let op = "AdamW";
        for (name, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(
                    op,
                    format!("{name} must be in [0, 1), got {v}"),
                ));
            }
        }
        for (name, v) in [("eps", self.eps), ("weight_decay", self.weight_decay)] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(
                    op,
                    format!("{name} must be finite and >= 0, got {v}"),
                ));
            }
        }
        Ok(())
    }

    /// The scalars of step number `t` (counting from 1) at learning rate `lr`, computed in f64
    /// as PyTorch computes them, then rounded to f32.
    pub fn step_scalars(&self, t: u64, lr: f32) -> AdamWStep {
        let lr64 = lr as f64;
        let t = t as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(t);
        let bias_correction2 = 1.0 - self.beta2.powf(t);
        AdamWStep {
            decay: (1.0 - lr64 * self.weight_decay) as f32,
            grad_weight: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            sq_weight: (1.0 - self.beta2) as f32,
            neg_step_size: (-(lr64 / bias_correction1)) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: self.eps as f32,
        }
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &FlatParams, lr: f32) -> Result<()> {
        let op = "AdamW::step";
        self.validate()?;
        check_step(op, params, self.exp_avg.len(), lr)?;
        let steps = next_step(op, self.steps)?;
        let s = self.step_scalars(steps, lr);
        let device = params.values().device();
        if let Device::Cuda(_) = device {
            crate::on_cuda!(device, {
                let m = super::state_on(&mut self.device_exp_avg, &self.exp_avg, device)?;
                let v = super::state_on(&mut self.device_exp_avg_sq, &self.exp_avg_sq, device)?;
                crate::cuda::optim::adamw_step(
                    params.values(),
                    params.grads(),
                    &m,
                    &v,
                    params.working(),
                    &s,
                )
            })?;
            self.steps = steps;
            return Ok(());
        }
        crate::cuda::cpu_only(op, [params.grads()])?;
        {
            let grads = params.grads().read_f32()?;
            let mut values = params.values().write_f32()?;
            let mut working = params.working().map(|w| w.write_bf16()).transpose()?;
            let chunks = values
                .par_chunks_mut(CHUNK)
                .zip(grads.par_chunks(CHUNK))
                .zip(self.exp_avg.par_chunks_mut(CHUNK))
                .zip(self.exp_avg_sq.par_chunks_mut(CHUNK));
            match working.as_deref_mut() {
                // The bf16 working copy is rewritten in the same pass, chunk by chunk.
                Some(w) => chunks.zip(w.par_chunks_mut(CHUNK)).try_for_each(
                    |((((p, g), m), v), w)| -> Result<()> {
                        adamw_update_cpu(p, g, m, v, &s)?;
                        round_to_working_cpu(p, w);
                        Ok(())
                    },
                )?,
                None => chunks.try_for_each(|(((p, g), m), v)| adamw_update_cpu(p, g, m, v, &s))?,
            }
        }
        self.steps = steps;
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            (STEP_KEY.to_string(), step_tensor(self.steps)),
            (
                EXP_AVG_KEY.to_string(),
                state_tensor(&self.device_exp_avg, &self.exp_avg),
            ),
            (
                EXP_AVG_SQ_KEY.to_string(),
                state_tensor(&self.device_exp_avg_sq, &self.exp_avg_sq),
            ),
        ]
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let n = self.exp_avg.len();
        let mut r = StateReader::new("AdamW::load_state", state);
        let steps = r.steps();
        let m = r.buffer(EXP_AVG_KEY, n);
        let v = r.buffer(EXP_AVG_SQ_KEY, n);
        r.finish()?;
        if let (Some(steps), Some(m), Some(v)) = (steps, m, v) {
            self.steps = steps;
            self.exp_avg = m;
            self.exp_avg_sq = v;
            self.device_exp_avg = None;
            self.device_exp_avg_sq = None;
        }
        Ok(())
    }

    fn steps_taken(&self) -> u64 {
        self.steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device};

    #[test]
    fn lane_loop_matches_the_reference_bit_for_bit() {
        let n = 1000 + 13; // a tail past the last 16-lane vector
        let at = |seed, i: usize| crate::rng::normal_at(seed, i as u64);
        for beta1 in [0.9, 0.2] {
            // beta1 = 0.2: lerp's weight 0.8 takes its other branch.
            let opt = AdamW::new(n, beta1, 0.999, 1e-8, 1e-2).unwrap();
            for (t, lr) in [(1u64, 1e-3f32), (7, 0.5)] {
                let s = opt.step_scalars(t, lr);
                let p0: Vec<f32> = (0..n).map(|i| at(21, i)).collect();
                let mut g: Vec<f32> = (0..n)
                    .map(|i| at(22, i) * 10f32.powi(i as i32 % 9 - 4))
                    .collect();
                g[3] = 0.0;
                g[4] = -0.0;
                let m0: Vec<f32> = (0..n).map(|i| 0.1 * at(23, i)).collect();
                let v0: Vec<f32> = (0..n).map(|i| (0.01 * at(24, i)).powi(2)).collect();
                let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
                let (mut p2, mut m2, mut v2) = (p0, m0, v0);
                adamw_update_cpu(&mut p1, &g, &mut m1, &mut v1, &s).unwrap();
                adamw_update_reference(&mut p2, &g, &mut m2, &mut v2, &s);
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&p1), bits(&p2), "params, beta1 {beta1} step {t}");
                assert_eq!(bits(&m1), bits(&m2), "exp_avg, beta1 {beta1} step {t}");
                assert_eq!(bits(&v1), bits(&v2), "exp_avg_sq, beta1 {beta1} step {t}");
            }
        }
    }

    fn params(values: &[f32]) -> FlatParams {
        let p = FlatParams::new(&[("w".to_string(), vec![values.len()])], Device::Cpu).unwrap();
        p.set("w", &Tensor::f32(values.to_vec(), &[values.len()]).unwrap())
            .unwrap();
        p
    }

    #[test]
    fn first_steps_by_hand() {
        // Step 1: m = 0.1 g, v = 0.001 g², bias-corrected m̂ = g, v̂ = g², so the update is
        // lr * g / (|g| + eps) ≈ lr * sign(g), after decay p *= 1 - lr * wd.
        let p = params(&[1.0, -1.0]);
        p.grads().write_f32().unwrap().copy_from_slice(&[0.5, -2.0]);
        let mut opt = AdamW::torch_default(2).unwrap();
        opt.step(&p, 0.01).unwrap();
        let v = p.values().to_vec_f32().unwrap();
        let decayed = 1.0 - 0.01 * 0.01;
        assert!((v[0] - (decayed - 0.01)).abs() < 1e-6, "{v:?}");
        assert!((v[1] - (-decayed + 0.01)).abs() < 1e-6, "{v:?}");

        // Step 2 with g = 0 for the first element: m = 0.09 * 0.5... computed in f64.
        p.grads().write_f32().unwrap().copy_from_slice(&[0.0, -2.0]);
        opt.step(&p, 0.01).unwrap();
        let (b1, b2) = (0.9f64, 0.999f64);
        let m = b1 * 0.1 * 0.5;
        let vv = b2 * 0.001 * 0.25;
        let upd = 0.01 / (1.0 - b1 * b1) * m / ((vv / (1.0 - b2 * b2)).sqrt() + 1e-8);
        let want = (decayed as f64 - 0.01) * decayed as f64 - upd;
        let got = p.values().to_vec_f32().unwrap()[0] as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn lerp_matches_both_forms() {
        assert_eq!(lerp(1.0, 3.0, 0.25), 1.5);
        assert_eq!(lerp(1.0, 3.0, 0.75), 2.5);
        assert_eq!(lerp(1.0, 3.0, 1.0), 3.0);
        assert_eq!(lerp(1.0, 3.0, 0.0), 1.0);
    }

    #[test]
    fn parallel_step_matches_the_kernel_across_chunks() {
        let n = 2 * CHUNK + 77;
        let init = Tensor::randn(&[n], 0.0, 1.0, 11, DType::F32, Device::Cpu).unwrap();
        let p = FlatParams::new(&[("w".to_string(), vec![n])], Device::Cpu).unwrap();
        p.set("w", &init).unwrap();
        let mut opt = AdamW::new(n, 0.9, 0.98, 1e-6, 1e-5).unwrap();
        let mut want = init.to_vec_f32().unwrap();
        let (mut m, mut v) = (vec![0.0; n], vec![0.0; n]);
        for (t, (seed, lr)) in [(12u64, 1e-3f32), (13, 5e-4)].into_iter().enumerate() {
            let g = Tensor::randn(&[n], 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap();
            p.grads().copy_from(&g).unwrap();
            let s = opt.step_scalars(t as u64 + 1, lr);
            adamw_update_cpu(&mut want, &g.to_vec_f32().unwrap(), &mut m, &mut v, &s).unwrap();
            opt.step(&p, lr).unwrap();
        }
        assert_eq!(p.values().to_vec_f32().unwrap(), want);
    }

    #[test]
    fn resumed_state_continues_bit_identically() {
        let grads = [[0.3f32, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.05, -0.9]];
        let run = |resume_after: Option<usize>| {
            let p = params(&[0.5, -1.0]);
            let mut opt = AdamW::new(2, 0.9, 0.98, 1e-6, 1e-2).unwrap();
            for (i, g) in grads.iter().enumerate() {
                if resume_after == Some(i) {
                    let state = opt.state();
                    opt = AdamW::new(2, 0.9, 0.98, 1e-6, 1e-2).unwrap();
                    opt.load_state(&state).unwrap();
                }
                p.grads().write_f32().unwrap().copy_from_slice(g);
                opt.step(&p, 1e-3).unwrap();
            }
            (p.values().to_vec_f32().unwrap(), opt.steps_taken())
        };
        let straight = run(None);
        assert_eq!(run(Some(2)), straight);
        assert_eq!(straight.1, 4);
    }

    #[test]
    fn errors() {
        assert!(AdamW::new(1, 1.0, 0.999, 1e-8, 0.0).is_err());
        assert!(AdamW::new(1, 0.9, -0.1, 1e-8, 0.0).is_err());
        assert!(AdamW::new(1, 0.9, 0.999, -1e-8, 0.0).is_err());
        assert!(AdamW::new(1, 0.9, 0.999, 1e-8, f64::NAN).is_err());

        let p = params(&[1.0, 2.0]);
        let mut opt = AdamW::torch_default(3).unwrap();
        let e = opt.step(&p, 1e-3).unwrap_err().to_string();
        assert!(e.contains("3 parameters"), "{e}");
        assert_eq!(opt.steps_taken(), 0);

        let s = opt.step_scalars(1, 1e-3);
        let e = adamw_update_cpu(&mut [0.0; 2], &[0.0; 2], &mut [0.0; 2], &mut [0.0; 1], &s)
            .unwrap_err()
            .to_string();
        assert!(e.contains("exp_avg_sq 1"), "{e}");

        let state = vec![
            (STEP_KEY.to_string(), Tensor::f32(vec![2.5], &[1]).unwrap()),
            (
                EXP_AVG_KEY.to_string(),
                Tensor::f32(vec![0.0; 3], &[3]).unwrap(),
            ),
        ];
        let e = opt.load_state(&state).unwrap_err().to_string();
        assert!(
            e.contains("2.5") && e.contains(&format!("missing `{EXP_AVG_SQ_KEY}`")),
            "{e}"
        );
        // PyTorch stores the step as a float tensor: an integral one is accepted.
        let state = vec![
            (STEP_KEY.to_string(), Tensor::f32(vec![7.0], &[1]).unwrap()),
            (
                EXP_AVG_KEY.to_string(),
                Tensor::f32(vec![0.0; 3], &[3]).unwrap(),
            ),
            (
                EXP_AVG_SQ_KEY.to_string(),
                Tensor::f32(vec![0.0; 3], &[3]).unwrap(),
            ),
            (
                "model.weight".to_string(),
                Tensor::f32(vec![0.0], &[1]).unwrap(),
            ),
        ];
        opt.load_state(&state).unwrap();
        assert_eq!(opt.steps_taken(), 7);
    }

    /// With a bf16 working copy the master takes exactly the f32 step and the working copy is
    /// the master rounded to nearest even, across chunks of the parallel loop.
    #[test]
    fn working_copy_step_is_the_f32_step_plus_rounding() {
        let n = CHUNK + 51;
        crate::optim::working_copy_check::assert_master_exact_and_working_rounded(
            n,
            8,
            &mut AdamW::torch_default(n).unwrap(),
            &mut AdamW::torch_default(n).unwrap(),
            &[(9, 0.01), (10, 0.005)],
        );
    }
}
