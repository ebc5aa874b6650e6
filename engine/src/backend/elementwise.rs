//! Elementwise arithmetic at the backend level: broadcasting [`binary_fwd`] (`add` / `sub` /
//! `mul`) and [`sum_to_shape`] (the backward of a broadcast), [`scale_fwd`] and
//! [`add_scalar_fwd`], and the dedicated bias of convolutions and linear layers
//! ([`bias_add_fwd`], [`bias_add_bwd`]), dispatched by device, with the CPU arm below them and
//! the CUDA arm in `crate::cuda::elementwise` and `crate::cuda::layout` (kernels
//! `elementwise.cu`, `bias_add.cu`, `layout.cu`).
//!
//! Binary ops follow NumPy's broadcasting rule: shapes are aligned on the right and each pair of
//! dimensions must be equal or one of them 1 (a missing leading dimension counts as 1). The
//! gradient of an input that was broadcast is summed over the dimensions it was stretched along
//! ([`sum_to_shape`]), so it comes back in the input's own shape. Residual additions (ResNet,
//! BERT) are same-shape `add`s, so that path runs on all threads without any index arithmetic.
//!
//! The helpers `map_cpu` / `zip_map_cpu` are the shared same-shape kernels: activations and
//! dropout use them too.
//!
//! Storage types: the CPU arm reads f32 or bf16 and writes f32; the CUDA arm computes in its
//! inputs' dtype (they must share it) and keeps it; a bias gradient is f32 on both.

use rayon::prelude::*;

use super::BinaryOp;
use crate::{DType, Device, Error, Result, Tensor};

/// Tensors with at least this many elements are processed on all rayon threads; below it,
/// splitting the work costs more than it saves.
pub const PARALLEL_MIN: usize = 1 << 16;

/// The smallest piece of work handed to one rayon task.
const PAR_GRAIN: usize = 1 << 12;

/// Rows per partial sum in the bias gradient of a last-axis `bias_add`; fixed for
/// determinism, like `SUM_BLOCK`.
const BIAS_ROWS_PER_BLOCK: usize = 256;

/// `t` in the dtype a backend computes a backward in: unchanged on the CPU (whose kernels read
/// any float dtype as f32), cast to `dtype` (the forward's) on a GPU, whose kernels read one
/// dtype.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn to_compute_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    match t.device() {
        Device::Cpu => Ok(t.clone()),
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::common::as_dtype(t, dtype)),
    }
}

/// `a (op) b` with NumPy broadcasting, on their device.
pub fn binary_fwd(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let name = op.name();
    a.expect_float(name)?;
    b.expect_float(name)?;
    let device = crate::cuda::common_device(name, &[a, b])?;
    let out_shape = broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
        Error::shape(
            name,
            format!("cannot broadcast {:?} with {:?}", a.shape(), b.shape()),
        )
    })?;
    match device {
        Device::Cpu => {
            let (av, bv) = (a.read_f32()?, b.read_f32()?);
            let out = binary_forward_cpu(op, &av, a.shape(), &bv, b.shape(), &out_shape);
            Tensor::f32(out, &out_shape)
        }
        d => crate::on_cuda!(
            d,
            crate::cuda::elementwise::binary_fwd(op, a, b, &out_shape)
        ),
    }
}

/// `g` summed down to `target`, a shape that broadcasts to `g`'s (missing leading dimensions
/// and dimensions of 1 are summed over): `g` itself when the shapes are equal.
pub fn sum_to_shape(g: &Tensor, target: &[usize]) -> Result<Tensor> {
    if g.shape() == target {
        return Ok(g.clone());
    }
    if broadcast_shape(target, g.shape()).as_deref() != Some(g.shape()) {
        return Err(Error::shape(
            "sum_to_shape",
            format!(
                "{target:?} does not broadcast to the gradient's {:?}",
                g.shape()
            ),
        ));
    }
    match g.device() {
        Device::Cpu => Tensor::f32(sum_to_shape_cpu(&g.read_f32()?, g.shape(), target), target),
        d @ Device::Cuda(_) => crate::on_cuda!(d, crate::cuda::layout::sum_to_shape(g, target)),
    }
}

/// `s * x`, on `x`'s device.
pub fn scale_fwd(x: &Tensor, s: f32) -> Result<Tensor> {
    x.expect_float("scale")?;
    match x.device() {
        Device::Cpu => Tensor::f32(map_cpu(&x.read_f32()?, |v| v * s), x.shape()),
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::elementwise::scalar_raw("scale", x, s))
        }
    }
}

/// `x + s`, on `x`'s device.
pub fn add_scalar_fwd(x: &Tensor, s: f32) -> Result<Tensor> {
    x.expect_float("add_scalar")?;
    match x.device() {
        Device::Cpu => Tensor::f32(map_cpu(&x.read_f32()?, |v| v + s), x.shape()),
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::elementwise::scalar_raw("add_scalar", x, s))
        }
    }
}

/// `x` viewed as `[outer, c, inner]` plus `bias[c]` (checked by the caller: `bias` is `[c]`),
/// on their device.
pub fn bias_add_fwd(x: &Tensor, bias: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    x.expect_float("bias_add")?;
    bias.expect_float("bias_add")?;
    match crate::cuda::common_device("bias_add", &[x, bias])? {
        Device::Cpu => {
            let out = {
                let (xv, bv) = (x.read_f32()?, bias.read_f32()?);
                bias_add_forward_cpu(&xv, &bv, c, inner)
            };
            Tensor::f32(out, x.shape())
        }
        d => crate::on_cuda!(d, crate::cuda::elementwise::bias_add_fwd(x, bias, c, inner)),
    }
}

/// The bias gradient of [`bias_add_fwd`]: `g` viewed as `[outer, c, inner]` summed over
/// `outer` and `inner`, f32 `[c]`, deterministic.
pub fn bias_add_bwd(g: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    match g.device() {
        Device::Cpu => Tensor::f32(bias_add_backward_cpu(&g.read_f32()?, c, inner), &[c]),
        d @ Device::Cuda(_) => {
            crate::on_cuda!(d, crate::cuda::elementwise::bias_add_bwd(g, c, inner))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: shared same-shape kernels
// ---------------------------------------------------------------------------------------------

/// `f` applied to every element, in parallel on large inputs.
pub fn map_cpu(x: &[f32], f: impl Fn(f32) -> f32 + Sync + Send) -> Vec<f32> {
    if x.len() >= PARALLEL_MIN {
        x.par_iter()
            .with_min_len(PAR_GRAIN)
            .map(|&v| f(v))
            .collect()
    } else {
        x.iter().map(|&v| f(v)).collect()
    }
}

/// `f` applied to every pair of elements of two equally long slices, in parallel on large inputs.
pub fn zip_map_cpu(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32 + Sync + Send) -> Vec<f32> {
    assert_eq!(
        a.len(),
        b.len(),
        "zip_map_cpu on slices of different lengths"
    );
    if a.len() >= PARALLEL_MIN {
        a.par_iter()
            .with_min_len(PAR_GRAIN)
            .zip(b.par_iter())
            .map(|(&x, &y)| f(x, y))
            .collect()
    } else {
        a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Broadcasting
// ---------------------------------------------------------------------------------------------

/// The shape both `a` and `b` broadcast to, or `None` when they are incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        // Dimension i counted from the right; a missing dimension is 1.
        let da = if i < a.len() { a[a.len() - 1 - i] } else { 1 };
        let db = if i < b.len() { b[b.len() - 1 - i] } else { 1 };
        out[rank - 1 - i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return None;
        };
    }
    Some(out)
}

/// Row-major strides of a contiguous tensor of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1];
    }
    strides
}

/// For each dimension of `out`, the step in a contiguous tensor of `shape` (which broadcasts
/// to `out`) when that output coordinate grows by one: its own stride, or 0 along dimensions
/// it is stretched over.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = contiguous_strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|d| {
            if d < lead || (shape[d - lead] == 1 && out[d] != 1) {
                0
            } else {
                own[d - lead]
            }
        })
        .collect()
}

/// Offsets into the inputs of the first element of output row `row` (a row is a run along the
/// last output dimension); `strides[k]` are the broadcast strides of input k.
fn row_offsets<const K: usize>(row: usize, out: &[usize], strides: [&[usize]; K]) -> [usize; K] {
    let mut offsets = [0; K];
    let mut rest = row;
    for d in (0..out.len().saturating_sub(1)).rev() {
        let coord = rest % out[d];
        rest /= out[d];
        for k in 0..K {
            offsets[k] += coord * strides[k][d];
        }
    }
    offsets
}

/// `out = a (op) b` with NumPy broadcasting; `out_shape` is `broadcast_shape(a_shape, b_shape)`.
pub fn binary_forward_cpu(
    op: BinaryOp,
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    out_shape: &[usize],
) -> Vec<f32> {
    if a_shape == b_shape {
        // The fast path (residual additions): no index arithmetic, and the match on `op` is
        // outside the loop so each loop vectorises.
        return match op {
            BinaryOp::Add => zip_map_cpu(a, b, |x, y| x + y),
            BinaryOp::Sub => zip_map_cpu(a, b, |x, y| x - y),
            BinaryOp::Mul => zip_map_cpu(a, b, |x, y| x * y),
        };
    }
    let n: usize = out_shape.iter().product();
    let mut out = vec![0f32; n];
    if n == 0 {
        return out;
    }
    let inner = *out_shape.last().unwrap_or(&1);
    let sa = broadcast_strides(a_shape, out_shape);
    let sb = broadcast_strides(b_shape, out_shape);
    // Step along the last dimension: 1, or 0 for an input broadcast along it.
    let (la, lb) = (*sa.last().unwrap_or(&0), *sb.last().unwrap_or(&0));
    let fill_row = |row: usize, dst: &mut [f32]| {
        let [oa, ob] = row_offsets(row, out_shape, [&sa, &sb]);
        for (j, d) in dst.iter_mut().enumerate() {
            *d = op.apply(a[oa + j * la], b[ob + j * lb]);
        }
    };
    if n >= PARALLEL_MIN {
        out.par_chunks_mut(inner)
            .with_min_len((PAR_GRAIN / inner).max(1))
            .enumerate()
            .for_each(|(row, dst)| fill_row(row, dst));
    } else {
        out.chunks_mut(inner)
            .enumerate()
            .for_each(|(row, dst)| fill_row(row, dst));
    }
    out
}

/// The gradient `g` of a broadcast result (shape `g_shape`), summed back to `target`, a shape
/// that broadcasts to `g_shape`. Sequential in a fixed order, hence deterministic.
pub fn sum_to_shape_cpu(g: &[f32], g_shape: &[usize], target: &[usize]) -> Vec<f32> {
    if g_shape == target {
        return g.to_vec();
    }
    let mut out = vec![0f32; target.iter().product()];
    if g.is_empty() {
        return out;
    }
    let inner = *g_shape.last().unwrap_or(&1);
    let st = broadcast_strides(target, g_shape);
    let last = *st.last().unwrap_or(&0);
    for (row, src) in g.chunks(inner).enumerate() {
        let [o] = row_offsets(row, g_shape, [&st]);
        if last == 0 {
            out[o] += src.iter().sum::<f32>();
        } else {
            for (d, s) in out[o..o + inner].iter_mut().zip(src) {
                *d += s;
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The CPU arm: bias
// ---------------------------------------------------------------------------------------------

/// `x` viewed as `[outer, c, inner]` plus `bias[c]`: axis 1 of an NCHW convolution output
/// (`inner` = H*W), or the last axis of a linear output (`inner` = 1).
pub fn bias_add_forward_cpu(x: &[f32], bias: &[f32], c: usize, inner: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    if out.is_empty() {
        return out;
    }
    let big = out.len() >= PARALLEL_MIN;
    if inner == 1 {
        // Rows of `c` features: add the bias vector to each row.
        let add_row = |row: &mut [f32]| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
        if big {
            out.par_chunks_mut(c)
                .with_min_len((PAR_GRAIN / c).max(1))
                .for_each(add_row);
        } else {
            out.chunks_mut(c).for_each(add_row);
        }
    } else {
        // Planes of `inner` values (one channel of one image): add that channel's constant.
        let add_plane = |(k, plane): (usize, &mut [f32])| {
            let b = bias[k % c];
            plane.iter_mut().for_each(|v| *v += b);
        };
        if big {
            out.par_chunks_mut(inner)
                .with_min_len((PAR_GRAIN / inner).max(1))
                .enumerate()
                .for_each(add_plane);
        } else {
            out.chunks_mut(inner).enumerate().for_each(add_plane);
        }
    }
    out
}

/// Gradient of the bias: `g` viewed as `[outer, c, inner]`, summed over `outer` and `inner`.
/// Deterministic: the blocks of partial sums are fixed, whatever the number of threads.
pub fn bias_add_backward_cpu(g: &[f32], c: usize, inner: usize) -> Vec<f32> {
    let mut db = vec![0f32; c];
    if g.is_empty() {
        return db;
    }
    if inner == 1 {
        // Partial sums over fixed blocks of rows (contiguous reads), added in block order.
        let partial = |block: &[f32]| {
            let mut acc = vec![0f32; c];
            for row in block.chunks(c) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        };
        let partials: Vec<Vec<f32>> = if g.len() >= PARALLEL_MIN {
            g.par_chunks(c * BIAS_ROWS_PER_BLOCK).map(partial).collect()
        } else {
            g.chunks(c * BIAS_ROWS_PER_BLOCK).map(partial).collect()
        };
        for p in partials {
            db.iter_mut().zip(p).for_each(|(d, v)| *d += v);
        }
    } else {
        // One channel per task: sum its plane in every image, images in order.
        let outer = g.len() / (c * inner);
        let channel_sum = |(k, d): (usize, &mut f32)| {
            *d = (0..outer)
                .map(|o| g[(o * c + k) * inner..][..inner].iter().sum::<f32>())
                .sum();
        };
        if g.len() >= PARALLEL_MIN {
            db.par_iter_mut().enumerate().for_each(channel_sum);
        } else {
            db.iter_mut().enumerate().for_each(channel_sum);
        }
    }
    db
}
