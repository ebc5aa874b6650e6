//! Layout ops: `reshape` (a view), and the copies `permute` / `transpose`, `concat` and
//! `narrow`.
//!
//! Tensors are always contiguous row-major, so only `reshape` can share storage; a new order of
//! dimensions (attention heads `[B, S, H, D] -> [B, H, S, D]`), a concatenation or a slice along
//! an inner dimension is materialised by a copy. Backward of each copy is the matching copy the
//! other way: the inverse permutation, the slices of a concatenation, a zero-padded slice, each
//! recorded once for every device; the copies themselves are `crate::backend::layout`'s.

use crate::backend::elementwise::to_compute_dtype;
use crate::backend::layout::{
    concat_fwd, inverse_permutation, narrow_bwd, narrow_fwd, permute_fwd,
};
use crate::{Error, Result, Tape, Tensor, Var};

// ---------------------------------------------------------------------------------------------
// Tape ops
// ---------------------------------------------------------------------------------------------

/// The same elements under another shape (no copy; the output shares `x`'s storage).
pub fn reshape(tape: &Tape, x: &Var, shape: &[usize]) -> Result<Var> {
    let out = x.tensor().reshape(shape)?;
    let in_shape = x.shape().to_vec();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| Ok(vec![needs[0].then(|| g.reshape(&in_shape)).transpose()?])),
    ))
}

/// Dimensions reordered (a copy): output dimension `i` is input dimension `dims[i]`.
pub fn permute(tape: &Tape, x: &Var, dims: &[usize]) -> Result<Var> {
    x.tensor().expect_float("permute")?;
    let shape = x.shape().to_vec();
    let mut seen = vec![false; shape.len()];
    let valid = dims.len() == shape.len()
        && dims
            .iter()
            .all(|&d| d < shape.len() && !std::mem::replace(&mut seen[d], true));
    if !valid {
        return Err(Error::shape(
            "permute",
            format!("dims {dims:?} are not a permutation of the dimensions of input {shape:?}"),
        ));
    }
    let out = permute_fwd(x.tensor(), dims)?;
    let (inverse, dtype) = (inverse_permutation(dims), out.dtype());
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| permute_fwd(&to_compute_dtype(g, dtype)?, &inverse))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

/// Dimensions `d0` and `d1` swapped (a copy, through `permute`).
pub fn transpose(tape: &Tape, x: &Var, d0: usize, d1: usize) -> Result<Var> {
    let rank = x.tensor().rank();
    if d0 >= rank || d1 >= rank {
        return Err(Error::shape(
            "transpose",
            format!("dimensions {d0} and {d1} for input {:?}", x.shape()),
        ));
    }
    let mut dims: Vec<usize> = (0..rank).collect();
    dims.swap(d0, d1);
    permute(tape, x, &dims)
}

/// Concatenation along `axis`; every input has the same shape except along `axis`.
pub fn concat(tape: &Tape, xs: &[&Var], axis: usize) -> Result<Var> {
    let first = xs
        .first()
        .ok_or_else(|| Error::invalid("concat", "no tensors to concatenate"))?;
    let shape = first.shape().to_vec();
    if axis >= shape.len() {
        return Err(Error::shape(
            "concat",
            format!("axis {axis} out of range for input {shape:?}"),
        ));
    }
    for (k, x) in xs.iter().enumerate() {
        x.tensor().expect_float("concat")?;
        let s = x.shape();
        let fits = s.len() == shape.len()
            && s.iter()
                .zip(&shape)
                .enumerate()
                .all(|(d, (a, b))| d == axis || a == b);
        if !fits {
            return Err(Error::shape(
                "concat",
                format!("input {k} {s:?} does not match input 0 {shape:?} outside axis {axis}"),
            ));
        }
    }
    let sizes: Vec<usize> = xs.iter().map(|x| x.shape()[axis]).collect();
    let tensors: Vec<&Tensor> = xs.iter().map(|x| x.tensor()).collect();
    let out = concat_fwd(&tensors, axis)?;
    let dtype = out.dtype();
    Ok(tape.record(
        out,
        xs,
        Box::new(move |g, needs| {
            // Input k's gradient: its slice of g along `axis`.
            let g = to_compute_dtype(g, dtype)?;
            let mut start = 0;
            needs
                .iter()
                .zip(&sizes)
                .map(|(&need, &size)| {
                    let at = start;
                    start += size;
                    need.then(|| narrow_fwd(&g, axis, at, size)).transpose()
                })
                .collect()
        }),
    ))
}

/// Elements `[start, start + len)` along `axis` (a copy).
pub fn narrow(tape: &Tape, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
    x.tensor().expect_float("narrow")?;
    let shape = x.shape().to_vec();
    if axis >= shape.len() {
        return Err(Error::shape(
            "narrow",
            format!("axis {axis} out of range for input {shape:?}"),
        ));
    }
    let n = shape[axis];
    if start.checked_add(len).is_none_or(|end| end > n) {
        return Err(Error::shape(
            "narrow",
            format!(
                "elements {start}..{} of axis {axis} of input {shape:?} (size {n})",
                start.saturating_add(len)
            ),
        ));
    }
    let out = narrow_fwd(x.tensor(), axis, start, len)?;
    let dtype = out.dtype();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| narrow_bwd(&to_compute_dtype(g, dtype)?, &shape, axis, start))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::elementwise::contiguous_strides;
    use crate::gradcheck::GradCheck;
    use crate::{DType, Device};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        Tensor::randn(shape, 0.0, 1.0, seed, DType::F32, Device::Cpu).unwrap()
    }

    fn iota(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::f32((0..n).map(|v| v as f32).collect(), shape).unwrap()
    }

    fn values(v: &Var) -> Vec<f32> {
        v.tensor().to_vec_f32().unwrap()
    }

    #[test]
    fn reshape_is_a_view_with_gradient() {
        let tape = Tape::recording();
        let x = tape.watch(iota(&[2, 3]));
        let y = reshape(&tape, &x, &[3, 2]).unwrap();
        assert_eq!(y.shape(), &[3, 2]);
        assert!(y.tensor().same_storage(x.tensor()));
        assert_eq!(values(&y), values(&x));
        let err = reshape(&tape, &x, &[4, 2]).unwrap_err().to_string();
        assert!(err.contains("[2, 3]") && err.contains("[4, 2]"), "{err}");
        GradCheck::default()
            .run(&[randn(&[2, 3, 4], 1)], &[0], |tape, v| {
                reshape(tape, &v[0], &[6, 4])
            })
            .unwrap();
    }

    #[test]
    fn permute_forward_against_naive() {
        let tape = Tape::inference();
        let x = tape.constant(iota(&[2, 3]));
        let y = transpose(&tape, &x, 0, 1).unwrap();
        assert_eq!(y.shape(), &[3, 2]);
        assert_eq!(values(&y), vec![0., 3., 1., 4., 2., 5.]);

        // [B, S, H, D] -> [B, H, S, D] on a tensor large enough for the parallel path, and a
        // permutation that moves the last dimension (strided inner loop).
        for (shape, dims) in [
            ([4, 64, 8, 40], [0, 2, 1, 3]),
            ([3, 5, 7, 11], [3, 1, 0, 2]),
        ] {
            let xt = randn(&shape, 2);
            let xv = xt.to_vec_f32().unwrap();
            let y = values(&permute(&tape, &tape.constant(xt), &dims).unwrap());
            let os: Vec<usize> = dims.iter().map(|&d| shape[d]).collect();
            let st = contiguous_strides(&shape);
            let mut i = 0;
            for a in 0..os[0] {
                for b in 0..os[1] {
                    for c in 0..os[2] {
                        for d in 0..os[3] {
                            let coords = [a, b, c, d];
                            let src: usize = (0..4).map(|k| coords[k] * st[dims[k]]).sum();
                            assert_eq!(y[i], xv[src]);
                            i += 1;
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn permute_gradients_and_errors() {
        let gc = GradCheck::default();
        let inputs = [randn(&[2, 3, 4], 3)];
        for dims in [[1, 0, 2], [2, 0, 1], [0, 2, 1]] {
            gc.run(&inputs, &[0], |tape, v| permute(tape, &v[0], &dims))
                .unwrap();
        }
        gc.run(&inputs, &[0], |tape, v| transpose(tape, &v[0], 0, 2))
            .unwrap();

        let tape = Tape::recording();
        let x = tape.watch(randn(&[2, 3], 0));
        for dims in [&[0][..], &[0, 0], &[0, 2], &[1, 0, 2]] {
            assert!(
                matches!(permute(&tape, &x, dims), Err(Error::Shape { .. })),
                "{dims:?}"
            );
        }
        assert!(matches!(
            transpose(&tape, &x, 0, 2),
            Err(Error::Shape { .. })
        ));
    }

    #[test]
    fn concat_and_narrow_forward() {
        let tape = Tape::inference();
        let a = tape.constant(iota(&[2, 2]));
        let b = tape.constant(Tensor::f32(vec![10., 11., 12., 13., 14., 15.], &[2, 3]).unwrap());
        let y = concat(&tape, &[&a, &b], 1).unwrap();
        assert_eq!(y.shape(), &[2, 5]);
        assert_eq!(
            values(&y),
            vec![0., 1., 10., 11., 12., 2., 3., 13., 14., 15.]
        );
        let c = tape.constant(iota(&[1, 2]));
        let y = concat(&tape, &[&a, &c], 0).unwrap();
        assert_eq!(values(&y), vec![0., 1., 2., 3., 0., 1.]);

        let x = tape.constant(iota(&[2, 4, 2]));
        let y = narrow(&tape, &x, 1, 1, 2).unwrap();
        assert_eq!(y.shape(), &[2, 2, 2]);
        assert_eq!(values(&y), vec![2., 3., 4., 5., 10., 11., 12., 13.]);
        let empty = narrow(&tape, &x, 1, 4, 0).unwrap();
        assert_eq!(empty.shape(), &[2, 0, 2]);
        // A zero-length slice still has a (zero) gradient of the input's shape.
        let tape = Tape::recording();
        let xw = tape.watch(iota(&[2, 4, 2]));
        let e = narrow(&tape, &xw, 1, 2, 0).unwrap();
        let g = tape
            .backward_with(&e, Tensor::f32(vec![], &[2, 0, 2]).unwrap())
            .unwrap();
        assert_eq!(g.get(&xw).unwrap().to_vec_f32().unwrap(), vec![0.0; 16]);
        let tape = Tape::inference();

        // narrow undoes concat, on tensors large enough for the parallel paths.
        let (p, q) = (randn(&[8, 100, 64], 4), randn(&[8, 60, 64], 5));
        let (vp, vq) = (tape.constant(p.clone()), tape.constant(q.clone()));
        let y = concat(&tape, &[&vp, &vq], 1).unwrap();
        assert_eq!(
            values(&narrow(&tape, &y, 1, 0, 100).unwrap()),
            p.to_vec_f32().unwrap()
        );
        assert_eq!(
            values(&narrow(&tape, &y, 1, 100, 60).unwrap()),
            q.to_vec_f32().unwrap()
        );
    }

    #[test]
    fn concat_and_narrow_gradients() {
        let gc = GradCheck::default();
        let inputs = [
            randn(&[2, 3, 4], 6),
            randn(&[2, 1, 4], 7),
            randn(&[2, 2, 4], 8),
        ];
        gc.run(&inputs, &[0, 1, 2], |tape, v| {
            concat(tape, &[&v[0], &v[1], &v[2]], 1)
        })
        .unwrap();
        let inputs = [randn(&[3, 4], 9), randn(&[3, 4], 10)];
        gc.run(&inputs, &[0, 1], |tape, v| concat(tape, &[&v[0], &v[1]], 0))
            .unwrap();
        gc.run(&inputs, &[0, 1], |tape, v| concat(tape, &[&v[0], &v[1]], 1))
            .unwrap();
        let inputs = [randn(&[3, 5, 4], 11)];
        for axis in 0..3 {
            gc.run(&inputs, &[0], |tape, v| narrow(tape, &v[0], axis, 1, 2))
                .unwrap_or_else(|e| panic!("axis {axis}: {e}"));
        }
        // The same input twice: gradients of both slices accumulate.
        let tape = Tape::recording();
        let x = tape.watch(iota(&[2]));
        let y = concat(&tape, &[&x, &x], 0).unwrap();
        let g = tape
            .backward_with(&y, Tensor::f32(vec![1., 2., 3., 4.], &[4]).unwrap())
            .unwrap();
        assert_eq!(g.get(&x).unwrap().to_vec_f32().unwrap(), vec![4., 6.]);
    }

    #[test]
    fn concat_and_narrow_errors() {
        let tape = Tape::recording();
        let a = tape.watch(randn(&[2, 3], 0));
        let b = tape.watch(randn(&[3, 3], 1));
        let msg = concat(&tape, &[&a, &b], 1).unwrap_err().to_string();
        assert!(msg.contains("[2, 3]") && msg.contains("[3, 3]"), "{msg}");
        assert!(concat(&tape, &[&a, &b], 0).is_ok());
        assert!(matches!(
            concat(&tape, &[&a, &b], 2),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(concat(&tape, &[], 0), Err(Error::Invalid { .. })));
        let c = tape.watch(randn(&[2, 3, 1], 2));
        assert!(matches!(
            concat(&tape, &[&a, &c], 1),
            Err(Error::Shape { .. })
        ));

        assert!(matches!(
            narrow(&tape, &a, 1, 2, 2),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            narrow(&tape, &a, 2, 0, 1),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            narrow(&tape, &a, 0, usize::MAX, 2),
            Err(Error::Shape { .. })
        ));
    }
}
