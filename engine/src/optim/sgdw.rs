//! SGDW: SGD with momentum and decoupled weight decay, the optimizer of the paper's ResNet
//! recipe (table 1: momentum 0.875, weight decay 5e-4).
//!
//! Semantics, per element, at step `t` (counting from 1) with learning rate `lr`:
//!
//! ```text
//! momentum (exactly torch.optim.SGD):
//!     t == 1:  buf = g
//!     t > 1:   buf = momentum * buf + (1 - dampening) * g
//!     d = g + momentum * buf     (nesterov)
//!     d = buf                    (otherwise; d = g when momentum == 0)
//! decoupled weight decay (exactly MosaicML Composer's DecoupledSGDW, which the paper used):
//!     p = p * (1 - weight_decay * lr / initial_lr)
//! update:
//!     p = p - lr * d
//! ```
//!
//! The decay is *decoupled* from the gradient (it never enters the momentum buffer) and it
//! follows the schedule's shape without being scaled by the learning rate itself: at
//! `lr == initial_lr` every weight shrinks by exactly `weight_decay` per step. `initial_lr` is
//! the schedule's peak (`LrSchedule::base_lr`), as Composer records `group['initial_lr']` when
//! the optimizer is built. This differs from `torch.optim.SGD(weight_decay=..)`, which adds
//! `weight_decay * p` to the gradient (L2 regularisation).
//!
//! The per-step scalars are computed once on the host in f64, as Python computes them, and
//! rounded to f32 ([`SgdwStep`]); the kernel then applies them in PyTorch's order of
//! operations, so the CPU results match PyTorch to within an ulp or so per step.

use rayon::prelude::*;

use super::{
    check_step, next_step, state_tensor, step_tensor, Optimizer, StateReader, CHUNK, STEP_KEY,
};
use crate::params::round_to_working_cpu;
use crate::{Device, Error, FlatParams, Result, Tensor};

/// Name of the momentum buffer in the optimizer state.
pub const MOMENTUM_BUFFER_KEY: &str = "optimizer.momentum_buffer";

/// The scalars of one SGDW step, computed on the host (a CUDA kernel takes the same).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdwStep {
    /// Learning rate of this step.
    pub lr: f32,
    /// Multiplier applied to every parameter before the update: `1 - weight_decay * lr / initial_lr`.
    pub decay: f32,
    pub momentum: f32,
    /// Weight of the new gradient in the momentum buffer: `1 - dampening`.
    pub grad_weight: f32,
    pub nesterov: bool,
    /// First step: the momentum buffer is set to the gradient (PyTorch's `buf is None` case).
    pub first: bool,
}

/// One SGDW step over matching slices, in place: `param` and `momentum_buf` are updated from
/// `grad`. `momentum_buf` is not touched (and may be empty) when `s.momentum == 0`.
pub fn sgdw_update_cpu(
    param: &mut [f32],
    grad: &[f32],
    momentum_buf: &mut [f32],
    s: &SgdwStep,
) -> Result<()> {
    let uses_buf = s.momentum != 0.0;
    if grad.len() != param.len() || (uses_buf && momentum_buf.len() != param.len()) {
        return Err(Error::shape(
            "sgdw_update_cpu",
            format!(
                "param has {} elements, grad {}, momentum buffer {}",
                param.len(),
                grad.len(),
                momentum_buf.len()
            ),
        ));
    }
    for i in 0..param.len() {
        let g = grad[i];
        let d = if uses_buf {
            let buf = if s.first {
                g
            } else {
                momentum_buf[i] * s.momentum + s.grad_weight * g
            };
            momentum_buf[i] = buf;
            if s.nesterov {
                g + s.momentum * buf
            } else {
                buf
            }
        } else {
            g
        };
        // Two roundings, as PyTorch: `p.mul_(decay)` then `p.add_(d, alpha=-lr)`.
        let p = param[i] * s.decay;
        param[i] = p - s.lr * d;
    }
    Ok(())
}

/// SGD with momentum and decoupled weight decay over a flat buffer (see the module doc).
#[derive(Debug, Clone)]
pub struct Sgdw {
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    /// The learning rate at which the decay is exactly `weight_decay` per step (the schedule's
    /// peak).
    pub initial_lr: f64,
    momentum_buffer: Vec<f32>,
    /// The momentum buffer on the GPU, once a step ran there (then it is the current one).
    device_momentum: Option<Tensor>,
    steps: u64,
}

impl Sgdw {
    /// An optimizer for a buffer of `num_params` parameters. Errors on hyper-parameters PyTorch
    /// rejects (negative momentum or decay, nesterov without momentum or with dampening) and on
    /// a non-positive `initial_lr`.
    pub fn new(
        num_params: usize,
        momentum: f64,
        dampening: f64,
        weight_decay: f64,
        nesterov: bool,
        initial_lr: f64,
    ) -> Result<Self> {
        let opt = Sgdw {
            momentum,
            dampening,
            weight_decay,
            nesterov,
            initial_lr,
            momentum_buffer: vec![0.0; num_params],
            device_momentum: None,
            steps: 0,
        };
        opt.validate()?;
        Ok(opt)
    }

    /// The paper's ResNet setting (table 1): momentum 0.875, decoupled weight decay 5e-4, no
    /// dampening, no nesterov.
    pub fn paper(num_params: usize, initial_lr: f64) -> Result<Self> {
        Self::new(num_params, 0.875, 0.0, 5e-4, false, initial_lr)
    }

    /// Checks the hyper-parameters (they are public fields, so a step re-checks them).
    pub fn validate(&self) -> Result<()> {
        let op = "Sgdw";
        let finite = [
            ("momentum", self.momentum),
            ("dampening", self.dampening),
            ("weight_decay", self.weight_decay),
            ("initial_lr", self.initial_lr),
        ];
        for (name, v) in finite {
            if !v.is_finite() {
                return Err(Error::invalid(
                    op,
                    format!("{name} must be finite, got {v}"),
                ));
            }
        }
        if self.momentum < 0.0 {
            return Err(Error::invalid(
                op,
                format!("momentum must be >= 0, got {}", self.momentum),
            ));
        }
        if self.weight_decay < 0.0 {
            return Err(Error::invalid(
                op,
                format!("weight_decay must be >= 0, got {}", self.weight_decay),
            ));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::invalid(
                op,
                format!(
                    "nesterov momentum needs momentum > 0 and dampening 0, got momentum {} and dampening {}",
                    self.momentum, self.dampening
                ),
            ));
        }
        if self.initial_lr <= 0.0 {
            return Err(Error::invalid(
                op,
                format!(
                    "initial_lr (the schedule's peak learning rate) must be > 0, got {}",
                    self.initial_lr
                ),
            ));
        }
        Ok(())
    }

    /// The scalars of the next step at learning rate `lr`, as Composer computes them (in
    /// double precision, then rounded to f32 when they reach the kernel).
    pub fn step_scalars(&self, lr: f32) -> SgdwStep {
        let lr64 = lr as f64;
        let decay = if self.weight_decay != 0.0 {
            1.0 - (lr64 / self.initial_lr) * self.weight_decay
        } else {
            1.0
        };
        SgdwStep {
            lr,
            decay: decay as f32,
            momentum: self.momentum as f32,
            grad_weight: (1.0 - self.dampening) as f32,
            nesterov: self.nesterov,
            first: self.steps == 0,
        }
    }
}

impl Optimizer for Sgdw {
    fn step(&mut self, params: &FlatParams, lr: f32) -> Result<()> {
        let op = "Sgdw::step";
        self.validate()?;
        check_step(op, params, self.momentum_buffer.len(), lr)?;
        let steps = next_step(op, self.steps)?;
        let s = self.step_scalars(lr);
        let device = params.values().device();
        if let Device::Cuda(_) = device {
            crate::on_cuda!(device, {
                let buf =
                    super::state_on(&mut self.device_momentum, &self.momentum_buffer, device)?;
                crate::cuda::optim::sgdw_step(
                    params.values(),
                    params.grads(),
                    &buf,
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
                .zip(self.momentum_buffer.par_chunks_mut(CHUNK));
            match working.as_deref_mut() {
                // The bf16 working copy is rewritten in the same pass, chunk by chunk.
                Some(w) => chunks.zip(w.par_chunks_mut(CHUNK)).try_for_each(
                    |(((p, g), b), w)| -> Result<()> {
                        sgdw_update_cpu(p, g, b, &s)?;
                        round_to_working_cpu(p, w);
                        Ok(())
                    },
                )?,
                None => chunks.try_for_each(|((p, g), b)| sgdw_update_cpu(p, g, b, &s))?,
            }
        }
        self.steps = steps;
        Ok(())
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        vec![
            (STEP_KEY.to_string(), step_tensor(self.steps)),
            (
                MOMENTUM_BUFFER_KEY.to_string(),
                state_tensor(&self.device_momentum, &self.momentum_buffer),
            ),
        ]
    }

    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let mut r = StateReader::new("Sgdw::load_state", state);
        let steps = r.steps();
        let buf = r.buffer(MOMENTUM_BUFFER_KEY, self.momentum_buffer.len());
        r.finish()?;
        if let (Some(steps), Some(buf)) = (steps, buf) {
            self.steps = steps;
            self.momentum_buffer = buf;
            self.device_momentum = None;
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
    use crate::Device;

    fn params(values: &[f32]) -> FlatParams {
        let p = FlatParams::new(&[("w".to_string(), vec![values.len()])], Device::Cpu).unwrap();
        p.set("w", &Tensor::f32(values.to_vec(), &[values.len()]).unwrap())
            .unwrap();
        p
    }

    fn set_grad(p: &FlatParams, g: &[f32]) {
        p.grads().write_f32().unwrap().copy_from_slice(g);
    }

    #[test]
    fn momentum_and_decoupled_decay_by_hand() {
        // momentum 0.5, dampening 0.25, wd 0.1, initial_lr 2, lr 1: decay = 1 - 0.1 * 0.5.
        let p = params(&[1.0, -2.0]);
        let mut opt = Sgdw::new(2, 0.5, 0.25, 0.1, false, 2.0).unwrap();
        set_grad(&p, &[0.5, 1.0]);
        opt.step(&p, 1.0).unwrap();
        // buf = g; p = p * 0.95 - 1 * buf
        let v = p.values().to_vec_f32().unwrap();
        assert_eq!(v, vec![0.95 - 0.5, -1.9 - 1.0]);
        set_grad(&p, &[1.0, -1.0]);
        opt.step(&p, 2.0).unwrap();
        // buf = 0.5 * buf + 0.75 * g = [1.0, -0.25]; decay = 1 - 0.1 * 1 = 0.9
        let expect = [0.45f32 * 0.9 - 2.0 * 1.0, -2.9f32 * 0.9 - 2.0 * -0.25];
        let v = p.values().to_vec_f32().unwrap();
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{v:?} vs {expect:?}");
        }
        assert_eq!(opt.steps_taken(), 2);
    }

    #[test]
    fn nesterov_by_hand() {
        let p = params(&[1.0]);
        let mut opt = Sgdw::new(1, 0.5, 0.0, 0.0, true, 1.0).unwrap();
        set_grad(&p, &[1.0]);
        opt.step(&p, 0.1).unwrap(); // buf = 1, d = 1 + 0.5 = 1.5
        set_grad(&p, &[2.0]);
        opt.step(&p, 0.1).unwrap(); // buf = 0.5 + 2 = 2.5, d = 2 + 1.25 = 3.25
        let v = p.values().to_scalar_f32().unwrap();
        assert!((v - (1.0 - 0.15 - 0.325)).abs() < 1e-6, "{v}");
    }

    #[test]
    fn no_momentum_is_plain_sgd_without_touching_the_buffer() {
        let s = SgdwStep {
            lr: 0.5,
            decay: 1.0,
            momentum: 0.0,
            grad_weight: 1.0,
            nesterov: false,
            first: false,
        };
        let mut p = [1.0, 2.0];
        sgdw_update_cpu(&mut p, &[2.0, 2.0], &mut [], &s).unwrap();
        assert_eq!(p, [0.0, 1.0]);
    }

    #[test]
    fn parallel_step_matches_the_kernel_across_chunks() {
        let n = 2 * CHUNK + 123;
        let init = Tensor::randn(&[n], 0.0, 1.0, 1, crate::DType::F32, Device::Cpu).unwrap();
        let p = FlatParams::new(&[("w".to_string(), vec![n])], Device::Cpu).unwrap();
        p.set("w", &init).unwrap();
        let mut opt = Sgdw::paper(n, 0.1).unwrap();
        let mut want = init.to_vec_f32().unwrap();
        let mut buf = vec![0.0; n];
        for (seed, lr) in [(2u64, 0.1f32), (3, 0.05)] {
            let g = Tensor::randn(&[n], 0.0, 1.0, seed, crate::DType::F32, Device::Cpu).unwrap();
            p.grads().copy_from(&g).unwrap();
            let s = opt.step_scalars(lr);
            sgdw_update_cpu(&mut want, &g.to_vec_f32().unwrap(), &mut buf, &s).unwrap();
            opt.step(&p, lr).unwrap();
        }
        assert_eq!(p.values().to_vec_f32().unwrap(), want);
    }

    #[test]
    fn resumed_state_continues_bit_identically() {
        let grads = [[0.3f32, -0.2, 0.9], [0.1, 0.4, -0.7], [-0.5, 0.2, 0.6]];
        let run = |resume_after: Option<usize>| {
            let p = params(&[0.5, -1.0, 2.0]);
            let mut opt = Sgdw::new(3, 0.875, 0.0, 5e-4, true, 0.1).unwrap();
            for (i, g) in grads.iter().enumerate() {
                if resume_after == Some(i) {
                    let state = opt.state();
                    opt = Sgdw::new(3, 0.875, 0.0, 5e-4, true, 0.1).unwrap();
                    opt.load_state(&state).unwrap();
                }
                set_grad(&p, g);
                opt.step(&p, 0.1 - 0.01 * i as f32).unwrap();
            }
            (p.values().to_vec_f32().unwrap(), opt.steps_taken())
        };
        let straight = run(None);
        assert_eq!(run(Some(1)), straight);
        assert_eq!(run(Some(2)), straight);
        assert_eq!(straight.1, 3);
    }

    #[test]
    fn errors() {
        assert!(Sgdw::new(1, 0.9, 0.1, 0.0, true, 0.1).is_err());
        assert!(Sgdw::new(1, 0.0, 0.0, 0.0, true, 0.1).is_err());
        assert!(Sgdw::new(1, -0.1, 0.0, 0.0, false, 0.1).is_err());
        assert!(Sgdw::new(1, 0.9, 0.0, -1e-4, false, 0.1).is_err());
        assert!(Sgdw::new(1, 0.9, 0.0, 1e-4, false, 0.0).is_err());

        let p = params(&[1.0, 2.0, 3.0]);
        let mut opt = Sgdw::paper(2, 0.1).unwrap();
        let e = opt.step(&p, 0.1).unwrap_err().to_string();
        assert!(e.contains("2 parameters") && e.contains('3'), "{e}");
        let mut opt = Sgdw::paper(3, 0.1).unwrap();
        assert!(opt.step(&p, f32::NAN).is_err());
        assert!(opt.step(&p, -1.0).is_err());
        assert_eq!(opt.steps_taken(), 0);

        let e = sgdw_update_cpu(
            &mut [1.0, 2.0],
            &[1.0],
            &mut [0.0, 0.0],
            &opt.step_scalars(0.1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("grad 1"), "{e}");

        let e = opt.load_state(&[]).unwrap_err().to_string();
        assert!(
            e.contains(STEP_KEY) && e.contains(MOMENTUM_BUFFER_KEY),
            "{e}"
        );
        let bad = vec![
            (STEP_KEY.to_string(), step_tensor(4)),
            (
                MOMENTUM_BUFFER_KEY.to_string(),
                Tensor::f32(vec![0.0; 2], &[2]).unwrap(),
            ),
        ];
        let e = opt.load_state(&bad).unwrap_err().to_string();
        assert!(
            e.contains(MOMENTUM_BUFFER_KEY) && e.contains("[2]") && e.contains("expected 3"),
            "{e}"
        );
        assert_eq!(opt.steps_taken(), 0, "a failed load changes nothing");
    }

    /// With a bf16 working copy the master takes exactly the f32 step (bit for bit the same
    /// as without one) and the working copy is the master rounded to nearest even, element for
    /// element, across several chunks of the parallel loop.
    #[test]
    fn working_copy_step_is_the_f32_step_plus_rounding() {
        let n = CHUNK + 77;
        crate::optim::working_copy_check::assert_master_exact_and_working_rounded(
            n,
            4,
            &mut Sgdw::new(n, 0.875, 0.0, 5e-4, true, 0.1).unwrap(),
            &mut Sgdw::new(n, 0.875, 0.0, 5e-4, true, 0.1).unwrap(),
            &[(5, 0.1), (6, 0.07), (7, 0.02)],
        );
    }
}
