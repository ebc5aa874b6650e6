//! The CUDA arm of the layout ops (`permute`/`transpose`, `narrow`, `concat`), the
//! reductions (`sum`, `mean`, `sum_axis`) and broadcasting `add`/`sub`/`mul` (kernels
//! `layout.cu`). **Compiled, not run on a GPU.**
//!
//! Every layout change is one kernel, `strided_copy`: an iteration shape, the strides to read
//! with and the strides to write with (a permuted read for `permute`, a window read for
//! `narrow`, a window write for each input of `concat`, stride 0 for spreading a gradient).
//! Shapes and strides go to the kernel in a small device array (`meta`), uploaded per call,
//! so any rank works without a kernel per rank. Reductions sum sequentially per output in the
//! CPU's order (`reduce_to`) or, for a whole tensor, in f64 over one block (`sum_all`).
//! `sum`/`mean` return an f32 scalar whatever the input type (a loss).

use std::sync::Arc;

use super::common::{as_dtype, empty, grid_stride, kernel, run, view};
use super::elementwise::scalar_raw;
use super::launch::{Arg, KernelCall};
use super::{kernel_suffix, memory, CudaContext, DeviceBuffer};
use crate::ops::elementwise::{contiguous_strides, BinaryOp};
use crate::{DType, Error, Result, Tape, Tensor, Var};

/// The most dimensions the kernels index.
pub(crate) const MAX_RANK: usize = 8;

/// `meta` of one call, uploaded (the buffer must live until the kernel has run: its free is
/// ordered after the launch on the same stream).
fn upload(ctx: &Arc<CudaContext>, meta: &[usize]) -> Result<DeviceBuffer> {
    let words: Vec<u64> = meta.iter().map(|&v| v as u64).collect();
    let buf = DeviceBuffer::alloc(ctx, words.len().max(1) * 8)?;
    if !words.is_empty() {
        memory::htod(ctx, buf.ptr(), bytemuck::cast_slice(&words))?;
    }
    Ok(buf)
}

fn check_rank(op: &'static str, rank: usize) -> Result<()> {
    if rank > MAX_RANK {
        return Err(Error::invalid(
            op,
            format!("not implemented on CUDA yet: {rank} dimensions (at most {MAX_RANK})"),
        ));
    }
    Ok(())
}

/// `y[dst(i)] = x[src(i)]` over `dims`: the meta words and the call (`meta` the uploaded
/// words' address).
pub(crate) fn copy_plan(
    x: u64,
    y: u64,
    dims: &[usize],
    meta: u64,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    check_rank("strided_copy", dims.len())?;
    let k = kernel("strided_copy", kernel_suffix("layout", dtype)?)?;
    let n: usize = dims.iter().product();
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::U64(n as u64),
        Arg::U32(dims.len() as u32),
        Arg::Ptr(meta),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// Copies `x` (at element offset `x_off`) into `y` (at `y_off`) over `dims` with the given
/// strides.
#[allow(clippy::too_many_arguments)]
fn strided_copy(
    ctx: &Arc<CudaContext>,
    x: &Tensor,
    x_off: usize,
    y: &Tensor,
    y_off: usize,
    dims: &[usize],
    src: &[usize],
    dst: &[usize],
) -> Result<()> {
    let dtype = x.dtype();
    let size = dtype.size_in_bytes() as u64;
    let meta = upload(ctx, &[dims, src, dst].concat())?;
    let plan = copy_plan(
        view(x, "strided_copy")?.ptr + x_off as u64 * size,
        view(y, "strided_copy")?.ptr + y_off as u64 * size,
        dims,
        meta.ptr(),
        dtype,
    )?;
    run(ctx, &plan)
}

/// The CUDA arm of `permute` (validated by the caller).
pub(crate) fn permute(
    tape: &Tape,
    x: &Var,
    perm: Vec<usize>,
    out_shape: Vec<usize>,
) -> Result<Var> {
    let xt = x.tensor().clone();
    check_rank("permute", out_shape.len())?;
    let ctx = view(&xt, "permute")?.ctx;
    let dtype = xt.dtype();
    let in_shape = xt.shape().to_vec();
    let xs = contiguous_strides(&in_shape);
    // Output dimension d reads input dimension perm[d].
    let read: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    let out = empty(&ctx, dtype, &out_shape)?;
    let os = contiguous_strides(&out_shape);
    strided_copy(&ctx, &xt, 0, &out, 0, &out_shape, &read, &os)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            // The same iteration, reading g contiguously and writing the permuted places.
            let g = as_dtype(g, dtype)?;
            let dx = empty(&ctx, dtype, &in_shape)?;
            strided_copy(&ctx, &g, 0, &dx, 0, &out_shape, &os, &read)?;
            Ok(vec![Some(dx)])
        }),
    ))
}

/// The CUDA arm of `narrow` (validated by the caller).
pub(crate) fn narrow(tape: &Tape, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
    let xt = x.tensor().clone();
    check_rank("narrow", xt.rank())?;
    let ctx = view(&xt, "narrow")?.ctx;
    let dtype = xt.dtype();
    let in_shape = xt.shape().to_vec();
    let xs = contiguous_strides(&in_shape);
    let mut out_shape = in_shape.clone();
    out_shape[axis] = len;
    let os = contiguous_strides(&out_shape);
    let off = start * xs[axis];
    let out = empty(&ctx, dtype, &out_shape)?;
    strided_copy(&ctx, &xt, off, &out, 0, &out_shape, &xs, &os)?;
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let g = as_dtype(g, dtype)?;
            let dx = Tensor::zeros(&in_shape, dtype, g.device())?;
            strided_copy(&ctx, &g, 0, &dx, off, &out_shape, &os, &xs)?;
            Ok(vec![Some(dx)])
        }),
    ))
}

/// The CUDA arm of `concat` (validated by the caller: same rank and sizes outside `axis`).
pub(crate) fn concat(tape: &Tape, xs: &[&Var], axis: usize, out_shape: Vec<usize>) -> Result<Var> {
    check_rank("concat", out_shape.len())?;
    let tensors: Vec<Tensor> = xs.iter().map(|x| x.tensor().clone()).collect();
    super::common_device("concat", &tensors.iter().collect::<Vec<_>>())?;
    let dtype = tensors[0].dtype();
    let ctx = view(&tensors[0], "concat")?.ctx;
    let os = contiguous_strides(&out_shape);
    let out = empty(&ctx, dtype, &out_shape)?;
    // Input k occupies [starts[k], starts[k] + size) along `axis`.
    let mut starts = Vec::with_capacity(tensors.len());
    let mut at = 0;
    for t in &tensors {
        starts.push(at);
        at += t.shape()[axis];
        let t = as_dtype(t, dtype)?;
        let dims = t.shape().to_vec();
        strided_copy(
            &ctx,
            &t,
            0,
            &out,
            starts.last().copied().unwrap_or(0) * os[axis],
            &dims,
            &contiguous_strides(&dims),
            &os,
        )?;
    }
    let in_shapes: Vec<Vec<usize>> = tensors.iter().map(|t| t.shape().to_vec()).collect();
    let in_dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
    Ok(tape.record(
        out,
        xs,
        Box::new(move |g, needs| {
            let g = as_dtype(g, dtype)?;
            needs
                .iter()
                .enumerate()
                .map(|(k, &need)| {
                    need.then(|| -> Result<Tensor> {
                        let dims = &in_shapes[k];
                        let d = empty(&ctx, dtype, dims)?;
                        let off = starts[k] * os[axis];
                        strided_copy(&ctx, &g, off, &d, 0, dims, &os, &contiguous_strides(dims))?;
                        as_dtype(&d, in_dtypes[k])
                    })
                    .transpose()
                })
                .collect()
        }),
    ))
}

/// `reduce_to`: the kept dims and their strides in `x`, the reduced dims and theirs.
pub(crate) fn reduce_plan(
    x: u64,
    y: u64,
    kept: &[usize],
    reduced: &[usize],
    meta: u64,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    check_rank("reduce", kept.len().max(reduced.len()))?;
    let k = kernel("reduce_to", kernel_suffix("sum", dtype)?)?;
    let n: usize = kept.iter().product();
    let m: usize = reduced.iter().product();
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::U64(n as u64),
        Arg::U64(m as u64),
        Arg::U32(kept.len() as u32),
        Arg::U32(reduced.len() as u32),
        Arg::Ptr(meta),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// `g` (contiguous, `g_shape`) summed down to `target` (broadcast-compatible: missing leading
/// dims and dims of 1 are summed over): the backward of a broadcast.
fn sum_to_shape(ctx: &Arc<CudaContext>, g: &Tensor, target: &[usize]) -> Result<Tensor> {
    let gs = g.shape().to_vec();
    if gs == target {
        return Ok(g.clone());
    }
    let strides = contiguous_strides(&gs);
    let lead = gs.len() - target.len();
    let (mut kd, mut ks, mut rd, mut rs) = (vec![], vec![], vec![], vec![]);
    for (d, (&n, &s)) in gs.iter().zip(&strides).enumerate() {
        let t = if d < lead { 1 } else { target[d - lead] };
        if t == n {
            kd.push(n);
            ks.push(s);
        } else {
            rd.push(n);
            rs.push(s);
        }
    }
    let out = empty(ctx, g.dtype(), target)?;
    let meta = upload(ctx, &[&kd[..], &ks, &rd, &rs].concat())?;
    let plan = reduce_plan(
        view(g, "sum_to_shape")?.ptr,
        view(&out, "sum_to_shape")?.ptr,
        &kd,
        &rd,
        meta.ptr(),
        g.dtype(),
    )?;
    run(ctx, &plan)?;
    Ok(out)
}

/// The CUDA arm of `sum_axis` (validated by the caller).
pub(crate) fn sum_axis(
    tape: &Tape,
    x: &Var,
    (outer, n, inner): (usize, usize, usize),
    out_shape: Vec<usize>,
) -> Result<Var> {
    let xt = x.tensor().clone();
    let ctx = view(&xt, "sum_axis")?.ctx;
    let dtype = xt.dtype();
    let out = empty(&ctx, dtype, &out_shape)?;
    // [outer, n, inner] -> [outer, inner]: the rows added in order, as the CPU.
    let meta = upload(&ctx, &[outer, inner, n * inner, 1, n, inner])?;
    let plan = reduce_plan(
        view(&xt, "sum_axis")?.ptr,
        view(&out, "sum_axis")?.ptr,
        &[outer, inner],
        &[n],
        meta.ptr(),
        dtype,
    )?;
    run(&ctx, &plan)?;
    let in_shape = xt.shape().to_vec();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            // g [outer, inner] spread over n: a read with stride 0 along n.
            let g = as_dtype(g, dtype)?;
            let dx = empty(&ctx, dtype, &in_shape)?;
            let dims = [outer, n, inner];
            strided_copy(
                &ctx,
                &g,
                0,
                &dx,
                0,
                &dims,
                &[inner, 0, 1],
                &contiguous_strides(&dims),
            )?;
            Ok(vec![Some(dx)])
        }),
    ))
}

pub(crate) fn sum_all_plan(
    x: u64,
    out: u64,
    n: usize,
    divisor: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("sum_all", kernel_suffix("sum", dtype)?)?;
    Ok(vec![KernelCall::new(
        k,
        recycle_kernels::launch::single_block(),
        vec![
            Arg::Ptr(x),
            Arg::Ptr(out),
            Arg::U64(n as u64),
            Arg::U64(divisor as u64),
        ],
    )])
}

/// The CUDA arm of `sum` (`mean`: divided by the element count, validated non-zero by the
/// caller): an f32 scalar.
pub(crate) fn sum_all(tape: &Tape, x: &Var, mean: bool) -> Result<Var> {
    let xt = x.tensor().clone();
    let ctx = view(&xt, "sum")?.ctx;
    let dtype = xt.dtype();
    let n = xt.elem_count();
    let out = empty(&ctx, DType::F32, &[])?;
    let plan = sum_all_plan(
        view(&xt, "sum")?.ptr,
        view(&out, "sum")?.ptr,
        n,
        if mean { n } else { 1 },
        dtype,
    )?;
    run(&ctx, &plan)?;
    let shape = xt.shape().to_vec();
    let factor = if mean { 1.0 / n as f32 } else { 1.0 };
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            // g * factor (in f32, as the CPU's fill_like), spread with stride 0.
            let g = as_dtype(g, DType::F32)?.reshape(&[1])?;
            let v = if mean {
                scalar_raw("scale", &g, factor)?
            } else {
                g
            };
            let v = as_dtype(&v, dtype)?;
            let dx = empty(&ctx, dtype, &shape)?;
            let zeros = vec![0; shape.len()];
            strided_copy(
                &ctx,
                &v,
                0,
                &dx,
                0,
                &shape,
                &zeros,
                &contiguous_strides(&shape),
            )?;
            Ok(vec![Some(dx)])
        }),
    ))
}

pub(crate) fn broadcast_plan(
    op: BinaryOp,
    a: u64,
    b: u64,
    y: u64,
    dims: &[usize],
    meta: u64,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    check_rank(op.name(), dims.len())?;
    let k = kernel(
        &format!("broadcast_{}", op.name()),
        kernel_suffix(op.name(), dtype)?,
    )?;
    let n: usize = dims.iter().product();
    let args = vec![
        Arg::Ptr(a),
        Arg::Ptr(b),
        Arg::Ptr(y),
        Arg::U64(n as u64),
        Arg::U32(dims.len() as u32),
        Arg::Ptr(meta),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// The strides reading a tensor of `shape` broadcast to `out` (0 along broadcast dims).
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let s = contiguous_strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|d| {
            if d < lead || shape[d - lead] == 1 && out[d] != 1 {
                0
            } else {
                s[d - lead]
            }
        })
        .collect()
}

fn broadcast_raw(
    ctx: &Arc<CudaContext>,
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
) -> Result<Tensor> {
    let dtype = a.dtype();
    let y = empty(ctx, dtype, out_shape)?;
    let meta = upload(
        ctx,
        &[
            out_shape,
            &broadcast_strides(a.shape(), out_shape),
            &broadcast_strides(b.shape(), out_shape),
        ]
        .concat(),
    )?;
    let plan = broadcast_plan(
        op,
        view(a, op.name())?.ptr,
        view(b, op.name())?.ptr,
        view(&y, op.name())?.ptr,
        out_shape,
        meta.ptr(),
        dtype,
    )?;
    run(ctx, &plan)?;
    Ok(y)
}

/// The CUDA arm of `add`/`sub`/`mul` with broadcasting (shapes differ; `out_shape` is their
/// broadcast, validated by the caller).
pub(crate) fn broadcast_binary(
    tape: &Tape,
    op: BinaryOp,
    a: &Var,
    b: &Var,
    out_shape: Vec<usize>,
) -> Result<Var> {
    let name = op.name();
    super::common_device(name, &[a.tensor(), b.tensor()])?;
    let dtype = super::elementwise::float_inputs(name, &[a.tensor(), b.tensor()])?;
    let (at, bt) = (a.tensor().clone(), b.tensor().clone());
    let ctx = view(&at, name)?.ctx;
    let y = broadcast_raw(&ctx, op, &at, &bt, &out_shape)?;
    Ok(tape.record(
        y,
        &[a, b],
        Box::new(move |g, needs| {
            let g = as_dtype(g, dtype)?;
            let ga = needs[0]
                .then(|| match op {
                    BinaryOp::Mul => sum_to_shape(
                        &ctx,
                        &broadcast_raw(&ctx, BinaryOp::Mul, &g, &bt, &out_shape)?,
                        at.shape(),
                    ),
                    _ => sum_to_shape(&ctx, &g, at.shape()),
                })
                .transpose()?;
            let gb = needs[1]
                .then(|| match op {
                    BinaryOp::Mul => sum_to_shape(
                        &ctx,
                        &broadcast_raw(&ctx, BinaryOp::Mul, &g, &at, &out_shape)?,
                        bt.shape(),
                    ),
                    BinaryOp::Sub => {
                        scalar_raw("scale", &sum_to_shape(&ctx, &g, bt.shape())?, -1.0)
                    }
                    BinaryOp::Add => sum_to_shape(&ctx, &g, bt.shape()),
                })
                .transpose()?;
            Ok(vec![ga, gb])
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_all(calls: &[KernelCall]) {
        assert!(!calls.is_empty());
        for c in calls {
            c.check().unwrap_or_else(|e| panic!("{}: {e}", c.kernel));
        }
    }

    #[test]
    fn layout_plans_match_the_kernel_abi() {
        for dt in [DType::F32, DType::BF16] {
            check_all(&copy_plan(1, 2, &[2, 12, 128, 64], 3, dt).unwrap());
            check_all(&reduce_plan(1, 2, &[4, 768], &[128], 3, dt).unwrap());
            check_all(&sum_all_plan(1, 2, 1 << 20, 1 << 20, dt).unwrap());
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                check_all(&broadcast_plan(op, 1, 2, 3, &[8, 12, 128, 128], 4, dt).unwrap());
            }
        }
        assert!(copy_plan(1, 2, &[1; 9], 3, DType::F32).is_err());
        assert!(copy_plan(1, 2, &[4, 0], 3, DType::F32).unwrap().is_empty());
    }

    #[test]
    fn broadcast_strides_read_a_single_value_along_broadcast_dims() {
        assert_eq!(broadcast_strides(&[3], &[2, 3]), vec![0, 1]);
        assert_eq!(broadcast_strides(&[4, 1, 5], &[4, 3, 5]), vec![5, 0, 1]);
        assert_eq!(broadcast_strides(&[2, 3], &[2, 3]), vec![3, 1]);
        assert_eq!(broadcast_strides(&[1, 1], &[1, 1]), vec![1, 1]);
    }
}
