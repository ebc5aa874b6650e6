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
//! The helpers `map_cpu` / `zip_map_cpu` are the shared same-shape kernels: activations and
//! dropout use them too.

use rayon::prelude::*;

use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

/// Tensors with at least this many elements are processed on all rayon threads; below it,
/// splitting the work costs more than it saves.
pub const PARALLEL_MIN: usize = 1 << 16;

/// The smallest piece of work handed to one rayon task.
const PAR_GRAIN: usize = 1 << 12;

/// Block size of the f64 partial sums in `sum_cpu`. Fixed (not derived from the number of
/// threads) so that the result is bit-identical on every machine.
const SUM_BLOCK: usize = 1 << 14;

/// Rows per partial sum in the bias gradient of a last-axis `bias_add`; fixed for
/// determinism, like `SUM_BLOCK`.
const BIAS_ROWS_PER_BLOCK: usize = 256;

// ---------------------------------------------------------------------------------------------
// Shared same-shape kernels
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

/// The three broadcasting binary ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
        }
    }

    #[inline]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
        }
    }
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

fn check_float(op: &'static str, xs: &[&Var]) -> Result<()> {
    xs.iter().try_for_each(|x| x.tensor().expect_float(op))
}

fn binary(tape: &Tape, op: BinaryOp, a: &Var, b: &Var) -> Result<Var> {
    let name = op.name();
    check_float(name, &[a, b])?;
    match crate::cuda::common_device(name, &[a.tensor(), b.tensor()])? {
        Device::Cpu => {}
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(d, crate::cuda::elementwise::binary(tape, op, a, b));
        }
    }
    let (a_shape, b_shape) = (a.shape().to_vec(), b.shape().to_vec());
    let out_shape = broadcast_shape(&a_shape, &b_shape).ok_or_else(|| {
        Error::shape(
            name,
            format!("cannot broadcast {a_shape:?} with {b_shape:?}"),
        )
    })?;
    let out = {
        let (av, bv) = (a.tensor().read_f32()?, b.tensor().read_f32()?);
        binary_forward_cpu(op, &av, &a_shape, &bv, &b_shape, &out_shape)
    };
    let out = Tensor::f32(out, &out_shape)?;
    // Only mul needs the input values for its gradient.
    let saved = (op == BinaryOp::Mul).then(|| (a.tensor().clone(), b.tensor().clone()));
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |g, needs| {
            // A gradient over the output's shape, summed back to one input's shape.
            let reduce = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor> {
                if shape == out_shape.as_slice() {
                    return Tensor::f32(v, shape);
                }
                Tensor::f32(sum_to_shape_cpu(&v, &out_shape, shape), shape)
            };
            // d(a ± b)/d input: the output gradient (negated for the subtrahend), reduced.
            let pass = |shape: &[usize], negate: bool| -> Result<Tensor> {
                if shape == out_shape.as_slice() && !negate {
                    return Ok(g.clone()); // residual path: hand the gradient through
                }
                let gv = g.read_f32()?;
                if shape == out_shape.as_slice() {
                    return Tensor::f32(map_cpu(&gv, |x| -x), shape);
                }
                let mut r = sum_to_shape_cpu(&gv, &out_shape, shape);
                if negate {
                    r.iter_mut().for_each(|x| *x = -*x);
                }
                Tensor::f32(r, shape)
            };
            let times =
                |other: &Tensor, other_shape: &[usize], shape: &[usize]| -> Result<Tensor> {
                    let (gv, ov) = (g.read_f32()?, other.read_f32()?);
                    let prod = binary_forward_cpu(
                        BinaryOp::Mul,
                        &gv,
                        &out_shape,
                        &ov,
                        other_shape,
                        &out_shape,
                    );
                    reduce(prod, shape)
                };
            let (ga, gb) = match (&saved, op) {
                (Some((av, bv)), BinaryOp::Mul) => (
                    needs[0]
                        .then(|| times(bv, &b_shape, &a_shape))
                        .transpose()?,
                    needs[1]
                        .then(|| times(av, &a_shape, &b_shape))
                        .transpose()?,
                ),
                _ => (
                    needs[0].then(|| pass(&a_shape, false)).transpose()?,
                    needs[1]
                        .then(|| pass(&b_shape, op == BinaryOp::Sub))
                        .transpose()?,
                ),
            };
            Ok(vec![ga, gb])
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
    x.tensor().expect_float("scale")?;
    match x.tensor().device() {
        Device::Cpu => {}
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(d, crate::cuda::elementwise::scalar_op(tape, "scale", x, s));
        }
    }
    let out = Tensor::f32(map_cpu(&x.tensor().read_f32()?, |v| v * s), x.shape())?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| Tensor::f32(map_cpu(&g.read_f32()?, |v| v * s), g.shape()))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

/// `x + s`.
pub fn add_scalar(tape: &Tape, x: &Var, s: f32) -> Result<Var> {
    x.tensor().expect_float("add_scalar")?;
    match x.tensor().device() {
        Device::Cpu => {}
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(
                d,
                crate::cuda::elementwise::scalar_op(tape, "add_scalar", x, s)
            );
        }
    }
    let out = Tensor::f32(map_cpu(&x.tensor().read_f32()?, |v| v + s), x.shape())?;
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
    match crate::cuda::common_device("bias_add", &[x.tensor(), bias.tensor()])? {
        Device::Cpu => {}
        d @ Device::Cuda(_) => {
            return crate::on_cuda!(
                d,
                crate::cuda::elementwise::bias_add(tape, x, bias, c, inner)
            );
        }
    }
    let out = {
        let (xv, bv) = (x.tensor().read_f32()?, bias.tensor().read_f32()?);
        bias_add_forward_cpu(&xv, &bv, c, inner)
    };
    let out = Tensor::f32(out, &shape)?;
    Ok(tape.record(
        out,
        &[x, bias],
        Box::new(move |g, needs| {
            let gx = needs[0].then(|| g.clone());
            let gb = needs[1]
                .then(|| Tensor::f32(bias_add_backward_cpu(&g.read_f32()?, c, inner), &[c]))
                .transpose()?;
            Ok(vec![gx, gb])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Reductions
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

/// A scalar (shape `[]`) holding `value`.
fn scalar(value: f32) -> Result<Tensor> {
    Tensor::f32(vec![value], &[])
}

/// `g` spread over every element of a tensor of `shape`, times `factor` (the backward of
/// `sum` and `mean`).
fn fill_like(g: &Tensor, shape: &[usize], factor: f32) -> Result<Tensor> {
    let v = g.to_scalar_f32()? * factor;
    Tensor::f32(vec![v; shape.iter().product()], shape)
}

/// Sum of all elements, as a scalar (shape `[]`).
pub fn sum(tape: &Tape, x: &Var) -> Result<Var> {
    x.tensor().expect_float("sum")?;
    if let d @ crate::Device::Cuda(_) = x.tensor().device() {
        return crate::on_cuda!(d, crate::cuda::layout::sum_all(tape, x, false));
    }
    let out = scalar(sum_cpu(&x.tensor().read_f32()?) as f32)?;
    let shape = x.shape().to_vec();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            Ok(vec![needs[0]
                .then(|| fill_like(g, &shape, 1.0))
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
    if let d @ crate::Device::Cuda(_) = x.tensor().device() {
        return crate::on_cuda!(d, crate::cuda::layout::sum_all(tape, x, true));
    }
    let out = scalar((sum_cpu(&x.tensor().read_f32()?) / n as f64) as f32)?;
    let shape = x.shape().to_vec();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            Ok(vec![needs[0]
                .then(|| fill_like(g, &shape, 1.0 / n as f32))
                .transpose()?])
        }),
    ))
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
    let n = shape[axis];
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out_shape = shape.clone();
    if keep_dim {
        out_shape[axis] = 1;
    } else {
        out_shape.remove(axis);
    }
    if let d @ crate::Device::Cuda(_) = x.tensor().device() {
        return crate::on_cuda!(
            d,
            crate::cuda::layout::sum_axis(tape, x, (outer, n, inner), out_shape)
        );
    }
    let out = sum_axis_forward_cpu(&x.tensor().read_f32()?, outer, n, inner);
    let out = Tensor::f32(out, &out_shape)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| Tensor::f32(sum_axis_backward_cpu(&g.read_f32()?, n, inner), &shape))
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::GradCheck;
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
