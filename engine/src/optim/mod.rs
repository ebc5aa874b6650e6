//! Optimizers and learning-rate schedules over a model's flat parameter buffer.
//!
//! A model keeps every parameter in one flat f32 buffer and every gradient in another
//! ([`FlatParams`]), so an optimizer step is one pass over one buffer: on the CPU a rayon loop
//! over chunks, on a GPU one fused kernel launch. Each optimizer therefore comes in two layers:
//!
//! - a plain CPU kernel over slices (`sgdw_update_cpu`, `adamw_update_cpu`) that takes the
//!   per-step scalars precomputed on the host (learning rate, decay multiplier, bias
//!   corrections). It is the oracle a fused CUDA kernel is checked against, so it is written
//!   element by element in the same order of operations as PyTorch's single-tensor path;
//! - a struct holding the hyper-parameters and the state (momentum buffers, Adam moments, the
//!   step count) that implements [`Optimizer`].
//!
//! The optimizer state returned by [`Optimizer::state`] is everything a resumed run needs to
//! continue bit-identically; it is meant to be written next to the parameters in a checkpoint
//! (`crate::checkpoint::save`). Entry names start with `optimizer.` so they never collide with
//! parameter names, and [`Optimizer::load_state`] ignores entries it does not know, so the whole
//! checkpoint can be handed to it.
//!
//! Non-finite gradients are not an optimizer's business (the trainer checks the loss first);
//! a gradient buffer of the wrong length, or state of the wrong size, is an error.

pub mod adamw;
pub mod schedule;
pub mod sgdw;

pub use adamw::{adamw_update_cpu, AdamW, AdamWStep};
pub use schedule::LrSchedule;
pub use sgdw::{sgdw_update_cpu, Sgdw, SgdwStep};

use crate::{DType, Error, FlatParams, Result, Tensor};

/// Name of the step-count entry in every optimizer's state (a 1-element i32 tensor).
pub const STEP_KEY: &str = "optimizer.step";

/// Elements per rayon task: large enough that scheduling is noise, small enough that a
/// ResNet-50 (25M parameters) spreads over many threads.
pub(crate) const CHUNK: usize = 1 << 16;

/// A first-order optimizer over a model's flat parameter buffer.
pub trait Optimizer {
    /// One update of `params.values()` from `params.grads()` at learning rate `lr`.
    fn step(&mut self, params: &FlatParams, lr: f32) -> Result<()>;

    /// Everything a resumed run needs to continue bit-identically, as named tensors
    /// (copies: later steps do not change them).
    fn state(&self) -> Vec<(String, Tensor)>;

    /// Restores what [`Optimizer::state`] returned. Errors name every missing or mis-sized
    /// entry; entries this optimizer does not use are ignored.
    fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<()>;

    /// Number of `step` calls so far (including those before a resume).
    fn steps_taken(&self) -> u64;
}

/// Checks that a step can run: finite non-negative `lr`, gradients as long as the values,
/// state sized for this buffer, values and gradients in distinct storage.
pub(crate) fn check_step(
    op: &'static str,
    params: &FlatParams,
    state_len: usize,
    lr: f32,
) -> Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        return Err(Error::invalid(
            op,
            format!("learning rate must be finite and >= 0, got {lr}"),
        ));
    }
    let (values, grads) = (params.values(), params.grads());
    values.expect_dtype(op, DType::F32)?;
    grads.expect_float(op)?;
    if grads.elem_count() != values.elem_count() {
        return Err(Error::shape(
            op,
            format!(
                "gradient buffer has {} elements, parameter buffer has {}",
                grads.elem_count(),
                values.elem_count()
            ),
        ));
    }
    if state_len != values.elem_count() {
        return Err(Error::shape(
            op,
            format!(
                "optimizer state was built for {state_len} parameters, this buffer has {}",
                values.elem_count()
            ),
        ));
    }
    if values.same_storage(grads) {
        return Err(Error::invalid(
            op,
            "parameter and gradient buffers share storage".to_string(),
        ));
    }
    Ok(())
}

/// The optimizer state `host` as a tensor on `device`: `cached` when it is already there (the
/// state lives on the GPU between steps), else a fresh upload, kept in `cached`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn state_on(
    cached: &mut Option<Tensor>,
    host: &[f32],
    device: crate::Device,
) -> Result<Tensor> {
    if let Some(t) = cached {
        if t.device() == device {
            return Ok(t.clone());
        }
    }
    let t = Tensor::from_slice(host, &[host.len()], device)?;
    *cached = Some(t.clone());
    Ok(t)
}

/// A state buffer for a checkpoint: copied back from the GPU when it lives there. A failed copy
/// (a broken context) gives an empty tensor, which `load_state` rejects by its size, rather
/// than the stale host copy.
pub(crate) fn state_tensor(device_copy: &Option<Tensor>, host: &[f32]) -> Tensor {
    let n = host.len();
    let values = match device_copy {
        Some(t) => t.to_vec_f32().unwrap_or_default(),
        None => host.to_vec(),
    };
    let len = values.len();
    debug_assert!(len == n || len == 0);
    Tensor::f32(values, &[len]).expect("len values fill [len]")
}

/// The step count as a checkpointable 1-element i32 tensor.
pub(crate) fn step_tensor(steps: u64) -> Tensor {
    // `next_step` refuses to count past i32::MAX, so the conversion cannot fail.
    let v = i32::try_from(steps).unwrap_or(i32::MAX);
    Tensor::from_vec(vec![v], &[1], crate::Device::Cpu).expect("one value fills shape [1]")
}

/// The step count after one more step, refusing counts a checkpoint cannot hold.
pub(crate) fn next_step(op: &'static str, steps: u64) -> Result<u64> {
    if steps >= i32::MAX as u64 {
        return Err(Error::invalid(
            op,
            format!("step count {steps} exceeds what a checkpoint stores (i32)"),
        ));
    }
    Ok(steps + 1)
}

/// Reads named entries of an optimizer state, collecting every problem into one error.
pub(crate) struct StateReader<'a> {
    op: &'static str,
    state: &'a [(String, Tensor)],
    problems: Vec<String>,
}

impl<'a> StateReader<'a> {
    pub(crate) fn new(op: &'static str, state: &'a [(String, Tensor)]) -> Self {
        StateReader {
            op,
            state,
            problems: Vec::new(),
        }
    }

    fn find(&mut self, name: &str) -> Option<&'a Tensor> {
        let found = self.state.iter().find(|(n, _)| n == name).map(|(_, t)| t);
        if found.is_none() {
            self.problems.push(format!("missing `{name}`"));
        }
        found
    }

    /// The f32 values of entry `name`, which must hold `len` elements.
    pub(crate) fn buffer(&mut self, name: &str, len: usize) -> Option<Vec<f32>> {
        let t = self.find(name)?;
        if !t.dtype().is_float() {
            self.problems
                .push(format!("`{name}` has dtype {}, expected f32", t.dtype()));
            return None;
        }
        if t.elem_count() != len {
            self.problems.push(format!(
                "`{name}` has shape {:?} ({} elements), expected {len} elements",
                t.shape(),
                t.elem_count()
            ));
            return None;
        }
        match t.to_vec_f32() {
            Ok(v) => Some(v),
            Err(e) => {
                self.problems.push(format!("`{name}`: {e}"));
                None
            }
        }
    }

    /// The step count (entry [`STEP_KEY`]): one non-negative integer, stored as i32 (or as an
    /// integral float, as PyTorch stores it).
    pub(crate) fn steps(&mut self) -> Option<u64> {
        let t = self.find(STEP_KEY)?;
        if t.elem_count() != 1 {
            self.problems.push(format!(
                "`{STEP_KEY}` has shape {:?}, expected one element",
                t.shape()
            ));
            return None;
        }
        let value = match t.dtype() {
            DType::I32 => t.read_i32().map(|v| v[0] as f64),
            _ => t.to_scalar_f32().map(|v| v as f64),
        };
        match value {
            Ok(v) if v >= 0.0 && v.fract() == 0.0 && v <= i32::MAX as f64 => Some(v as u64),
            Ok(v) => {
                self.problems.push(format!(
                    "`{STEP_KEY}` is {v}, expected a non-negative integer"
                ));
                None
            }
            Err(e) => {
                self.problems.push(format!("`{STEP_KEY}`: {e}"));
                None
            }
        }
    }

    /// Ok when every entry read so far was present and well-sized.
    pub(crate) fn finish(self) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        Err(Error::invalid(
            self.op,
            format!("cannot load optimizer state: {}", self.problems.join("; ")),
        ))
    }
}

/// Shared by the optimizers' tests: the working-copy rule, checked the same way for each.
#[cfg(test)]
pub(crate) mod working_copy_check {
    use super::Optimizer;
    use crate::{DType, Device, FlatParams, Tensor};

    /// Steps `plain` on an f32 buffer and `mixed` (a twin optimizer) on the same buffer with
    /// a bf16 working copy, with the same gradients at each `(seed, lr)`; then the master
    /// must be the f32 result bit for bit, the working copy that result rounded to nearest
    /// even, and the rounding must have changed something (or the check proves nothing).
    pub(crate) fn assert_master_exact_and_working_rounded(
        n: usize,
        init_seed: u64,
        plain: &mut dyn Optimizer,
        mixed: &mut dyn Optimizer,
        steps: &[(u64, f32)],
    ) {
        let init = Tensor::randn(&[n], 0.0, 1.0, init_seed, DType::F32, Device::Cpu).unwrap();
        let spec = [("w".to_string(), vec![n])];
        let f32_only = FlatParams::new(&spec, Device::Cpu).unwrap();
        let mut with_copy = FlatParams::new(&spec, Device::Cpu).unwrap();
        f32_only.set("w", &init).unwrap();
        with_copy.set("w", &init).unwrap();
        with_copy.enable_working_copy().unwrap();
        for &(seed, lr) in steps {
            let g = Tensor::randn(&[n], 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap();
            f32_only.grads().copy_from(&g).unwrap();
            with_copy.grads().copy_from(&g).unwrap();
            plain.step(&f32_only, lr).unwrap();
            mixed.step(&with_copy, lr).unwrap();
        }
        let master = with_copy.values().to_vec_f32().unwrap();
        let want = f32_only.values().to_vec_f32().unwrap();
        assert!(master
            .iter()
            .zip(&want)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
        let working = with_copy.working().unwrap().to_vec::<half::bf16>().unwrap();
        let rounded: Vec<half::bf16> = want.iter().map(|&v| half::bf16::from_f32(v)).collect();
        assert_eq!(working, rounded);
        assert!(working.iter().zip(&master).any(|(w, m)| w.to_f32() != *m));
    }
}
