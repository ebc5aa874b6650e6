//! Pooling over NCHW images: `max_pool2d` (ResNet's stem) and `global_avg_pool2d` (ResNet's
//! head, `[N, C, H, W] -> [N, C]`).
//!
//! `max_pool2d` follows PyTorch: padding counts as -inf (never selected), the gradient goes to
//! the position of the maximum, the first one in row-major window order on ties, and a NaN in
//! a window wins (propagates). The forward pass records the arg-max of every output, so the
//! backward pass is a scatter and needs neither the input nor a second search.

use rayon::prelude::*;

use crate::{Error, Result, Tape, Tensor, Var};

/// Sizes of one max-pooling, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dGeometry {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub oh: usize,
    pub ow: usize,
}

impl Pool2dGeometry {
    pub fn new(x: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        if x.len() != 4 {
            return Err(Error::shape(
                "max_pool2d",
                format!("input {x:?} must be [N, C, H, W]"),
            ));
        }
        if kernel == 0 || stride == 0 {
            return Err(Error::invalid(
                "max_pool2d",
                format!("kernel ({kernel}) and stride ({stride}) must be at least 1"),
            ));
        }
        if 2 * padding > kernel {
            return Err(Error::invalid(
                "max_pool2d",
                format!("padding {padding} must be at most half the kernel size {kernel}"),
            ));
        }
        let (hp, wp) = (x[2] + 2 * padding, x[3] + 2 * padding);
        if hp < kernel || wp < kernel {
            return Err(Error::shape(
                "max_pool2d",
                format!("input {x:?} with padding {padding} is smaller than the kernel {kernel}"),
            ));
        }
        Ok(Pool2dGeometry {
            n: x[0],
            c: x[1],
            h: x[2],
            w: x[3],
            kernel,
            stride,
            padding,
            oh: (hp - kernel) / stride + 1,
            ow: (wp - kernel) / stride + 1,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// CPU kernels
// ---------------------------------------------------------------------------------------------

/// Range of input positions `[lo, hi)` covered by output position `o` along one axis.
fn window(o: usize, len: usize, g: &Pool2dGeometry) -> (usize, usize) {
    let start = (o * g.stride) as isize - g.padding as isize;
    let lo = start.max(0) as usize;
    let hi = ((start + g.kernel as isize) as usize).min(len);
    (lo, hi)
}

/// `out [N, C, OH, OW]` and, per output, the index of its maximum within its `H*W` plane.
pub fn max_pool2d_forward_cpu(x: &[f32], g: &Pool2dGeometry, out: &mut [f32], argmax: &mut [u32]) {
    let (plane, oplane) = (g.h * g.w, g.oh * g.ow);
    if oplane == 0 || plane == 0 {
        return;
    }
    let planes = g.n * g.c;
    out[..planes * oplane]
        .par_chunks_mut(oplane)
        .zip(argmax[..planes * oplane].par_chunks_mut(oplane))
        .enumerate()
        .for_each(|(pi, (out, arg))| {
            let xp = &x[pi * plane..][..plane];
            for oh in 0..g.oh {
                // With padding <= kernel / 2 every window holds at least one real element.
                let (h0, h1) = window(oh, g.h, g);
                for ow in 0..g.ow {
                    let (w0, w1) = window(ow, g.w, g);
                    let mut best = h0 * g.w + w0;
                    let mut max = xp[best];
                    for ih in h0..h1 {
                        for iw in w0..w1 {
                            let v = xp[ih * g.w + iw];
                            // Strictly greater keeps the first maximum; NaN wins, as in PyTorch.
                            if v > max || (v.is_nan() && !max.is_nan()) {
                                max = v;
                                best = ih * g.w + iw;
                            }
                        }
                    }
                    out[oh * g.ow + ow] = max;
                    arg[oh * g.ow + ow] = best as u32;
                }
            }
        });
}

/// `dx [N, C, H, W]`: each output gradient added at its arg-max (overlapping windows add up).
pub fn max_pool2d_backward_cpu(grad: &[f32], argmax: &[u32], g: &Pool2dGeometry) -> Vec<f32> {
    let (plane, oplane) = (g.h * g.w, g.oh * g.ow);
    let mut dx = vec![0f32; g.n * g.c * plane];
    if plane == 0 || oplane == 0 {
        return dx;
    }
    dx.par_chunks_mut(plane).enumerate().for_each(|(pi, dxp)| {
        let (gp, ap) = (
            &grad[pi * oplane..][..oplane],
            &argmax[pi * oplane..][..oplane],
        );
        for (gv, &a) in gp.iter().zip(ap) {
            dxp[a as usize] += gv;
        }
    });
    dx
}

/// `out[n, c] = mean of x[n, c, :, :]` over `planes = N*C` planes of `plane` elements.
pub fn global_avg_pool2d_forward_cpu(x: &[f32], planes: usize, plane: usize) -> Vec<f32> {
    if plane == 0 {
        return vec![f32::NAN; planes]; // mean of nothing, as PyTorch
    }
    x[..planes * plane]
        .par_chunks(plane)
        .map(|p| p.iter().sum::<f32>() / plane as f32)
        .collect()
}

/// `dx[n, c, h, w] = grad[n, c] / (H*W)`.
pub fn global_avg_pool2d_backward_cpu(grad: &[f32], planes: usize, plane: usize) -> Vec<f32> {
    let mut dx = vec![0f32; planes * plane];
    if plane > 0 {
        let scale = 1.0 / plane as f32;
        dx.par_chunks_mut(plane)
            .zip(grad[..planes].par_iter())
            .for_each(|(d, g)| d.fill(g * scale));
    }
    dx
}

// ---------------------------------------------------------------------------------------------
// Tape ops
// ---------------------------------------------------------------------------------------------

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
    if g.h * g.w > u32::MAX as usize {
        return Err(Error::invalid(
            "max_pool2d",
            format!(
                "input {:?}: planes above 2^32 elements are not supported",
                x.shape()
            ),
        ));
    }
    if let d @ crate::Device::Cuda(_) = x.tensor().device() {
        return crate::on_cuda!(d, crate::cuda::pool::max_pool2d(tape, x, g));
    }
    let len = g.n * g.c * g.oh * g.ow;
    let mut out = vec![0f32; len];
    let mut argmax = vec![0u32; len];
    max_pool2d_forward_cpu(&x.tensor().read_f32()?, &g, &mut out, &mut argmax);
    let out = Tensor::f32(out, &[g.n, g.c, g.oh, g.ow])?;
    let in_shape = x.shape().to_vec();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |grad, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let dx = max_pool2d_backward_cpu(&grad.read_f32()?, &argmax, &g);
            Ok(vec![Some(Tensor::f32(dx, &in_shape)?)])
        }),
    ))
}

/// Mean over each image plane: `[N, C, H, W] -> [N, C]`.
pub fn global_avg_pool2d(tape: &Tape, x: &Var) -> Result<Var> {
    x.tensor().expect_float("global_avg_pool2d")?;
    x.tensor()
        .expect_rank("global_avg_pool2d", "input [N, C, H, W]", 4)?;
    if let d @ crate::Device::Cuda(_) = x.tensor().device() {
        return crate::on_cuda!(d, crate::cuda::pool::global_avg_pool2d(tape, x));
    }
    let s = x.shape();
    let (planes, plane) = (s[0] * s[1], s[2] * s[3]);
    let out = global_avg_pool2d_forward_cpu(&x.tensor().read_f32()?, planes, plane);
    let out = Tensor::f32(out, &[s[0], s[1]])?;
    let in_shape = s.to_vec();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |grad, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let dx = global_avg_pool2d_backward_cpu(&grad.read_f32()?, planes, plane);
            Ok(vec![Some(Tensor::f32(dx, &in_shape)?)])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
    use crate::{rng, DType, Device};

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
