//! The CUDA arm of the layout changes and reductions of `crate::backend::layout` (`permute`,
//! `narrow`, `concat`, `sum`, `mean`, `sum_axis`) and of broadcasting `add`/`sub`/`mul` and its
//! `sum_to_shape` (`crate::backend::elementwise`): kernels `layout.cu`. No tape here.
//!
//! Every layout change is one kernel, `strided_copy`: an iteration shape, the strides to read
//! with and the strides to write with (a permuted read for `permute`, a window read for
//! `narrow`, a window write for each input of `concat`, stride 0 for spreading a gradient).
//! Shapes and strides go to the kernel in a small device array (`meta`), uploaded per call,
//! so any rank works without a kernel per rank. Reductions sum sequentially per output in the
//! CPU's order (`reduce_to`) or, for a whole tensor, in f64 over one block (`sum_all`).
//! `sum`/`mean` return an f32 scalar whatever the input type (a loss).

use std::sync::Arc;

use recycle_kernels::launchers as k;

use super::common::{as_dtype, dptr, empty, grid_stride, p, view, with_float};
use super::elementwise::scalar_raw;
use super::launch::launch;
use super::{memory, CudaContext, DeviceBuffer};
use crate::backend::elementwise::contiguous_strides;
use crate::backend::BinaryOp;
use crate::{DType, Error, Result, Tensor};

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

/// A strided copy's walk over `dims` in row-major order: the element at index `i` is read at
/// `src_off + sum(i[d] * src[d])` and written at `dst_off + sum(i[d] * dst[d])` (in elements).
pub(crate) struct Walk<'a> {
    pub dims: &'a [usize],
    pub src: &'a [usize],
    pub src_off: usize,
    pub dst: &'a [usize],
    pub dst_off: usize,
}

impl<'a> Walk<'a> {
    /// From element 0 of both sides.
    pub fn new(dims: &'a [usize], src: &'a [usize], dst: &'a [usize]) -> Self {
        Walk {
            dims,
            src,
            src_off: 0,
            dst,
            dst_off: 0,
        }
    }

    /// Reading from element `off` of the source.
    pub fn src_at(self, off: usize) -> Self {
        Walk {
            src_off: off,
            ..self
        }
    }

    /// Writing from element `off` of the destination.
    pub fn dst_at(self, off: usize) -> Self {
        Walk {
            dst_off: off,
            ..self
        }
    }

    /// The kernel's `meta` words: the dims, then both strides.
    fn meta(&self) -> Vec<usize> {
        [self.dims, self.src, self.dst].concat()
    }
}

/// Copies `x` into `y` along `w`: `y[dst(i)] = x[src(i)]`.
fn strided_copy(ctx: &Arc<CudaContext>, x: &Tensor, y: &Tensor, w: &Walk) -> Result<()> {
    check_rank("strided_copy", w.dims.len())?;
    let n: usize = w.dims.iter().product();
    let Some(cfg) = grid_stride(n) else {
        return Ok(());
    };
    let size = x.dtype().size_in_bytes() as u64;
    let meta = upload(ctx, &w.meta())?;
    let src = view(x, "strided_copy")?.ptr + w.src_off as u64 * size;
    let dst = view(y, "strided_copy")?.ptr + w.dst_off as u64 * size;
    let rank = w.dims.len() as u32;
    with_float!("layout", x.dtype(), |T| launch(
        ctx,
        &k::strided_copy::<T>(cfg, p(src), p(dst), n as u64, rank, p(meta.ptr()))
    ))
}

/// The CUDA arm of [`crate::backend::layout::permute_fwd`] (validated by the caller).
pub(crate) fn permute(x: &Tensor, perm: Vec<usize>, out_shape: Vec<usize>) -> Result<Tensor> {
    check_rank("permute", out_shape.len())?;
    let ctx = view(x, "permute")?.ctx;
    let xs = contiguous_strides(x.shape());
    // Output dimension d reads input dimension perm[d].
    let read: Vec<usize> = perm.iter().map(|&p| xs[p]).collect();
    let out = empty(&ctx, x.dtype(), &out_shape)?;
    let os = contiguous_strides(&out_shape);
    strided_copy(&ctx, x, &out, &Walk::new(&out_shape, &read, &os))?;
    Ok(out)
}

/// The CUDA arm of [`crate::backend::layout::narrow_fwd`] (validated by the caller).
pub(crate) fn narrow(x: &Tensor, axis: usize, start: usize, len: usize) -> Result<Tensor> {
    check_rank("narrow", x.rank())?;
    let ctx = view(x, "narrow")?.ctx;
    let xs = contiguous_strides(x.shape());
    let mut out_shape = x.shape().to_vec();
    out_shape[axis] = len;
    let os = contiguous_strides(&out_shape);
    let out = empty(&ctx, x.dtype(), &out_shape)?;
    strided_copy(
        &ctx,
        x,
        &out,
        &Walk::new(&out_shape, &xs, &os).src_at(start * xs[axis]),
    )?;
    Ok(out)
}

/// The CUDA arm of [`crate::backend::layout::narrow_bwd`]: `g` written at `start` along `axis`
/// into zeros of `in_shape`, in `g`'s dtype.
pub(crate) fn narrow_bwd(
    g: &Tensor,
    in_shape: &[usize],
    axis: usize,
    start: usize,
) -> Result<Tensor> {
    check_rank("narrow", in_shape.len())?;
    let ctx = view(g, "narrow")?.ctx;
    let xs = contiguous_strides(in_shape);
    let os = contiguous_strides(g.shape());
    let dx = Tensor::zeros(in_shape, g.dtype(), g.device())?;
    strided_copy(
        &ctx,
        g,
        &dx,
        &Walk::new(g.shape(), &os, &xs).dst_at(start * xs[axis]),
    )?;
    Ok(dx)
}

/// The CUDA arm of [`crate::backend::layout::concat_fwd`] (validated by the caller: same rank
/// and sizes outside `axis`): every part cast to the first one's dtype.
pub(crate) fn concat(xs: &[&Tensor], axis: usize, out_shape: Vec<usize>) -> Result<Tensor> {
    check_rank("concat", out_shape.len())?;
    let dtype = xs[0].dtype();
    let ctx = view(xs[0], "concat")?.ctx;
    let os = contiguous_strides(&out_shape);
    let out = empty(&ctx, dtype, &out_shape)?;
    // Input k occupies [at, at + size) along `axis`.
    let mut at = 0;
    for t in xs {
        let t = as_dtype(t, dtype)?;
        let dims = t.shape().to_vec();
        strided_copy(
            &ctx,
            &t,
            &out,
            &Walk::new(&dims, &contiguous_strides(&dims), &os).dst_at(at * os[axis]),
        )?;
        at += dims[axis];
    }
    Ok(out)
}

/// A new tensor of `out_shape` in `x`'s dtype, each element the sum over `reduced` of `x`, in
/// the CPU's order (`reduce_to`); `meta` the kept dims and their strides in `x`, the reduced
/// dims and theirs.
fn reduce(
    x: &Tensor,
    out_shape: &[usize],
    kept: &[usize],
    reduced: &[usize],
    meta: &[usize],
) -> Result<Tensor> {
    check_rank("reduce", kept.len().max(reduced.len()))?;
    let xv = view(x, "sum")?;
    let y = empty(&xv.ctx, x.dtype(), out_shape)?;
    let n: usize = kept.iter().product();
    let Some(cfg) = grid_stride(n) else {
        return Ok(y);
    };
    let m: usize = reduced.iter().product();
    let meta = upload(&xv.ctx, meta)?;
    let (rank, rrank) = (kept.len() as u32, reduced.len() as u32);
    with_float!("sum", x.dtype(), |T| launch(
        &xv.ctx,
        &k::reduce_to::<T>(
            cfg,
            p(xv.ptr),
            dptr(&y, "sum")?,
            n as u64,
            m as u64,
            rank,
            rrank,
            p(meta.ptr())
        )
    ))?;
    Ok(y)
}

/// `reduce_to`'s shapes for summing a contiguous `gs` down to `target`: the kept dims, the
/// reduced dims, and the meta words (kept dims, their strides, reduced dims, theirs).
fn sum_to_shape_meta(gs: &[usize], target: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let strides = contiguous_strides(gs);
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
    let meta = [&kd[..], &ks, &rd, &rs].concat();
    (kd, rd, meta)
}

/// The CUDA arm of [`crate::backend::elementwise::sum_to_shape`]: `g` (contiguous) summed down
/// to `target` (broadcast-compatible: missing leading dims and dims of 1 are summed over), the
/// backward of a broadcast, in `g`'s dtype.
pub(crate) fn sum_to_shape(g: &Tensor, target: &[usize]) -> Result<Tensor> {
    let gs = g.shape().to_vec();
    if gs == target {
        return Ok(g.clone());
    }
    let (kd, rd, words) = sum_to_shape_meta(&gs, target);
    reduce(g, target, &kd, &rd, &words)
}

/// The CUDA arm of [`crate::backend::layout::sum_axis_fwd`] (validated by the caller), in
/// `x`'s dtype.
pub(crate) fn sum_axis(
    x: &Tensor,
    (outer, n, inner): (usize, usize, usize),
    out_shape: Vec<usize>,
) -> Result<Tensor> {
    // [outer, n, inner] -> [outer, inner]: the rows added in order, as the CPU.
    let meta = [outer, inner, n * inner, 1, n, inner];
    reduce(x, &out_shape, &[outer, inner], &[n], &meta)
}

/// The CUDA arm of [`crate::backend::layout::sum_axis_bwd`]: `g` (`[outer, inner]`) spread
/// over `n` (a read with stride 0 along it), in `g`'s dtype.
pub(crate) fn sum_axis_bwd(
    g: &Tensor,
    (outer, n, inner): (usize, usize, usize),
    in_shape: &[usize],
) -> Result<Tensor> {
    let ctx = view(g, "sum_axis")?.ctx;
    let dx = empty(&ctx, g.dtype(), in_shape)?;
    let dims = [outer, n, inner];
    strided_copy(
        &ctx,
        g,
        &dx,
        &Walk::new(&dims, &[inner, 0, 1], &contiguous_strides(&dims)),
    )?;
    Ok(dx)
}

/// The CUDA arm of [`crate::backend::layout::sum_fwd`] (`mean`: divided by the element count,
/// validated non-zero by the caller): an f32 scalar, summed in f64 over one block.
pub(crate) fn sum_all(x: &Tensor, mean: bool) -> Result<Tensor> {
    let xv = view(x, "sum")?;
    let divisor = if mean { xv.len } else { 1 } as u64;
    let y = empty(&xv.ctx, DType::F32, &[])?;
    let cfg = recycle_kernels::launch::single_block();
    with_float!("sum", x.dtype(), |T| launch(
        &xv.ctx,
        &k::sum_all::<T>(cfg, p(xv.ptr), dptr(&y, "sum")?, xv.len as u64, divisor)
    ))?;
    Ok(y)
}

/// The CUDA arm of [`crate::backend::layout::fill_bwd`]: the scalar `g` times `factor` (in
/// f32, as the CPU), cast to `dtype` and spread with stride 0 over `shape`.
pub(crate) fn fill(g: &Tensor, shape: &[usize], factor: f32, dtype: DType) -> Result<Tensor> {
    let ctx = view(g, "sum")?.ctx;
    let g = as_dtype(g, DType::F32)?.reshape(&[1])?;
    let v = if factor != 1.0 {
        scalar_raw("scale", &g, factor)?
    } else {
        g
    };
    let v = as_dtype(&v, dtype)?;
    let dx = empty(&ctx, dtype, shape)?;
    let zeros = vec![0; shape.len()];
    strided_copy(
        &ctx,
        &v,
        &dx,
        &Walk::new(shape, &zeros, &contiguous_strides(shape)),
    )?;
    Ok(dx)
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

/// `broadcast_*`'s meta words: the output's dims, then each input's strides read along them.
fn broadcast_meta(a: &[usize], b: &[usize], out_shape: &[usize]) -> Vec<usize> {
    [
        out_shape,
        &broadcast_strides(a, out_shape),
        &broadcast_strides(b, out_shape),
    ]
    .concat()
}

/// The CUDA arm of a broadcasting `add`/`sub`/`mul` (shapes differ; `out_shape` is their
/// broadcast, validated by the caller): both operands of one dtype, kept.
pub(crate) fn broadcast(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
) -> Result<Tensor> {
    let name = op.name();
    let dtype = super::elementwise::float_inputs(name, &[a, b])?;
    check_rank(name, out_shape.len())?;
    let ctx = &view(a, name)?.ctx;
    let y = empty(ctx, dtype, out_shape)?;
    let n: usize = out_shape.iter().product();
    let Some(cfg) = grid_stride(n) else {
        return Ok(y);
    };
    let meta = upload(ctx, &broadcast_meta(a.shape(), b.shape(), out_shape))?;
    let rank = out_shape.len() as u32;
    with_float!(name, dtype, |T| {
        let launcher = match op {
            BinaryOp::Add => k::broadcast_add::<T>,
            BinaryOp::Sub => k::broadcast_sub::<T>,
            BinaryOp::Mul => k::broadcast_mul::<T>,
        };
        let (a, b, out) = (dptr(a, name)?, dptr(b, name)?, dptr(&y, name)?);
        launch(
            ctx,
            &launcher(cfg, a, b, out, n as u64, rank, p(meta.ptr())),
        )
    })?;
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_strides_read_a_single_value_along_broadcast_dims() {
        assert_eq!(broadcast_strides(&[3], &[2, 3]), vec![0, 1]);
        assert_eq!(broadcast_strides(&[4, 1, 5], &[4, 3, 5]), vec![5, 0, 1]);
        assert_eq!(broadcast_strides(&[2, 3], &[2, 3]), vec![3, 1]);
        assert_eq!(broadcast_strides(&[1, 1], &[1, 1]), vec![1, 1]);
    }
}
