//! The comparison machinery of the check: [`Checker`] draws fresh inputs, runs a tape op on
//! both devices and records a row; the error measures ([`max_rel_err`] element by element,
//! [`rel_l2_err`], [`scalar_rel_err`], [`l2_norm`]) say how far the GPU is from the CPU.

use recycle_engine::{DType, Device, Error, Result, Tape, Tensor, Var};

use super::CheckRow;

/// Largest element error of `gpu` against the oracle `cpu` (see the module doc); infinite for
/// a length mismatch or a non-finite value where the CPU has a finite one.
pub fn max_rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    max_err_over(gpu, cpu, |c, scale| {
        c.abs().max((1e-3 * scale).max(f64::MIN_POSITIVE))
    })
}

/// Largest element error of `gpu` against `cpu` relative to the tensor's scale,
/// `|gpu - cpu| / max|cpu|` (non-finite values as in [`max_rel_err`]): the measure of bf16
/// rows, whose intermediates the GPU rounds to bf16 while the CPU op keeps them in f32.
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

/// Called with every row as it is recorded (the runner prints it).
pub(super) type RowEcho = Box<dyn FnMut(&CheckRow)>;

pub(super) struct Checker {
    pub(super) device: Device,
    pub(super) seed: u64,
    pub(super) rows: Vec<CheckRow>,
    pub(super) echo: Option<RowEcho>,
}

pub(super) fn dims(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Checker {
    pub(super) fn new(device: Device) -> Checker {
        Checker {
            device,
            seed: 0,
            rows: Vec::new(),
            echo: None,
        }
    }

    /// Records `row` and passes it to the echo.
    pub(super) fn push(&mut self, row: CheckRow) {
        if let Some(echo) = self.echo.as_mut() {
            echo(&row);
        }
        self.rows.push(row);
    }

    /// A fresh random tensor of `dtype` on the CPU and its copy on the GPU.
    pub(super) fn fresh(&mut self, shape: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        self.seed += 1;
        let cpu = Tensor::randn(shape, 0.0, 1.5, 0x5eed_0000 + self.seed, dtype, Device::Cpu)?;
        let gpu = cpu.to_device(self.device)?;
        Ok((cpu, gpu))
    }

    pub(super) fn record(
        &mut self,
        op: &str,
        shapes: String,
        dtype: DType,
        gpu: &Tensor,
        cpu: &Tensor,
        tol: f64,
    ) -> Result<()> {
        let err = if gpu.shape() != cpu.shape() {
            f64::INFINITY
        } else if dtype == DType::BF16 {
            // bf16 intermediates (GPU) against f32 ones (CPU): see `max_scaled_err`.
            max_scaled_err(&gpu.to_vec_f32()?, &cpu.to_vec_f32()?)
        } else {
            max_rel_err(&gpu.to_vec_f32()?, &cpu.to_vec_f32()?)
        };
        self.record_err(op, shapes, dtype, err, tol);
        Ok(())
    }

    pub(super) fn record_err(
        &mut self,
        op: &str,
        shapes: String,
        dtype: DType,
        err: f64,
        tol: f64,
    ) {
        self.push(CheckRow {
            op: op.to_string(),
            shapes,
            dtype,
            max_rel_err: err,
            tolerance: tol,
            pass: err <= tol,
            note: None,
        });
    }

    /// A tape op of `inputs.len()` tensors: forward output and every input's gradient.
    pub(super) fn tape_op(
        &mut self,
        name: &str,
        shapes: &[&[usize]],
        dtype: DType,
        tol: f64,
        f: impl Fn(&Tape, &[Var]) -> Result<Var>,
    ) -> Result<()> {
        self.tape_op_tols(name, shapes, dtype, (tol, tol), f)
    }

    /// [`Checker::tape_op`] with one tolerance for the forward output and another for the
    /// gradients (`(forward, backward)`).
    pub(super) fn tape_op_tols(
        &mut self,
        name: &str,
        shapes: &[&[usize]],
        dtype: DType,
        (tol, bwd_tol): (f64, f64),
        f: impl Fn(&Tape, &[Var]) -> Result<Var>,
    ) -> Result<()> {
        let mut cpu_in = Vec::new();
        let mut gpu_in = Vec::new();
        for s in shapes {
            let (c, g) = self.fresh(s, dtype)?;
            cpu_in.push(c);
            gpu_in.push(g);
        }
        let run = |inputs: &[Tensor],
                   upstream: Option<&Tensor>|
         -> Result<(Tensor, Vec<Tensor>, Tensor)> {
            let tape = Tape::recording();
            let vars: Vec<Var> = inputs.iter().map(|t| tape.watch(t.clone())).collect();
            let y = f(&tape, &vars)?;
            let out = y.tensor().clone();
            let g = match upstream {
                Some(g) => g.clone(),
                None => Tensor::ones(out.shape(), DType::F32, out.device())?,
            };
            let grads = tape.backward_with(&y, g.clone())?;
            let dx =
                vars.iter()
                    .map(|v| {
                        grads.get(v).cloned().ok_or_else(|| {
                            Error::Autograd(format!("{name}: no gradient for an input"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            Ok((out, dx, g))
        };
        // The upstream gradient: random, of the output's shape (found by a CPU forward).
        let out_shape = f(
            &Tape::inference(),
            &cpu_in
                .iter()
                .map(|t| Tape::inference().constant(t.clone()))
                .collect::<Vec<_>>(),
        )?
        .shape()
        .to_vec();
        let (g_cpu, g_gpu) = if out_shape.iter().product::<usize>() == 1 {
            (None, None)
        } else {
            let (c, g) = self.fresh(&out_shape, dtype)?;
            (Some(c), Some(g))
        };
        let (y_gpu, dx_gpu, _) = run(&gpu_in, g_gpu.as_ref())?;
        let (y_cpu, dx_cpu, _) = run(&cpu_in, g_cpu.as_ref())?;
        let shape_text = shapes.iter().map(|s| dims(s)).collect::<Vec<_>>().join(" ");
        self.record(name, shape_text.clone(), dtype, &y_gpu, &y_cpu, tol)?;
        for (i, (g, c)) in dx_gpu.iter().zip(&dx_cpu).enumerate() {
            let label = if shapes.len() == 1 {
                format!("{name} backward")
            } else {
                format!("{name} backward d{i}")
            };
            self.record(&label, shape_text.clone(), dtype, g, c, bwd_tol)?;
        }
        Ok(())
    }
}

/// Tolerance of an op in `dtype`: `f32_tol` for f32 storage, 2e-2 for bf16.
pub(super) fn tol(dtype: DType, f32_tol: f64) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        _ => f32_tol,
    }
}

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Relative difference of two scalars (infinite when either is not finite).
pub fn scalar_rel_err(gpu: f64, cpu: f64) -> f64 {
    if !gpu.is_finite() || !cpu.is_finite() {
        return f64::INFINITY;
    }
    (gpu - cpu).abs() / cpu.abs().max(f64::MIN_POSITIVE)
}

/// Relative L2 error `‖gpu − cpu‖ / ‖cpu‖` (f64), infinite for a length mismatch or a
/// non-finite value: the measure of the bf16 model-step rows, where single elements near zero
/// carry no information (their bf16 rounding is as large as they are) but the vector as a
/// whole must agree.
pub fn rel_l2_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() || gpu.iter().chain(cpu).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = gpu
        .iter()
        .zip(cpu)
        .map(|(&g, &c)| (g as f64 - c as f64).powi(2))
        .sum();
    diff.sqrt() / l2_norm(cpu).max(f64::MIN_POSITIVE)
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
    fn scalar_errors_and_norms() {
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(scalar_rel_err(2.0, 2.0), 0.0);
        assert!((scalar_rel_err(2.002, 2.0) - 1e-3).abs() < 1e-9);
        assert_eq!(scalar_rel_err(f64::NAN, 2.0), f64::INFINITY);
    }

    #[test]
    fn relative_l2_error() {
        assert_eq!(rel_l2_err(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel_l2_err(&[3.0, 4.5], &[3.0, 4.0]) - 0.1).abs() < 1e-12);
        assert_eq!(rel_l2_err(&[f32::NAN, 4.0], &[3.0, 4.0]), f64::INFINITY);
        assert_eq!(rel_l2_err(&[3.0], &[3.0, 4.0]), f64::INFINITY);
    }
}
