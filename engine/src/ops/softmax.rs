//! Softmax and log-softmax over the last dimension.
//!
//! Both subtract the row maximum before exponentiating, so large logits (a confident teacher,
//! a temperature below one) do not overflow. The row kernels are public: attention and the
//! fused distillation loss apply them to rows they hold in their own buffers, and a GPU kernel
//! is checked against them.
//!
//! A row whose entries are all `-inf` has no defined distribution; its softmax is NaN, as in
//! PyTorch. Callers that mask (attention) use a large finite negative instead.

use rayon::prelude::*;

use crate::{Device, Error, Result, Tape, Tensor, Var};

/// Rows handed to one rayon task: enough elements (about 16K) that the split pays for itself.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// `out = softmax(input)` for one row.
pub fn softmax_row_cpu(input: &[f32], out: &mut [f32]) {
    let max = input.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max).exp();
        sum += *o;
    }
    let inv = 1.0 / sum;
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `out = log_softmax(input) = (input - max) - ln(sum(exp(input - max)))` for one row.
/// Subtracting `max` first keeps the digits of `input - max` when the logits are large.
pub fn log_softmax_row_cpu(input: &[f32], out: &mut [f32]) {
    let max = input.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f32 = input.iter().map(|&x| (x - max).exp()).sum();
    let log_sum = sum.ln();
    for (o, &x) in out.iter_mut().zip(input) {
        *o = (x - max) - log_sum;
    }
}

/// Gradient of softmax for one row, from its output `y`: `dx = y * (dy - <dy, y>)`.
pub fn softmax_backward_row_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let dot: f32 = y.iter().zip(dy).map(|(a, b)| a * b).sum();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = yi * (gi - dot);
    }
}

/// Gradient of log-softmax for one row, from its output `y`: `dx = dy - exp(y) * sum(dy)`.
pub fn log_softmax_backward_row_cpu(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let sum: f32 = dy.iter().sum();
    for ((d, &yi), &gi) in dx.iter_mut().zip(y).zip(dy) {
        *d = gi - yi.exp() * sum;
    }
}

/// Softmax of every row of length `row_len` in `x` (rows in parallel).
pub fn softmax_forward_cpu(x: &[f32], row_len: usize, out: &mut [f32]) {
    apply_rows(x, row_len, out, softmax_row_cpu);
}

/// Log-softmax of every row of length `row_len` in `x` (rows in parallel).
pub fn log_softmax_forward_cpu(x: &[f32], row_len: usize, out: &mut [f32]) {
    apply_rows(x, row_len, out, log_softmax_row_cpu);
}

/// Softmax backward for every row, from the forward output `y` and upstream `dy`.
pub fn softmax_backward_cpu(y: &[f32], dy: &[f32], row_len: usize, dx: &mut [f32]) {
    apply_rows2(y, dy, row_len, dx, softmax_backward_row_cpu);
}

/// Log-softmax backward for every row, from the forward output `y` and upstream `dy`.
pub fn log_softmax_backward_cpu(y: &[f32], dy: &[f32], row_len: usize, dx: &mut [f32]) {
    apply_rows2(y, dy, row_len, dx, log_softmax_backward_row_cpu);
}

fn apply_rows(x: &[f32], row_len: usize, out: &mut [f32], f: fn(&[f32], &mut [f32])) {
    if row_len == 0 {
        return;
    }
    out.par_chunks_mut(row_len)
        .zip(x.par_chunks(row_len))
        .with_min_len(rows_per_task(row_len))
        .for_each(|(o, i)| f(i, o));
}

fn apply_rows2(
    a: &[f32],
    b: &[f32],
    row_len: usize,
    out: &mut [f32],
    f: fn(&[f32], &[f32], &mut [f32]),
) {
    if row_len == 0 {
        return;
    }
    out.par_chunks_mut(row_len)
        .zip(a.par_chunks(row_len).zip(b.par_chunks(row_len)))
        .with_min_len(rows_per_task(row_len))
        .for_each(|(o, (a, b))| f(a, b, o));
}

/// Softmax over the last dimension of `x` (any rank >= 1, f32 or bf16); output f32.
pub fn softmax(tape: &Tape, x: &Var) -> Result<Var> {
    last_dim_op(
        tape,
        x,
        "softmax",
        softmax_forward_cpu,
        softmax_backward_cpu,
    )
}

/// Log-softmax over the last dimension of `x` (any rank >= 1, f32 or bf16); output f32.
pub fn log_softmax(tape: &Tape, x: &Var) -> Result<Var> {
    last_dim_op(
        tape,
        x,
        "log_softmax",
        log_softmax_forward_cpu,
        log_softmax_backward_cpu,
    )
}

type RowsForward = fn(&[f32], usize, &mut [f32]);
type RowsBackward = fn(&[f32], &[f32], usize, &mut [f32]);

/// Shared body of softmax and log_softmax: both backward passes need only the output.
fn last_dim_op(
    tape: &Tape,
    x: &Var,
    op: &'static str,
    forward: RowsForward,
    backward: RowsBackward,
) -> Result<Var> {
    let xt = x.tensor();
    xt.expect_float(op)?;
    if xt.rank() == 0 {
        return Err(Error::shape(
            op,
            "input is a scalar; it needs a last dimension to normalise over".to_string(),
        ));
    }
    match xt.device() {
        Device::Cpu => {}
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(
                d,
                crate::cuda::softmax::softmax(tape, x, op == "log_softmax")
            );
        }
    }
    let shape = xt.shape().to_vec();
    let row_len = *shape.last().expect("rank >= 1");
    let mut out = vec![0f32; xt.elem_count()];
    forward(&xt.read_f32()?, row_len, &mut out);
    let y = Tensor::f32(out, &shape)?;
    let saved = y.clone();
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let mut dx = vec![0f32; saved.elem_count()];
            backward(&saved.read_f32()?, &g.read_f32()?, row_len, &mut dx);
            Ok(vec![Some(Tensor::f32(dx, &shape)?)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device};

    fn naive_softmax(row: &[f64]) -> Vec<f64> {
        let e: Vec<f64> = row.iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn forward_matches_naive_and_is_stable() {
        // Second row would overflow exp() without the max subtraction.
        let x = vec![1.0f32, 2.0, 3.0, -1.0, 1000.0, 1001.0, 999.0, 1000.5];
        let tape = Tape::inference();
        let xv = tape.constant(Tensor::f32(x.clone(), &[2, 4]).unwrap());
        let y = softmax(&tape, &xv).unwrap().tensor().to_vec_f32().unwrap();
        let ly = log_softmax(&tape, &xv)
            .unwrap()
            .tensor()
            .to_vec_f32()
            .unwrap();
        for r in 0..2 {
            let shifted: Vec<f64> = x[r * 4..r * 4 + 4]
                .iter()
                .map(|&v| v as f64 - x[r * 4] as f64)
                .collect();
            let want = naive_softmax(&shifted);
            for c in 0..4 {
                let (got, lgot) = (y[r * 4 + c] as f64, ly[r * 4 + c] as f64);
                assert!((got - want[c]).abs() < 1e-6, "{got} vs {}", want[c]);
                assert!(
                    (lgot - want[c].ln()).abs() < 1e-5,
                    "{lgot} vs {}",
                    want[c].ln()
                );
            }
        }
        assert!(y.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn bf16_input_is_widened() {
        let tape = Tape::inference();
        let x = Tensor::f32(vec![0.5, -0.25, 2.0], &[3]).unwrap();
        let xb = tape.constant(x.cast(DType::BF16).unwrap());
        let y = softmax(&tape, &xb).unwrap();
        assert_eq!(y.tensor().dtype(), DType::F32);
        let want = naive_softmax(&[0.5, -0.25, 2.0]);
        for (g, w) in y.tensor().to_vec_f32().unwrap().iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let x = Tensor::randn(&[3, 5, 7], 0.0, 2.0, 11, DType::F32, Device::Cpu).unwrap();
        let check = GradCheck::default();
        check
            .run(std::slice::from_ref(&x), &[0], |t, v| softmax(t, &v[0]))
            .unwrap();
        check.run(&[x], &[0], |t, v| log_softmax(t, &v[0])).unwrap();
    }

    #[test]
    fn errors_on_scalar_and_integer_input() {
        let tape = Tape::inference();
        let s = tape.constant(Tensor::f32(vec![1.0], &[]).unwrap());
        let err = softmax(&tape, &s).unwrap_err().to_string();
        assert!(err.contains("softmax") && err.contains("scalar"), "{err}");
        let i = tape.constant(Tensor::from_vec(vec![1i32, 2], &[2], Device::Cpu).unwrap());
        assert!(log_softmax(&tape, &i).is_err());
    }
}
