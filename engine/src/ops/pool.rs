//! Pooling over NCHW images on the tape: `max_pool2d` (ResNet's stem) and `global_avg_pool2d`
//! (ResNet's head, `[N, C, H, W] -> [N, C]`), each with one forward and one backward for every
//! device. The work is done by the backend-level functions of `crate::backend::pool` (CPU arm
//! and CUDA arm beneath them), which also hold the kernels and the numerics.

pub use crate::backend::Pool2dGeometry;

use crate::backend::pool::{
    global_avg_pool2d_bwd, global_avg_pool2d_fwd, max_pool2d_bwd, max_pool2d_fwd,
};
use crate::{Result, Tape, Var};

/// Max pooling with a square `kernel`, `stride` and implicit -inf `padding` (at most
/// `kernel / 2`, as PyTorch requires): `[N, C, H, W] -> [N, C, OH, OW]`,
/// `OH = (H + 2 padding - kernel) / stride + 1`.
pub fn max_pool2d(
    tape: &Tape,
    x: &Var,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Var> {
    x.tensor().expect_float("max_pool2d")?;
    let g = Pool2dGeometry::new(x.shape(), kernel, stride, padding)?;
    let (y, argmax) = max_pool2d_fwd(x.tensor(), &g)?;
    let dtype = x.tensor().dtype();
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |dy, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            Ok(vec![Some(max_pool2d_bwd(dy, &argmax, &g, dtype)?)])
        }),
    ))
}

/// Mean over each image plane: `[N, C, H, W] -> [N, C]`.
pub fn global_avg_pool2d(tape: &Tape, x: &Var) -> Result<Var> {
    let y = global_avg_pool2d_fwd(x.tensor())?;
    let (in_shape, dtype) = (x.shape().to_vec(), x.tensor().dtype());
    Ok(tape.record(
        y,
        &[x],
        Box::new(move |dy, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            Ok(vec![Some(global_avg_pool2d_bwd(dy, &in_shape, dtype)?)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::{rng, DType, Device, Tensor};

    /// Distinct values 0.1 apart in a shuffled order: no two elements of a window are within
    /// a finite-difference step of each other, so the arg-max is stable under the check.
    fn distinct(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut idx: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            idx.swap(i, (rng::bits_at(seed, i as u64) % (i as u64 + 1)) as usize);
        }
        let v = idx
            .iter()
            .map(|&i| (i as f32 - n as f32 / 2.0) * 0.1)
            .collect();
        Tensor::f32(v, shape).unwrap()
    }

    /// Naive max pooling straight from the definition (padding = -inf).
    fn naive_max(x: &[f32], g: &Pool2dGeometry) -> Vec<f32> {
        let mut out = Vec::new();
        for pl in 0..g.n * g.c {
            for oh in 0..g.oh {
                for ow in 0..g.ow {
                    let mut m = f32::NEG_INFINITY;
                    for i in 0..g.kernel {
                        for j in 0..g.kernel {
                            let ih = (oh * g.stride + i) as isize - g.padding as isize;
                            let iw = (ow * g.stride + j) as isize - g.padding as isize;
                            if ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w {
                                m = m.max(x[pl * g.h * g.w + ih as usize * g.w + iw as usize]);
                            }
                        }
                    }
                    out.push(m);
                }
            }
        }
        out
    }

    const CASES: &[([usize; 4], usize, usize, usize)] = &[
        ([2, 3, 8, 8], 2, 2, 0),
        ([2, 3, 9, 9], 3, 2, 1), // ResNet stem: 3x3, stride 2, padding 1
        ([1, 2, 7, 5], 3, 1, 1),
        ([1, 2, 6, 7], 3, 3, 0),
    ];

    #[test]
    fn max_pool_matches_naive() {
        for (k, &(xs, kernel, stride, padding)) in CASES.iter().enumerate() {
            let x = Tensor::randn(&xs, 0.0, 1.0, k as u64, DType::F32, Device::Cpu).unwrap();
            let g = Pool2dGeometry::new(&xs, kernel, stride, padding).unwrap();
            let tape = Tape::inference();
            let y = max_pool2d(&tape, &tape.constant(x.clone()), kernel, stride, padding).unwrap();
            assert_eq!(y.shape(), &[g.n, g.c, g.oh, g.ow]);
            assert_eq!(
                y.tensor().to_vec_f32().unwrap(),
                naive_max(&x.to_vec_f32().unwrap(), &g)
            );
        }
        let g = Pool2dGeometry::new(&[1, 64, 112, 112], 3, 2, 1).unwrap();
        assert_eq!((g.oh, g.ow), (56, 56));
    }

    #[test]
    fn max_pool_padding_is_minus_infinity_and_ties_go_to_the_first() {
        // All-negative input: a zero padding would win, -inf padding does not.
        let x = Tensor::f32(vec![-1.0, -2.0, -3.0, -4.0], &[1, 1, 2, 2]).unwrap();
        let tape = Tape::recording();
        let xv = tape.watch(x);
        let y = max_pool2d(&tape, &xv, 2, 1, 1).unwrap();
        assert_eq!(y.shape(), &[1, 1, 3, 3]);
        assert_eq!(
            y.tensor().to_vec_f32().unwrap(),
            vec![-1.0, -1.0, -2.0, -1.0, -1.0, -2.0, -3.0, -3.0, -4.0]
        );
        let g = tape
            .backward_with(
                &y,
                Tensor::ones(&[1, 1, 3, 3], DType::F32, Device::Cpu).unwrap(),
            )
            .unwrap();
        assert_eq!(
            g.get(&xv).unwrap().to_vec_f32().unwrap(),
            vec![4.0, 2.0, 2.0, 1.0]
        );

        // A tie: the gradient goes to the first maximum in row-major order only.
        let tape = Tape::recording();
        let xv = tape.watch(Tensor::f32(vec![1.0, 5.0, 5.0, 5.0], &[1, 1, 2, 2]).unwrap());
        let y = max_pool2d(&tape, &xv, 2, 2, 0).unwrap();
        let g = tape
            .backward_with(&y, Tensor::f32(vec![3.0], &[1, 1, 1, 1]).unwrap())
            .unwrap();
        assert_eq!(
            g.get(&xv).unwrap().to_vec_f32().unwrap(),
            vec![0.0, 3.0, 0.0, 0.0]
        );
    }

    #[test]
    fn max_pool_gradient_check() {
        for (k, &(xs, kernel, stride, padding)) in CASES.iter().enumerate() {
            let x = distinct(&xs, 10 + k as u64);
            GradCheck::default()
                .run(&[x], &[0], |tape, v| {
                    max_pool2d(tape, &v[0], kernel, stride, padding)
                })
                .unwrap_or_else(|e| panic!("case {k}: {e}"));
        }
    }

    #[test]
    fn max_pool_rejects_bad_arguments() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::zeros(&[1, 2, 4, 4], DType::F32, Device::Cpu).unwrap());
        let err = max_pool2d(&tape, &x, 2, 0, 0).unwrap_err().to_string();
        assert!(
            err.contains("max_pool2d") && err.contains("stride"),
            "{err}"
        );
        assert!(max_pool2d(&tape, &x, 0, 1, 0).is_err());
        assert!(max_pool2d(&tape, &x, 3, 1, 2).is_err()); // padding above kernel / 2
        assert!(max_pool2d(&tape, &x, 5, 1, 0).is_err()); // kernel larger than the image
        let flat = tape.constant(Tensor::zeros(&[2, 4, 4], DType::F32, Device::Cpu).unwrap());
        let err = max_pool2d(&tape, &flat, 2, 2, 0).unwrap_err().to_string();
        assert!(err.contains("[2, 4, 4]"), "{err}");
    }

    #[test]
    fn global_avg_pool_forward_and_gradient() {
        let x = Tensor::randn(&[2, 3, 4, 5], 0.0, 1.0, 7, DType::F32, Device::Cpu).unwrap();
        let tape = Tape::inference();
        let y = global_avg_pool2d(&tape, &tape.constant(x.clone())).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        let xv = x.to_vec_f32().unwrap();
        let want: Vec<f32> = xv
            .chunks(20)
            .map(|p| p.iter().map(|&v| v as f64).sum::<f64>() as f32 / 20.0)
            .collect();
        for (a, b) in y.tensor().to_vec_f32().unwrap().iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        GradCheck::default()
            .run(&[x], &[0], |tape, v| global_avg_pool2d(tape, &v[0]))
            .unwrap();
    }

    #[test]
    fn global_avg_pool_rejects_bad_rank() {
        let tape = Tape::inference();
        let x = tape.constant(Tensor::zeros(&[2, 3, 4], DType::F32, Device::Cpu).unwrap());
        let err = global_avg_pool2d(&tape, &x).unwrap_err().to_string();
        assert!(
            err.contains("global_avg_pool2d") && err.contains("[2, 3, 4]"),
            "{err}"
        );
    }
}
