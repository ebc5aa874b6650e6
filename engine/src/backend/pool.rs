//! The pooling family at the backend level, over NCHW images: max pooling
//! ([`max_pool2d_fwd`], [`max_pool2d_bwd`]) and global average pooling
//! ([`global_avg_pool2d_fwd`], [`global_avg_pool2d_bwd`], `[N, C, H, W] -> [N, C]`), dispatched
//! by device, with the CPU arm below them and the CUDA arm in `crate::cuda::pool` (kernels
//! `pool.cu`).
//!
//! Max pooling follows PyTorch: padding counts as -inf (never selected), the gradient goes to
//! the position of the maximum, the first one in row-major window order on ties, and a NaN in
//! a window wins (propagates). The forward records the arg-max of every output (its index in
//! the input plane, an i32 tensor), so the backward is a scatter and needs neither the input
//! nor a second search.
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm computes in the
//! forward input's dtype (`dtype` of the backward functions) and keeps it.

use rayon::prelude::*;

use super::Pool2dGeometry;
use crate::{DType, Device, Error, Result, Tensor};

/// Max pooling of `x` (`[N, C, H, W]`, float) with the geometry `g` made for its shape:
/// `(y [N, C, OH, OW], argmax)`, on `x`'s device.
pub fn max_pool2d_fwd(x: &Tensor, g: &Pool2dGeometry) -> Result<(Tensor, Tensor)> {
    const OP: &str = "max_pool2d";
    x.expect_float(OP)?;
    if x.shape() != [g.n, g.c, g.h, g.w] {
        return Err(Error::shape(
            OP,
            format!(
                "input {:?} is not the [N, C, H, W] = {:?} its geometry was made for",
                x.shape(),
                [g.n, g.c, g.h, g.w]
            ),
        ));
    }
    // Arg-max indices are i32.
    if g.h * g.w > i32::MAX as usize {
        return Err(Error::invalid(
            OP,
            format!(
                "input {:?}: planes above 2^31 elements are not supported",
                x.shape()
            ),
        ));
    }
    let out_shape = [g.n, g.c, g.oh, g.ow];
    match x.device() {
        Device::Cpu => {
            let len = g.n * g.c * g.oh * g.ow;
            let mut out = vec![0f32; len];
            let mut argmax = vec![0u32; len];
            max_pool2d_forward_cpu(&x.read_f32()?, g, &mut out, &mut argmax);
            let argmax: Vec<i32> = argmax.into_iter().map(|a| a as i32).collect();
            Ok((
                Tensor::f32(out, &out_shape)?,
                Tensor::from_vec(argmax, &out_shape, Device::Cpu)?,
            ))
        }
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::pool::max_pool2d_fwd(x, g)),
    }
}

/// The gradient of [`max_pool2d_fwd`] with respect to its input, from the output gradient `dy`
/// and the forward's `argmax` (same device); `dtype` is the forward input's, which the CUDA arm
/// computes in (the CPU arm computes in f32).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn max_pool2d_bwd(
    dy: &Tensor,
    argmax: &Tensor,
    g: &Pool2dGeometry,
    dtype: DType,
) -> Result<Tensor> {
    const OP: &str = "max_pool2d";
    let out_shape = [g.n, g.c, g.oh, g.ow];
    for (what, t) in [("output gradient", dy), ("arg-max", argmax)] {
        if t.shape() != out_shape {
            return Err(Error::shape(
                OP,
                format!(
                    "the {what} {:?} differs from the output {out_shape:?}",
                    t.shape()
                ),
            ));
        }
    }
    argmax.expect_dtype("max_pool2d (arg-max)", DType::I32)?;
    match crate::cuda::common_device(OP, &[dy, argmax])? {
        Device::Cpu => {
            let argmax: Vec<u32> = argmax.read_i32()?.iter().map(|&a| a as u32).collect();
            let dx = max_pool2d_backward_cpu(&dy.read_f32()?, &argmax, g);
            Tensor::f32(dx, &[g.n, g.c, g.h, g.w])
        }
        d => crate::on_cuda!(d, crate::cuda::pool::max_pool2d_bwd(dy, argmax, g, dtype)),
    }
}

/// The mean of each image plane of `x` (`[N, C, H, W]`, float): `[N, C]`, on `x`'s device.
pub fn global_avg_pool2d_fwd(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "global_avg_pool2d";
    x.expect_float(OP)?;
    x.expect_rank(OP, "input [N, C, H, W]", 4)?;
    match x.device() {
        Device::Cpu => {
            let s = x.shape();
            let out = global_avg_pool2d_forward_cpu(&x.read_f32()?, s[0] * s[1], s[2] * s[3]);
            Tensor::f32(out, &[s[0], s[1]])
        }
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::pool::global_avg_pool2d_fwd(x)),
    }
}

/// The gradient of [`global_avg_pool2d_fwd`] with respect to its input (`in_shape`, of dtype
/// `dtype`, which the CUDA arm computes in), from the output gradient `dy` (`[N, C]`).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn global_avg_pool2d_bwd(dy: &Tensor, in_shape: &[usize], dtype: DType) -> Result<Tensor> {
    const OP: &str = "global_avg_pool2d";
    if in_shape.len() != 4 || dy.shape() != [in_shape[0], in_shape[1]] {
        return Err(Error::shape(
            OP,
            format!(
                "the output gradient {:?} is not the [N, C] of the input {in_shape:?}",
                dy.shape()
            ),
        ));
    }
    let (planes, plane) = (in_shape[0] * in_shape[1], in_shape[2] * in_shape[3]);
    match dy.device() {
        Device::Cpu => {
            let dx = global_avg_pool2d_backward_cpu(&dy.read_f32()?, planes, plane);
            Tensor::f32(dx, in_shape)
        }
        d @ Device::Cuda(_) => crate::on_cuda!(
            d,
            crate::cuda::pool::global_avg_pool2d_bwd(dy, in_shape, dtype)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: kernels over slices
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
