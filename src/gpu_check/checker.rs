//! The comparison machinery of the check: [`Checker`] draws fresh inputs, runs the op table's
//! cases (`recycle_engine::op_table`) on the device against the CPU and records rows; the
//! error measures ([`max_rel_err`] element by element, from the op table, [`rel_l2_err`],
//! [`scalar_rel_err`], [`l2_norm`]) say how far the GPU is from the CPU.

pub use recycle_engine::op_table::{max_rel_err, max_scaled_err};
use recycle_engine::{op_table, DType, Device, Result, Tensor};

use super::CheckRow;

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
        let cpu = op_table::draw(shape, dtype, self.seed)?;
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
        // bf16 intermediates (GPU) against f32 ones (CPU): see `max_scaled_err`.
        let err = op_table::error(dtype, gpu, cpu)?;
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

    /// The op table's cases of `family` on the device against the CPU, in every storage
    /// type of [`op_table::DTYPES`]: a row for the output and one for each input's gradient.
    pub(super) fn table(&mut self, family: &str) -> Result<()> {
        let cases = op_table::family(family);
        for dtype in op_table::DTYPES {
            for case in &cases {
                for r in op_table::compare(case, dtype, self.device, &mut self.seed)? {
                    self.record_err(&r.label, case.shape_text(), dtype, r.err, r.tol);
                }
            }
        }
        Ok(())
    }

    /// The rows of a comparison held to the CPU's bits (`op_table::compare_casts`,
    /// `compare_optimizer_steps`): the error column is the number of elements that differ.
    pub(super) fn exact(&mut self, dtype: DType, rows: Vec<op_table::Compared>) {
        for r in rows {
            self.record_err(
                &r.label,
                "bits: elements that differ".into(),
                dtype,
                r.err,
                r.tol,
            );
        }
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
