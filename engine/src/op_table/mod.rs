//! One table of op cases, written once and run on every device: each case is its inputs'
//! shapes, the op (a closure over the tape, so forward and backward are both exercised) and
//! its tolerances. The CPU is the oracle, so:
//!
//! - on the CPU, every case passes a finite-difference gradient check ([`grad_check`]);
//! - on a device (a GPU, or the mock CUDA, which runs each kernel on the kernel simulator),
//!   [`compare`] runs the case there and on the CPU with the same inputs and measures the
//!   output and every input's gradient against the CPU's;
//! - beside the cases, [`compare_casts`] and [`compare_optimizer_steps`] hold the casts and
//!   the optimizer steps on a device to the CPU's bits.
//!
//! The engine's tests run all of them (`engine/tests/op_table.rs`); `recycle gpu-check` runs
//! the comparisons on `cuda:N`, one group per family, then the casts and the optimizers. Adding an op means adding its cases to
//! `cases.rs` (the fused distillation loss's are in `cases_extra.rs`); nothing else lists them.

mod cases;
mod cases_extra;
mod exact;
mod measure;

use std::sync::Arc;

pub use exact::{compare_casts, compare_optimizer_steps};
pub use measure::{error, max_rel_err, max_scaled_err};

use crate::gradcheck::GradCheck;
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

/// The op of a case: builds its output from the inputs on a tape.
pub type CaseOp = Arc<dyn Fn(&Tape, &[Var]) -> Result<Var> + Send + Sync>;

/// One row of the table.
#[derive(Clone)]
pub struct OpCase {
    /// The family (one `recycle gpu-check` group each): one of [`FAMILIES`].
    pub family: &'static str,
    /// Names the case in reports.
    pub name: String,
    /// The inputs' shapes; every input is differentiated.
    pub shapes: Vec<Vec<usize>>,
    /// Tolerances in f32 storage, `(output, gradients)`, in [`max_rel_err`].
    pub tol: (f64, f64),
    /// The same in bf16 storage, in [`max_scaled_err`]: [`BF16_TOL`] unless the op's output
    /// keeps f32 precision (a loss summed in f32 from bf16 logits).
    pub bf16_tol: (f64, f64),
    pub op: CaseOp,
}

/// The families, in the table's order.
pub const FAMILIES: [&str; 8] = [
    "elementwise",
    "matmul",
    "convolutions",
    "norms",
    "gathers and dropout",
    "pools and layouts",
    "attention",
    "cross-entropy",
];

/// The storage types every case runs in on a device.
pub const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// The tolerance of bf16 storage: the device rounds its intermediates to bf16, the CPU keeps
/// them in f32.
pub const BF16_TOL: f64 = 2e-2;

impl OpCase {
    /// `(output, gradients)` tolerances for `dtype` storage.
    pub fn tolerances(&self, dtype: DType) -> (f64, f64) {
        match dtype {
            DType::BF16 => self.bf16_tol,
            _ => self.tol,
        }
    }

    /// The shapes as a report shows them: `[2, 3] [3]`.
    pub fn shape_text(&self) -> String {
        let shapes: Vec<String> = self.shapes.iter().map(|s| format!("{s:?}")).collect();
        shapes.join(" ")
    }
}

impl std::fmt::Debug for OpCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}) {}", self.name, self.family, self.shape_text())
    }
}

/// Every case of the table.
pub fn cases() -> Vec<OpCase> {
    let mut all = cases::all();
    all.extend(cases_extra::kd_loss_cases());
    all
}

/// The cases of `family`.
pub fn family(family: &str) -> Vec<OpCase> {
    cases().into_iter().filter(|c| c.family == family).collect()
}

/// Draws the `n`-th input of a comparison: normal values (σ = 1.5) of `dtype` on the CPU.
pub fn draw(shape: &[usize], dtype: DType, n: u64) -> Result<Tensor> {
    Tensor::randn(shape, 0.0, 1.5, 0x5eed_0000 + n, dtype, Device::Cpu)
}

/// One measured quantity of a comparison: the output, or one input's gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct Compared {
    /// `name`, `name backward` (one input) or `name backward dI`.
    pub label: String,
    pub err: f64,
    pub tol: f64,
}

impl Compared {
    pub fn pass(&self) -> bool {
        self.err <= self.tol
    }
}

/// The output and every input's gradient of `case` on `inputs`, with `upstream` the output's
/// gradient (ones when None).
pub fn run(case: &OpCase, inputs: &[Tensor], upstream: Option<&Tensor>) -> Result<Vec<Tensor>> {
    let tape = Tape::recording();
    let vars: Vec<Var> = inputs.iter().map(|t| tape.watch(t.clone())).collect();
    let y = (case.op)(&tape, &vars)?;
    let out = y.tensor().clone();
    let g = match upstream {
        Some(g) => g.clone(),
        None => Tensor::ones(out.shape(), DType::F32, out.device())?,
    };
    let grads = tape.backward_with(&y, g)?;
    let mut all = vec![out];
    for v in &vars {
        all.push(
            grads.get(v).cloned().ok_or_else(|| {
                Error::Autograd(format!("{}: no gradient for an input", case.name))
            })?,
        );
    }
    Ok(all)
}

/// `case` in `dtype` storage on `device` against the CPU, on the same drawn inputs and
/// upstream gradient (draws numbered from `*draws + 1` on; `*draws` is advanced past them).
pub fn compare(
    case: &OpCase,
    dtype: DType,
    device: Device,
    draws: &mut u64,
) -> Result<Vec<Compared>> {
    let mut next = |shape: &[usize]| -> Result<(Tensor, Tensor)> {
        *draws += 1;
        let cpu = draw(shape, dtype, *draws)?;
        let dev = cpu.to_device(device)?;
        Ok((cpu, dev))
    };
    let (mut cpu_in, mut dev_in) = (Vec::new(), Vec::new());
    for s in &case.shapes {
        let (c, d) = next(s)?;
        cpu_in.push(c);
        dev_in.push(d);
    }
    // The upstream gradient: random, of the output's shape (found by a CPU forward), except
    // for a scalar output.
    let probe = Tape::inference();
    let consts: Vec<Var> = cpu_in.iter().map(|t| probe.constant(t.clone())).collect();
    let out_shape = (case.op)(&probe, &consts)?.shape().to_vec();
    let (g_cpu, g_dev) = if out_shape.iter().product::<usize>() == 1 {
        (None, None)
    } else {
        let (c, d) = next(&out_shape)?;
        (Some(c), Some(d))
    };
    let on_device = run(case, &dev_in, g_dev.as_ref())?;
    let on_cpu = run(case, &cpu_in, g_cpu.as_ref())?;
    let (tol, bwd_tol) = case.tolerances(dtype);
    let inputs = case.shapes.len();
    on_device
        .iter()
        .zip(&on_cpu)
        .enumerate()
        .map(|(i, (d, c))| {
            let (label, tol) = match i {
                0 => (case.name.clone(), tol),
                _ if inputs == 1 => (format!("{} backward", case.name), bwd_tol),
                _ => (format!("{} backward d{}", case.name, i - 1), bwd_tol),
            };
            Ok(Compared {
                label,
                err: error(dtype, d, c)?,
                tol,
            })
        })
        .collect()
}

/// The CPU's check of `case`: its gradients (f32) against central differences of its forward,
/// at the case's shapes. Returns the largest relative error.
pub fn grad_check(case: &OpCase) -> Result<f32> {
    let inputs = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| draw(s, DType::F32, 1000 + i as u64))
        .collect::<Result<Vec<_>>>()?;
    let wrt: Vec<usize> = (0..inputs.len()).collect();
    let op = case.op.clone();
    GradCheck {
        samples: 16,
        ..GradCheck::default()
    }
    .run(&inputs, &wrt, move |t, v| op(t, v))
    .map_err(|e| Error::Autograd(format!("{}: {e}", case.name)))
}
