//! Layout changes and reductions at the backend level, dispatched by device, with the CPU arm
//! below them and the CUDA arm in `crate::cuda::layout` (kernels `layout.cu`): the copies
//! [`permute_fwd`], [`narrow_fwd`] / [`narrow_bwd`] and [`concat_fwd`], and the sums
//! [`sum_fwd`] (a whole tensor, or its mean) / [`fill_bwd`] and [`sum_axis_fwd`] /
//! [`sum_axis_bwd`].
//!
//! Tensors are always contiguous row-major, so a new order of dimensions (attention heads
//! `[B, S, H, D] -> [B, H, S, D]`), a concatenation or a slice along an inner dimension is
//! materialised by a copy. A whole-tensor sum is accumulated in f64 and returned as an f32
//! scalar whatever the input's dtype (a loss).
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm keeps the dtype it
//! computes in (the input's; `concat` casts every part to the first one's).

use rayon::prelude::*;

use super::elementwise::{contiguous_strides, PARALLEL_MIN};
use crate::{DType, Device, Error, Result, Tensor};

/// Block size of the f64 partial sums in `sum_cpu`. Fixed (not derived from the number of
/// threads) so that the result is bit-identical on every machine.
const SUM_BLOCK: usize = 1 << 14;

/// `x` with its dimensions reordered (`dims` a permutation of them, checked by the caller):
/// output dimension `i` is input dimension `dims[i]`.
pub fn permute_fwd(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    x.expect_float("permute")?;
    let out_shape: Vec<usize> = dims.iter().map(|&d| x.shape()[d]).collect();
    match x.device() {
        Device::Cpu => Tensor::f32(
            permute_forward_cpu(&x.read_f32()?, x.shape(), dims),
            &out_shape,
        ),
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::layout::permute(x, dims.to_vec(), out_shape))
        }
    }
}

/// Elements `[start, start + len)` along `axis` of `x` (checked by the caller), a copy.
pub fn narrow_fwd(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    x.expect_float("narrow")?;
    let shape = x.shape();
    let mut out_shape = shape.to_vec();
    out_shape[axis] = len;
    match x.device() {
        Device::Cpu => {
            let (n, inner) = (shape[axis], shape[axis + 1..].iter().product());
            let out = narrow_forward_cpu(&x.read_f32()?, n, inner, start, len);
            Tensor::f32(out, &out_shape)
        }
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::layout::narrow(x, axis, start, len)),
    }
}

/// The gradient of [`narrow_fwd`]: `g` placed back at `start` along `axis` in zeros of
/// `in_shape` (on a GPU in `g`'s dtype).
pub fn narrow_bwd(g: &Tensor, in_shape: &[usize], axis: usize, start: usize) -> Result<Tensor> {
    let len = g.shape().get(axis).copied().unwrap_or(0);
    let mut want = in_shape.to_vec();
    if let Some(w) = want.get_mut(axis) {
        *w = len;
    }
    if g.shape() != want.as_slice() {
        return Err(Error::shape(
            "narrow",
            format!(
                "the output gradient {:?} is not a slice along axis {axis} of {in_shape:?}",
                g.shape()
            ),
        ));
    }
    match g.device() {
        Device::Cpu => {
            let outer: usize = in_shape[..axis].iter().product();
            let (n, inner) = (in_shape[axis], in_shape[axis + 1..].iter().product());
            let dx = narrow_backward_cpu(&g.read_f32()?, outer, n, inner, start, len);
            Tensor::f32(dx, in_shape)
        }
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::layout::narrow_bwd(g, in_shape, axis, start))
        }
    }
}

/// `xs` concatenated along `axis` (same rank and sizes outside `axis`, checked by the caller).
pub fn concat_fwd(xs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let first = xs
        .first()
        .ok_or_else(|| Error::invalid("concat", "no tensors to concatenate"))?;
    let sizes: Vec<usize> = xs.iter().map(|x| x.shape()[axis]).collect();
    let mut out_shape = first.shape().to_vec();
    out_shape[axis] = sizes.iter().sum();
    match crate::cuda::common_device("concat", xs)? {
        Device::Cpu => {
            let inner: usize = first.shape()[axis + 1..].iter().product();
            let out = {
                let guards = xs
                    .iter()
                    .map(|x| x.read_f32())
                    .collect::<Result<Vec<_>>>()?;
                let parts: Vec<&[f32]> = guards.iter().map(|g| &**g).collect();
                concat_forward_cpu(&parts, &sizes, inner)
            };
            Tensor::f32(out, &out_shape)
        }
        d => crate::on_cuda!(d, crate::cuda::layout::concat(xs, axis, out_shape)),
    }
}

/// The sum of every element of `x` (`mean`: divided by their count, non-zero), accumulated in
/// f64: an f32 scalar (shape `[]`) on `x`'s device.
pub fn sum_fwd(x: &Tensor, mean: bool) -> Result<Tensor> {
    x.expect_float(if mean { "mean" } else { "sum" })?;
    match x.device() {
        Device::Cpu => {
            let s = sum_cpu(&x.read_f32()?);
            let v = if mean {
                (s / x.elem_count() as f64) as f32
            } else {
                s as f32
            };
            Tensor::f32(vec![v], &[])
        }
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::layout::sum_all(x, mean)),
    }
}

/// The gradient of [`sum_fwd`]: the scalar `g` times `factor` (in f32) spread over every
/// element of a tensor of `shape` (on a GPU in `dtype`, the forward input's).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn fill_bwd(g: &Tensor, shape: &[usize], factor: f32, dtype: DType) -> Result<Tensor> {
    match g.device() {
        Device::Cpu => {
            let v = g.to_scalar_f32()? * factor;
            Tensor::f32(vec![v; shape.iter().product()], shape)
        }
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::layout::fill(g, shape, factor, dtype))
        }
    }
}

/// `x` summed over dimension `axis` (checked by the caller); with `keep_dim` the dimension
/// stays, with size 1.
pub fn sum_axis_fwd(x: &Tensor, axis: usize, keep_dim: bool) -> Result<Tensor> {
    x.expect_float("sum_axis")?;
    let shape = x.shape();
    let n = shape[axis];
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    if keep_dim {
        out_shape[axis] = 1;
    } else {
        out_shape.remove(axis);
    }
    match x.device() {
        Device::Cpu => Tensor::f32(
            sum_axis_forward_cpu(&x.read_f32()?, outer, n, inner),
            &out_shape,
        ),
        d @ Device::Cuda(_) => crate::on_cuda!(
            d,
            crate::cuda::layout::sum_axis(x, (outer, n, inner), out_shape)
        ),
    }
}

/// The gradient of [`sum_axis_fwd`]: `g` copied to each position of dimension `axis` of
/// `in_shape` (on a GPU in `g`'s dtype).
pub fn sum_axis_bwd(g: &Tensor, in_shape: &[usize], axis: usize) -> Result<Tensor> {
    let n = in_shape[axis];
    let outer: usize = in_shape[..axis].iter().product();
    let inner: usize = in_shape[axis + 1..].iter().product();
    if g.elem_count() != outer * inner {
        return Err(Error::shape(
            "sum_axis",
            format!(
                "the output gradient {:?} is not {in_shape:?} summed over axis {axis}",
                g.shape()
            ),
        ));
    }
    match g.device() {
        Device::Cpu => Tensor::f32(sum_axis_backward_cpu(&g.read_f32()?, n, inner), in_shape),
        d @ Device::Cuda(_) => crate::on_cuda!(
            d,
            crate::cuda::layout::sum_axis_bwd(g, (outer, n, inner), in_shape)
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: copies
// ---------------------------------------------------------------------------------------------

/// Smallest piece of a copy handed to one rayon task, in elements.
const PAR_GRAIN: usize = 1 << 12;

/// `x` (shape `shape`) with its dimensions reordered: output dimension `i` is input dimension
/// `dims[i]`. `dims` must be a permutation of `0..shape.len()`.
pub fn permute_forward_cpu(x: &[f32], shape: &[usize], dims: &[usize]) -> Vec<f32> {
    let rank = shape.len();
    let out_shape: Vec<usize> = dims.iter().map(|&d| shape[d]).collect();
    let in_strides = contiguous_strides(shape);
    // Step in the input when output coordinate i grows by one.
    let steps: Vec<usize> = dims.iter().map(|&d| in_strides[d]).collect();
    let mut out = vec![0f32; x.len()];
    if out.is_empty() {
        return out;
    }
    let inner = if rank == 0 { 1 } else { out_shape[rank - 1] };
    let inner_step = if rank == 0 { 0 } else { steps[rank - 1] };
    // One output row (a run along the last output dimension) at a time: its start in the input
    // from the row's coordinates, then a strided walk (contiguous when the last dimension stays
    // last, as in the attention head split).
    let fill_row = |(row, dst): (usize, &mut [f32])| {
        let mut rest = row;
        let mut src = 0;
        for d in (0..rank.saturating_sub(1)).rev() {
            src += (rest % out_shape[d]) * steps[d];
            rest /= out_shape[d];
        }
        if inner_step == 1 {
            dst.copy_from_slice(&x[src..src + inner]);
        } else {
            for (j, v) in dst.iter_mut().enumerate() {
                *v = x[src + j * inner_step];
            }
        }
    };
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(inner)
            .with_min_len((PAR_GRAIN / inner).max(1))
            .enumerate()
            .for_each(fill_row);
    } else {
        out.chunks_mut(inner).enumerate().for_each(fill_row);
    }
    out
}

/// The permutation that undoes `dims`.
pub fn inverse_permutation(dims: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; dims.len()];
    for (i, &d) in dims.iter().enumerate() {
        inv[d] = i;
    }
    inv
}

/// Backward of `permute_forward_cpu`: `g` has the permuted shape `out_shape`; the result has the
/// input's shape.
pub fn permute_backward_cpu(g: &[f32], out_shape: &[usize], dims: &[usize]) -> Vec<f32> {
    permute_forward_cpu(g, out_shape, &inverse_permutation(dims))
}

/// `x` viewed as `[outer, n, inner]`: elements `[start, start + len)` of the middle dimension,
/// shape `[outer, len, inner]`.
pub fn narrow_forward_cpu(x: &[f32], n: usize, inner: usize, start: usize, len: usize) -> Vec<f32> {
    let (block, piece) = (n * inner, len * inner);
    if block == 0 || piece == 0 {
        return Vec::new();
    }
    let mut out = vec![0f32; x.len() / block * piece];
    let copy = |(o, dst): (usize, &mut [f32])| {
        dst.copy_from_slice(&x[o * block + start * inner..][..piece]);
    };
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(piece).enumerate().for_each(copy);
    } else {
        out.chunks_mut(piece).enumerate().for_each(copy);
    }
    out
}

/// Backward of `narrow_forward_cpu`: `g` (`[outer, len, inner]`) placed back at `start` in a
/// zero tensor `[outer, n, inner]`.
pub fn narrow_backward_cpu(
    g: &[f32],
    outer: usize,
    n: usize,
    inner: usize,
    start: usize,
    len: usize,
) -> Vec<f32> {
    let (block, piece) = (n * inner, len * inner);
    let mut dx = vec![0f32; outer * block];
    if piece == 0 {
        return dx;
    }
    let place = |(o, dst): (usize, &mut [f32])| {
        dst[start * inner..][..piece].copy_from_slice(&g[o * piece..][..piece]);
    };
    if dx.len() >= PARALLEL_MIN {
        dx.par_chunks_mut(block).enumerate().for_each(place);
    } else {
        dx.chunks_mut(block).enumerate().for_each(place);
    }
    dx
}

/// Concatenation of `parts`, each viewed as `[outer, sizes[k], inner]`, along the middle
/// dimension: `[outer, sum(sizes), inner]`.
pub fn concat_forward_cpu(parts: &[&[f32]], sizes: &[usize], inner: usize) -> Vec<f32> {
    let total: usize = sizes.iter().sum();
    let block = total * inner;
    let outer = match parts.iter().zip(sizes).find(|(_, &s)| s * inner > 0) {
        Some((p, &s)) => p.len() / (s * inner),
        None => return Vec::new(),
    };
    let mut out = vec![0f32; outer * block];
    let fill = |(o, dst): (usize, &mut [f32])| {
        let mut at = 0;
        for (p, &s) in parts.iter().zip(sizes) {
            let piece = s * inner;
            dst[at..at + piece].copy_from_slice(&p[o * piece..][..piece]);
            at += piece;
        }
    };
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(block).enumerate().for_each(fill);
    } else {
        out.chunks_mut(block).enumerate().for_each(fill);
    }
    out
}

/// Backward of `concat_forward_cpu`: the slice of `g` that came from part `k`.
pub fn concat_backward_cpu(g: &[f32], sizes: &[usize], inner: usize, k: usize) -> Vec<f32> {
    let total: usize = sizes.iter().sum();
    let start: usize = sizes[..k].iter().sum();
    narrow_forward_cpu(g, total, inner, start, sizes[k])
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: sums
// ---------------------------------------------------------------------------------------------

/// Sum of all elements, accumulated in f64 over fixed blocks (accurate, and the same result on
/// any number of threads).
pub fn sum_cpu(x: &[f32]) -> f64 {
    let block = |b: &[f32]| b.iter().map(|&v| v as f64).sum::<f64>();
    if x.len() >= PARALLEL_MIN {
        let partials: Vec<f64> = x.par_chunks(SUM_BLOCK).map(block).collect();
        partials.iter().sum()
    } else {
        x.chunks(SUM_BLOCK).map(block).sum()
    }
}

/// `x` viewed as `[outer, n, inner]`, summed over the middle dimension: `[outer, inner]`
/// (zeros when `n` is 0).
pub fn sum_axis_forward_cpu(x: &[f32], outer: usize, n: usize, inner: usize) -> Vec<f32> {
    let mut out = vec![0f32; outer * inner];
    if out.is_empty() {
        return out;
    }
    // Add whole rows of `inner` values, so the inner loop is contiguous and vectorises.
    let reduce = |(o, dst): (usize, &mut [f32])| {
        for row in x[o * n * inner..(o + 1) * n * inner].chunks(inner) {
            dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
        }
    };
    if x.len() >= PARALLEL_MIN && outer > 1 {
        out.par_chunks_mut(inner).enumerate().for_each(reduce);
    } else {
        out.chunks_mut(inner).enumerate().for_each(reduce);
    }
    out
}

/// Backward of `sum_axis_forward_cpu`: `g` (`[outer, inner]`) copied to each of the `n`
/// positions of the reduced dimension.
pub fn sum_axis_backward_cpu(g: &[f32], n: usize, inner: usize) -> Vec<f32> {
    let mut dx = vec![0f32; g.len() * n];
    if dx.is_empty() {
        return dx;
    }
    let spread = |(o, dst): (usize, &mut [f32])| {
        for row in dst.chunks_mut(inner) {
            row.copy_from_slice(&g[o * inner..(o + 1) * inner]);
        }
    };
    if dx.len() >= PARALLEL_MIN {
        dx.par_chunks_mut(n * inner).enumerate().for_each(spread);
    } else {
        dx.chunks_mut(n * inner).enumerate().for_each(spread);
    }
    dx
}
