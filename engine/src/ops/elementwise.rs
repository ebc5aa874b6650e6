//! Elementwise arithmetic and reductions: broadcasting `add` / `sub` / `mul`, scalar `scale` and
//! `add_scalar`, the dedicated `bias_add` of convolutions and linear layers, the reductions
//! `sum`, `mean` and `sum_axis`, and the differentiable dtype `cast` (how a model enters its
//! compute dtype).
//!
//! Binary ops follow NumPy's broadcasting rule: shapes are aligned on the right and each pair of
//! dimensions must be equal or one of them 1 (a missing leading dimension counts as 1). In
//! backward, the gradient of an input that was broadcast is summed over the dimensions it was
//! stretched along, so it comes back in the input's own shape. Residual additions (ResNet,
//! BERT) are same-shape `add`s, so that path runs on all threads without any index arithmetic,
//! and its backward hands the output gradient through without copying it.
//!
//! Each op records one backward for every device; the kernels, the broadcasting rule and the
//! dispatch of the arithmetic are in `crate::backend::elementwise`, the reductions' in
//! `crate::backend::layout`.

use crate::backend::elementwise::{
    add_scalar_fwd, bias_add_bwd, bias_add_fwd, binary_fwd, scale_fwd, sum_to_shape,
    to_compute_dtype,
};
use crate::backend::layout::{fill_bwd, sum_axis_bwd, sum_axis_fwd, sum_fwd};
use crate::backend::BinaryOp;
use crate::{DType, Error, Result, Tape, Tensor, Var};

fn check_float(op: &'static str, xs: &[&Var]) -> Result<()> {
    xs.iter().try_for_each(|x| x.tensor().expect_float(op))
}

fn binary(tape: &Tape, op: BinaryOp, a: &Var, b: &Var) -> Result<Var> {
    check_float(op.name(), &[a, b])?;
    let out = binary_fwd(op, a.tensor(), b.tensor())?;
    let (a_shape, b_shape) = (a.shape().to_vec(), b.shape().to_vec());
    let dtype = out.dtype();
    // Only mul needs the input values for its gradient.
    let saved = (op == BinaryOp::Mul).then(|| (a.tensor().clone(), b.tensor().clone()));
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |g, needs| {
            let g = to_compute_dtype(g, dtype)?;
            // d(a * b)/da = g * b, summed back to a's shape (and the other way round); d(a ± b)
            // is g (negated for the subtrahend), summed back: a same-shape residual hands the
            // gradient through without copying it.
            let grad = |other: Option<&Tensor>, shape: &[usize], negate: bool| match other {
                Some(o) => sum_to_shape(&binary_fwd(BinaryOp::Mul, &g, o)?, shape),
                None if negate => scale_fwd(&sum_to_shape(&g, shape)?, -1.0),
                None => sum_to_shape(&g, shape),
            };
            let (sa, sb) = match &saved {
                Some((av, bv)) => (Some(bv), Some(av)),
                None => (None, None),
            };
            Ok(vec![
                needs[0].then(|| grad(sa, &a_shape, false)).transpose()?,
                needs[1]
                    .then(|| grad(sb, &b_shape, op == BinaryOp::Sub))
                    .transpose()?,
            ])
        }),
    ))
}

/// `a + b` with NumPy broadcasting.
pub fn add(tape: &Tape, a: &Var, b: &Var) -> Result<Var> {
    binary(tape, BinaryOp::Add, a, b)
}

/// `a - b` with NumPy broadcasting.
pub fn sub(tape: &Tape, a: &Var, b: &Var) -> Result<Var> {
    binary(tape, BinaryOp::Sub, a, b)
}

/// `a * b` (elementwise) with NumPy broadcasting.
pub fn mul(tape: &Tape, a: &Var, b: &Var) -> Result<Var> {
    binary(tape, BinaryOp::Mul, a, b)
}

// ---------------------------------------------------------------------------------------------
// Scalar ops
// ---------------------------------------------------------------------------------------------

/// `s * x`.
pub fn scale(tape: &Tape, x: &Var, s: f32) -> Result<Var> {
    let out = scale_fwd(x.tensor(), s)?;
    let dtype = out.dtype();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| scale_fwd(&to_compute_dtype(g, dtype)?, s))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

/// `x + s`.
pub fn add_scalar(tape: &Tape, x: &Var, s: f32) -> Result<Var> {
    let out = add_scalar_fwd(x.tensor(), s)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| Ok(vec![needs[0].then(|| g.clone())])),
    ))
}

// ---------------------------------------------------------------------------------------------
// Cast
// ---------------------------------------------------------------------------------------------

/// `x` converted to `dtype` (f32 ↔ bf16; round to nearest even, on either device, through
/// `Tensor::cast`). Backward casts the gradient back to `x`'s dtype, so every gradient has the
/// type of the value it belongs to: a bf16 input gets its gradient rounded to bf16 (to nearest
/// even), an f32 input gets the upstream gradient widened exactly. When `x` already has
/// `dtype` this is the identity: the same `Var` (same tape id), and no node is recorded.
///
/// This is how a model enters its compute dtype (`ResNet`/`Bert` activations): on a GPU every
/// op after the cast runs in `dtype`; the CPU ops widen bf16 to f32 on read, so there the cast
/// only rounds the values once.
pub fn cast(tape: &Tape, x: &Var, dtype: DType) -> Result<Var> {
    let from = x.tensor().dtype();
    if !from.is_float() || !dtype.is_float() {
        // i32 values (ids, labels) have no gradient: casting them belongs to `Tensor::cast`.
        return Err(Error::invalid(
            "cast",
            format!(
                "the differentiable cast converts between f32 and bf16, got {from} to {dtype}; \
                 use Tensor::cast for integer tensors"
            ),
        ));
    }
    if from == dtype {
        return Ok(x.clone());
    }
    let out = x.tensor().cast(dtype)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| Ok(vec![needs[0].then(|| g.cast(from)).transpose()?])),
    ))
}

// ---------------------------------------------------------------------------------------------
// Bias
// ---------------------------------------------------------------------------------------------

/// `x + bias` along `axis` (`bias` has shape `[x.shape[axis]]`): axis 1 for NCHW convolution
/// outputs, the last axis for linear outputs. A dedicated loop, cheaper than broadcasting.
pub fn bias_add(tape: &Tape, x: &Var, bias: &Var, axis: usize) -> Result<Var> {
    check_float("bias_add", &[x, bias])?;
    let shape = x.shape().to_vec();
    if axis >= shape.len() {
        return Err(Error::shape(
            "bias_add",
            format!("axis {axis} out of range for input {shape:?}"),
        ));
    }
    let c = shape[axis];
    if bias.shape() != [c] {
        return Err(Error::shape(
            "bias_add",
            format!(
                "bias {:?} does not match axis {axis} of input {shape:?} (expected [{c}])",
                bias.shape()
            ),
        ));
    }
    let inner: usize = shape[axis + 1..].iter().product();
    let out = bias_add_fwd(x.tensor(), bias.tensor(), c, inner)?;
    let dtype = out.dtype();
    Ok(tape.record(
        out,
        &[x, bias],
        Box::new(move |g, needs| {
            let g = to_compute_dtype(g, dtype)?;
            let gb = needs[1].then(|| bias_add_bwd(&g, c, inner)).transpose()?;
            Ok(vec![needs[0].then_some(g), gb])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

/// Sum of all elements, as a scalar (shape `[]`).
pub fn sum(tape: &Tape, x: &Var) -> Result<Var> {
    let out = sum_fwd(x.tensor(), false)?;
    let (shape, dtype) = (x.shape().to_vec(), x.tensor().dtype());
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            Ok(vec![needs[0]
                .then(|| fill_bwd(g, &shape, 1.0, dtype))
                .transpose()?])
        }),
    ))
}

/// Mean of all elements, as a scalar (shape `[]`). An empty tensor has no mean: error.
pub fn mean(tape: &Tape, x: &Var) -> Result<Var> {
    x.tensor().expect_float("mean")?;
    let n = x.tensor().elem_count();
    if n == 0 {
        return Err(Error::invalid(
            "mean",
            format!("mean of an empty tensor of shape {:?}", x.shape()),
        ));
    }
    let out = sum_fwd(x.tensor(), true)?;
    let (shape, dtype) = (x.shape().to_vec(), x.tensor().dtype());
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            Ok(vec![needs[0]
                .then(|| fill_bwd(g, &shape, 1.0 / n as f32, dtype))
                .transpose()?])
        }),
    ))
}

/// Sum over dimension `axis`; with `keep_dim` the dimension stays, with size 1.
pub fn sum_axis(tape: &Tape, x: &Var, axis: usize, keep_dim: bool) -> Result<Var> {
    x.tensor().expect_float("sum_axis")?;
    let shape = x.shape().to_vec();
    if axis >= shape.len() {
        return Err(Error::shape(
            "sum_axis",
            format!("axis {axis} out of range for input {shape:?}"),
        ));
    }
    let out = sum_axis_fwd(x.tensor(), axis, keep_dim)?;
    let dtype = out.dtype();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| sum_axis_bwd(&to_compute_dtype(g, dtype)?, &shape, axis))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::elementwise::*;
    use crate::gradcheck::GradCheck;
    use crate::Device;
    use half::bf16;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::f32(v.to_vec(), shape).unwrap()
    }

    /// `out[i] = a[..] op b[..]` by explicit multi-index arithmetic, the naive reference.
    fn naive_broadcast(op: BinaryOp, a: &Tensor, b: &Tensor) -> Vec<f32> {
        let out = broadcast_shape(a.shape(), b.shape()).unwrap();
        let (av, bv) = (a.to_vec_f32().unwrap(), b.to_vec_f32().unwrap());
        let n: usize = out.iter().product();
        let index = |shape: &[usize], coords: &[usize]| {
            let lead = coords.len() - shape.len();
            shape.iter().enumerate().fold(0, |acc, (d, &s)| {
                acc * s + if s == 1 { 0 } else { coords[lead + d] }
            })
        };
        (0..n)
            .map(|mut i| {
                let mut coords = vec![0; out.len()];
                for d in (0..out.len()).rev() {
                    coords[d] = i % out[d];
                    i /= out[d];
                }
                op.apply(av[index(a.shape(), &coords)], bv[index(b.shape(), &coords)])
            })
            .collect()
    }

    #[test]
    fn broadcast_shapes() {
        assert_eq!(broadcast_shape(&[2, 3], &[3]), Some(vec![2, 3]));
        assert_eq!(broadcast_shape(&[4, 1, 5], &[3, 1]), Some(vec![4, 3, 5]));
        assert_eq!(broadcast_shape(&[], &[2, 2]), Some(vec![2, 2]));
        assert_eq!(broadcast_shape(&[0, 1], &[1, 3]), Some(vec![0, 3]));
        assert_eq!(broadcast_shape(&[2, 3], &[2]), None);
    }

    #[test]
    fn binary_forward_matches_hand_values_and_naive_broadcast() {
        let tape = Tape::inference();
        let a = tape.constant(t(&[1., 2., 3., 4., 5., 6.], &[2, 3]));
        let b = tape.constant(t(&[10., 20., 30.], &[3]));
        let c = tape.constant(t(&[100., 200.], &[2, 1]));
        let y = add(&tape, &a, &b).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![11., 22., 33., 14., 25., 36.]
        );
        let y = sub(&tape, &a, &c).unwrap();
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![-99., -98., -97., -196., -195., -194.]
        );
        let y = mul(&tape, &b, &c).unwrap(); // [3] * [2, 1] -> [2, 3]
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![1000., 2000., 3000., 2000., 4000., 6000.]
        );

        let cases: [(&[usize], &[usize]); 5] = [
            (&[2, 3, 4, 5], &[3, 1, 5]),
            (&[2, 1, 4, 1], &[1, 3, 1, 6]),
            (&[7], &[4, 7]),
            (&[4, 1], &[]),
            (&[64, 33, 40], &[33, 1]), // large enough for the parallel path
        ];
        for (k, (sa, sb)) in cases.iter().enumerate() {
            let (a, b) = (randn(sa, k as u64), randn(sb, 100 + k as u64));
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                let (va, vb) = (tape.constant(a.clone()), tape.constant(b.clone()));
                let y = binary(&tape, op, &va, &vb).unwrap();
                assert_eq!(
                    y.tensor().to_vec_f32().unwrap(),
                    naive_broadcast(op, &a, &b),
                    "{op:?} {sa:?} {sb:?}"
                );
            }
        }
    }

    #[test]
    fn same_shape_fast_path_large() {
        let (a, b) = (randn(&[300, 400], 1), randn(&[300, 400], 2));
        let tape = Tape::inference();
        let y = add(&tape, &tape.constant(a.clone()), &tape.constant(b.clone())).unwrap();
        let (av, bv, yv) = (
            a.to_vec_f32().unwrap(),
            b.to_vec_f32().unwrap(),
            y.tensor().to_vec_f32().unwrap(),
        );
        assert!(yv
            .iter()
            .zip(av.iter().zip(&bv))
            .all(|(y, (a, b))| *y == a + b));
    }

    #[test]
    fn binary_gradients() {
        let gc = GradCheck::default();
        let cases: [(&[usize], &[usize]); 5] = [
            (&[3, 4], &[3, 4]),
            (&[2, 3, 4], &[4]),
            (&[2, 1, 4], &[3, 1]),
            (&[5], &[2, 3, 5]),
            (&[2, 3], &[]),
        ];
        for (k, (sa, sb)) in cases.iter().enumerate() {
            let inputs = [randn(sa, 10 + k as u64), randn(sb, 20 + k as u64)];
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                let err = gc
                    .run(&inputs, &[0, 1], |tape, v| binary(tape, op, &v[0], &v[1]))
                    .unwrap_or_else(|e| panic!("{op:?} {sa:?} {sb:?}: {e}"));
                assert!(err < 1e-2);
            }
        }
    }

    #[test]
    fn same_input_twice_accumulates() {
        // y = x * x + x: dy/dx = 2x + 1.
        let tape = Tape::recording();
        let x = tape.watch(t(&[1., -2., 3.], &[3]));
        let sq = mul(&tape, &x, &x).unwrap();
        let y = add(&tape, &sq, &x).unwrap();
        let g = tape.backward_with(&y, t(&[1., 1., 1.], &[3])).unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec_f32().unwrap(), vec![3., -3., 7.]);
    }

    #[test]
    fn binary_shape_errors_name_both_shapes() {
        let tape = Tape::recording();
        let a = tape.watch(randn(&[2, 3], 0));
        let b = tape.watch(randn(&[2], 1));
        for op in [add, sub, mul] {
            let err = op(&tape, &a, &b).unwrap_err();
            assert!(matches!(err, Error::Shape { .. }), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("[2, 3]") && msg.contains("[2]"), "{msg}");
        }
        let ids = tape.constant(Tensor::from_vec(vec![1i32, 2, 3], &[3], Device::Cpu).unwrap());
        let c = tape.watch(randn(&[3], 2));
        assert!(matches!(add(&tape, &ids, &c), Err(Error::DType { .. })));
    }

    #[test]
    fn scalar_ops_forward_and_gradients() {
        let tape = Tape::inference();
        let x = tape.constant(t(&[1., -2., 3.5], &[3]));
        let y = scale(&tape, &x, -2.0).unwrap();
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![-2., 4., -7.]);
        let y = add_scalar(&tape, &x, 0.5).unwrap();
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![1.5, -1.5, 4.0]);

        let gc = GradCheck::default();
        let inputs = [randn(&[4, 5], 3)];
        gc.run(&inputs, &[0], |tape, v| scale(tape, &v[0], 1.7))
            .unwrap();
        gc.run(&inputs, &[0], |tape, v| add_scalar(tape, &v[0], -0.3))
            .unwrap();
    }

    #[test]
    fn bias_add_forward_both_layouts() {
        let tape = Tape::inference();
        // NCHW: [1, 2, 2, 1] plus a per-channel bias.
        let x = tape.constant(t(&[1., 2., 3., 4.], &[1, 2, 2, 1]));
        let b = tape.constant(t(&[10., 20.], &[2]));
        let y = bias_add(&tape, &x, &b, 1).unwrap();
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![11., 12., 23., 24.]);
        // Linear: [2, 2] plus a per-feature bias.
        let x = tape.constant(t(&[1., 2., 3., 4.], &[2, 2]));
        let y = bias_add(&tape, &x, &b, 1).unwrap();
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![11., 22., 13., 24.]);

        // Agrees with broadcasting `add` on large tensors (parallel paths).
        for (shape, axis, bshape) in [
            (vec![8, 16, 24, 24], 1, vec![16, 1, 1]),
            (vec![4, 128, 192], 2, vec![192]),
        ] {
            let x = randn(&shape, 5);
            let b = randn(&[shape[axis]], 6);
            let y = bias_add(
                &tape,
                &tape.constant(x.clone()),
                &tape.constant(b.clone()),
                axis,
            )
            .unwrap();
            let r = add(
                &tape,
                &tape.constant(x),
                &tape.constant(b.reshape(&bshape).unwrap()),
            )
            .unwrap();
            assert_eq!(
                y.tensor().to_vec_f32().unwrap(),
                r.tensor().to_vec_f32().unwrap()
            );
        }
    }

    #[test]
    fn bias_add_backward_matches_naive_sum_on_large_inputs() {
        for (shape, axis) in [(vec![8, 16, 24, 24], 1), (vec![700, 96], 1)] {
            let c = shape[axis];
            let inner: usize = shape[axis + 1..].iter().product();
            let g = randn(&shape, 9).to_vec_f32().unwrap();
            let db = bias_add_backward_cpu(&g, c, inner);
            let mut naive = vec![0f64; c];
            for (i, v) in g.iter().enumerate() {
                naive[(i / inner) % c] += *v as f64;
            }
            for (a, b) in db.iter().zip(&naive) {
                assert!((*a as f64 - b).abs() < 1e-3, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn bias_add_gradients() {
        let gc = GradCheck::default();
        for (shape, axis) in [
            (vec![2, 3, 4, 5], 1),
            (vec![3, 4, 6], 2),
            (vec![5, 7], 1),
            (vec![4, 3, 2], 0),
        ] {
            let inputs = [randn(&shape, 11), randn(&[shape[axis]], 12)];
            gc.run(&inputs, &[0, 1], |tape, v| {
                bias_add(tape, &v[0], &v[1], axis)
            })
            .unwrap_or_else(|e| panic!("{shape:?} axis {axis}: {e}"));
        }
    }

    #[test]
    fn bias_add_errors() {
        let tape = Tape::recording();
        let x = tape.watch(randn(&[2, 3, 4], 0));
        let b = tape.watch(randn(&[4], 1));
        let msg = bias_add(&tape, &x, &b, 1).unwrap_err().to_string();
        assert!(msg.contains("[4]") && msg.contains("[2, 3, 4]"), "{msg}");
        assert!(matches!(
            bias_add(&tape, &x, &b, 3),
            Err(Error::Shape { .. })
        ));
        let b2 = tape.watch(randn(&[1, 4], 1));
        assert!(matches!(
            bias_add(&tape, &x, &b2, 2),
            Err(Error::Shape { .. })
        ));
    }

    #[test]
    fn reductions_forward() {
        let tape = Tape::inference();
        let x = tape.constant(t(&[1., 2., 3., 4., 5., 6.], &[2, 3]));
        let s = sum(&tape, &x).unwrap();
        assert_eq!(s.shape(), &[] as &[usize]);
        assert_eq!(s.tensor().to_scalar_f32().unwrap(), 21.0);
        assert_eq!(
            mean(&tape, &x).unwrap().tensor().to_scalar_f32().unwrap(),
            3.5
        );
        let y = sum_axis(&tape, &x, 0, false).unwrap();
        assert_eq!(y.shape(), &[3]);
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![5., 7., 9.]);
        let y = sum_axis(&tape, &x, 1, true).unwrap();
        assert_eq!(y.shape(), &[2, 1]);
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![6., 15.]);

        // A large sum is accurate (f64 accumulation) and deterministic.
        let big = Tensor::full(0.1, &[1 << 20], DType::F32, Device::Cpu).unwrap();
        let s = sum(&tape, &tape.constant(big.clone()))
            .unwrap()
            .tensor()
            .to_scalar_f32()
            .unwrap();
        assert!((s - 104857.6).abs() < 0.01, "{s}");
        let m = mean(&tape, &tape.constant(big))
            .unwrap()
            .tensor()
            .to_scalar_f32()
            .unwrap();
        assert!((m - 0.1).abs() < 1e-7, "{m}");

        // sum_axis against a naive loop on a large tensor (parallel path).
        let x = randn(&[6, 50, 300], 4);
        let xv = x.to_vec_f32().unwrap();
        let y = sum_axis(&tape, &tape.constant(x), 1, false)
            .unwrap()
            .tensor()
            .to_vec_f32()
            .unwrap();
        for o in 0..6 {
            for i in 0..300 {
                let r: f32 = (0..50).map(|k| xv[(o * 50 + k) * 300 + i]).sum();
                assert!((y[o * 300 + i] - r).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn reduction_gradients() {
        let gc = GradCheck::default();
        let inputs = [randn(&[3, 4, 5], 21)];
        gc.run(&inputs, &[0], |tape, v| sum(tape, &v[0])).unwrap();
        gc.run(&inputs, &[0], |tape, v| mean(tape, &v[0])).unwrap();
        for axis in 0..3 {
            for keep in [false, true] {
                gc.run(&inputs, &[0], |tape, v| sum_axis(tape, &v[0], axis, keep))
                    .unwrap_or_else(|e| panic!("axis {axis} keep {keep}: {e}"));
            }
        }
        // The scalar loss works with plain `backward`.
        let tape = Tape::recording();
        let x = tape.watch(t(&[1., 2., 3., 4.], &[2, 2]));
        let m = mean(&tape, &x).unwrap();
        let g = tape.backward(&m).unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec_f32().unwrap(), vec![0.25; 4]);
    }

    #[test]
    fn reduction_errors() {
        let tape = Tape::recording();
        let x = tape.watch(randn(&[2, 3], 0));
        assert!(matches!(
            sum_axis(&tape, &x, 2, false),
            Err(Error::Shape { .. })
        ));
        let empty = tape.watch(Tensor::zeros(&[0, 3], DType::F32, Device::Cpu).unwrap());
        // Summing over an empty axis gives zeros, over a non-empty one an empty tensor.
        let y = sum_axis(&tape, &empty, 0, false).unwrap();
        assert_eq!(y.shape(), &[3]);
        assert_eq!(y.tensor().to_vec_f32().unwrap(), vec![0.0; 3]);
        assert_eq!(sum_axis(&tape, &empty, 1, true).unwrap().shape(), &[0, 1]);
        assert!(matches!(mean(&tape, &empty), Err(Error::Invalid { .. })));
        assert_eq!(
            sum(&tape, &empty)
                .unwrap()
                .tensor()
                .to_scalar_f32()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn cast_forward_rounds_and_backward_returns_the_gradient_in_the_input_dtype() {
        // bf16 keeps 7 explicit mantissa bits, so its spacing at 1 is 2^-7: 1 + 2^-8 lies
        // exactly halfway between 1 and 1 + 2^-7 and rounds to the even one (1); 1 + 3 * 2^-8
        // lies halfway between 1 + 2^-7 and 1 + 2^-6 and rounds to the even one (1 + 2^-6).
        let vals = [1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8), -2.5, 0.1];
        let tape = Tape::recording();
        let x = tape.watch(t(&vals, &[4]));
        let y = cast(&tape, &x, DType::BF16).unwrap();
        assert_eq!(y.tensor().dtype(), DType::BF16);
        assert_eq!(tape.len(), 1);
        let want: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(y.tensor().to_vec::<bf16>().unwrap(), want);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![1.0, 1.0 + 2f32.powi(-6), -2.5, bf16::from_f32(0.1).to_f32()]
        );
        // f32 input: the upstream gradient comes back exactly (f32 to f32).
        let up = [1.0 + 2f32.powi(-10), -3.25, 0.3, 7.0];
        let g = tape.backward_with(&y, t(&up, &[4])).unwrap();
        let gx = g.get(&x).unwrap();
        assert_eq!(gx.dtype(), DType::F32);
        assert_eq!(gx.to_vec_f32().unwrap(), up.to_vec());

        // bf16 input cast to f32: the forward widens exactly, the gradient is rounded to bf16
        // (1 + 2^-10 is below bf16's resolution at 1 and becomes 1).
        let tape = Tape::recording();
        let xb = tape.watch(t(&vals, &[4]).cast(DType::BF16).unwrap());
        let y = cast(&tape, &xb, DType::F32).unwrap();
        assert_eq!(y.tensor().dtype(), DType::F32);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            xb.tensor().to_vec_f32().unwrap()
        );
        let g = tape.backward_with(&y, t(&up, &[4])).unwrap();
        let gx = g.get(&xb).unwrap();
        assert_eq!(gx.dtype(), DType::BF16);
        let rounded: Vec<bf16> = up.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(gx.to_vec::<bf16>().unwrap(), rounded);
        assert_eq!(gx.to_vec_f32().unwrap()[0], 1.0);
    }

    #[test]
    fn cast_to_the_same_dtype_is_the_identity_and_integers_are_refused() {
        let tape = Tape::recording();
        let x = tape.watch(randn(&[3, 2], 4));
        let y = cast(&tape, &x, DType::F32).unwrap();
        assert_eq!(y.id(), x.id());
        assert!(y.tensor().same_storage(x.tensor()));
        assert!(tape.is_empty(), "no node for an identity cast");
        let ids = tape.constant(Tensor::from_vec(vec![1i32, 2], &[2], Device::Cpu).unwrap());
        let msg = cast(&tape, &ids, DType::F32).unwrap_err().to_string();
        assert!(msg.contains("i32") && msg.contains("Tensor::cast"), "{msg}");
        let msg = cast(&tape, &x, DType::I32).unwrap_err().to_string();
        assert!(msg.contains("f32 to i32"), "{msg}");
        // An inference tape records nothing.
        let tape = Tape::inference();
        let y = cast(&tape, &tape.constant(randn(&[2], 5)), DType::BF16).unwrap();
        assert!(!y.requires_grad() && tape.is_empty());
    }

    /// The round trip f32 → bf16 → f32 is the identity plus a rounding of at most half a bf16
    /// spacing, so its derivative is 1 almost everywhere (the backward says exactly 1: the
    /// straight-through gradient of a rounding). A central difference of a staircase is off by
    /// up to spacing / (2 h): with inputs of |x| < 4 (spacing ≤ 2^-5) and h = 0.5 that is at
    /// most 3.2%, so the check runs with that step and a 5% tolerance; a backward that dropped
    /// or doubled the gradient would miss by 100%.
    #[test]
    fn cast_round_trip_gradient() {
        let gc = GradCheck {
            step: 0.5,
            tolerance: 5e-2,
            ..GradCheck::default()
        };
        let x: Vec<f32> = randn(&[6, 7], 31)
            .to_vec_f32()
            .unwrap()
            .into_iter()
            .map(|v| v.clamp(-3.0, 3.0))
            .collect();
        let err = gc
            .run(&[t(&x, &[6, 7])], &[0], |tape, v| {
                let b = cast(tape, &v[0], DType::BF16)?;
                cast(tape, &b, DType::F32)
            })
            .unwrap();
        assert!(err < 5e-2, "{err}");
    }
}
