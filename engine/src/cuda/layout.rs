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

use super::common::{as_dtype, empty, grid_stride_call, output, p, run, view, with_float};
use super::elementwise::scalar_raw;
use super::launch::KernelCall;
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
    let n: usize = dims.iter().product();
    let rank = dims.len() as u32;
    with_float!("layout", dtype, |T| Ok(grid_stride_call(n, |c| {
        k::strided_copy::<T>(c, p(x), p(y), n as u64, rank, p(meta))
    })))
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

/// Copies `x` into `y` along `w`.
fn strided_copy(ctx: &Arc<CudaContext>, x: &Tensor, y: &Tensor, w: &Walk) -> Result<()> {
    let dtype = x.dtype();
    let size = dtype.size_in_bytes() as u64;
    let meta = upload(ctx, &w.meta())?;
    let plan = copy_plan(
        view(x, "strided_copy")?.ptr + w.src_off as u64 * size,
        view(y, "strided_copy")?.ptr + w.dst_off as u64 * size,
        w.dims,
        meta.ptr(),
        dtype,
    )?;
    run(ctx, &plan)
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
    let n: usize = kept.iter().product();
    let m: usize = reduced.iter().product();
    let (rank, rrank) = (kept.len() as u32, reduced.len() as u32);
    with_float!("sum", dtype, |T| Ok(grid_stride_call(
        n,
        |c| k::reduce_to::<T>(c, p(x), p(y), n as u64, m as u64, rank, rrank, p(meta))
    )))
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
    let ctx = &view(g, "sum_to_shape")?.ctx;
    let (kd, rd, words) = sum_to_shape_meta(&gs, target);
    let meta = upload(ctx, &words)?;
    let x = view(g, "sum_to_shape")?.ptr;
    output(ctx, g.dtype(), target, |y| {
        reduce_plan(x, y, &kd, &rd, meta.ptr(), g.dtype())
    })
}

/// The CUDA arm of [`crate::backend::layout::sum_axis_fwd`] (validated by the caller), in
/// `x`'s dtype.
pub(crate) fn sum_axis(
    x: &Tensor,
    (outer, n, inner): (usize, usize, usize),
    out_shape: Vec<usize>,
) -> Result<Tensor> {
    let xv = view(x, "sum_axis")?;
    // [outer, n, inner] -> [outer, inner]: the rows added in order, as the CPU.
    let meta = upload(&xv.ctx, &[outer, inner, n * inner, 1, n, inner])?;
    output(&xv.ctx, x.dtype(), &out_shape, |y| {
        reduce_plan(xv.ptr, y, &[outer, inner], &[n], meta.ptr(), x.dtype())
    })
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

pub(crate) fn sum_all_plan(
    x: u64,
    out: u64,
    n: usize,
    divisor: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let cfg = recycle_kernels::launch::single_block();
    with_float!("sum", dtype, |T| Ok(vec![k::sum_all::<T>(
        cfg,
        p(x),
        p(out),
        n as u64,
        divisor as u64
    )]))
}

/// The CUDA arm of [`crate::backend::layout::sum_fwd`] (`mean`: divided by the element count,
/// validated non-zero by the caller): an f32 scalar.
pub(crate) fn sum_all(x: &Tensor, mean: bool) -> Result<Tensor> {
    let xv = view(x, "sum")?;
    let divisor = if mean { xv.len } else { 1 };
    output(&xv.ctx, DType::F32, &[], |y| {
        sum_all_plan(xv.ptr, y, xv.len, divisor, x.dtype())
    })
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
    let n: usize = dims.iter().product();
    let rank = dims.len() as u32;
    with_float!(op.name(), dtype, |T| {
        let launcher = match op {
            BinaryOp::Add => k::broadcast_add::<T>,
            BinaryOp::Sub => k::broadcast_sub::<T>,
            BinaryOp::Mul => k::broadcast_mul::<T>,
        };
        Ok(grid_stride_call(n, |c| {
            launcher(c, p(a), p(b), p(y), n as u64, rank, p(meta))
        }))
    })
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

fn broadcast_raw(
    ctx: &Arc<CudaContext>,
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
) -> Result<Tensor> {
    let meta = upload(ctx, &broadcast_meta(a.shape(), b.shape(), out_shape))?;
    let (av, bv) = (view(a, op.name())?, view(b, op.name())?);
    output(ctx, a.dtype(), out_shape, |y| {
        broadcast_plan(op, av.ptr, bv.ptr, y, out_shape, meta.ptr(), a.dtype())
    })
}

/// The CUDA arm of a broadcasting `add`/`sub`/`mul` (shapes differ; `out_shape` is their
/// broadcast, validated by the caller): both operands of one dtype, kept.
pub(crate) fn broadcast(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
) -> Result<Tensor> {
    super::elementwise::float_inputs(op.name(), &[a, b])?;
    let ctx = view(a, op.name())?.ctx;
    broadcast_raw(&ctx, op, a, b, out_shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn ranks_beyond_eight_are_errors_and_empty_copies_launch_nothing() {
        assert!(copy_plan(1, 2, &[1; 9], 3, DType::F32).is_err());
        assert!(copy_plan(1, 2, &[4, 0], 3, DType::F32).unwrap().is_empty());
    }

    use crate::cuda::sim_check::{
        as_stored, assert_close, download, host_sim, run_plan, sample, upload,
    };
    use recycle_kernels::sim::{HostSim, SimBuffer};

    /// `meta` words in a simulator buffer (as `upload` puts them on a GPU).
    fn meta(words: &[usize]) -> SimBuffer {
        let words: Vec<u64> = words.iter().map(|&v| v as u64).collect();
        SimBuffer::from_slice(&words)
    }

    /// `x` copied into `y` along `w` on the simulator, as `strided_copy`.
    fn sim_copy(sim: &HostSim, x: &SimBuffer, y: &SimBuffer, w: &Walk, dt: DType) {
        let size = dt.size_in_bytes() as u64;
        let m = meta(&w.meta());
        let plan = copy_plan(
            x.ptr() + w.src_off as u64 * size,
            y.ptr() + w.dst_off as u64 * size,
            w.dims,
            m.ptr(),
            dt,
        )
        .unwrap();
        run_plan(sim, &plan);
    }

    /// Copies move values: every comparison is exact (f32 and bf16 alike).
    #[test]
    fn copy_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::layout as cpu;
        use crate::backend::layout::sum_axis_backward_cpu;
        let Some(sim) = host_sim() else { return };
        for dt in [DType::F32, DType::BF16] {
            // permute / transpose and their backwards, as `permute` builds them.
            for (shape, perm) in [
                (vec![5usize, 37, 41], vec![2usize, 0, 1]),
                (vec![37, 41], vec![1, 0]),
                (vec![3, 4, 17, 9], vec![0, 2, 1, 3]),
                (vec![3, 4, 17, 9], vec![3, 1, 2, 0]),
            ] {
                let what = format!("permute {shape:?} by {perm:?} {dt:?}");
                let n: usize = shape.iter().product();
                let x = sample(n, 1, 4.0);
                let xs = as_stored(&x, dt);
                let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
                let strides = contiguous_strides(&shape);
                let read: Vec<usize> = perm.iter().map(|&p| strides[p]).collect();
                let os = contiguous_strides(&out_shape);
                let (bx, by) = (upload(&x, dt), upload(&vec![0.0; n], dt));
                sim_copy(sim, &bx, &by, &Walk::new(&out_shape, &read, &os), dt);
                let y = download(&by, dt);
                let want = cpu::permute_forward_cpu(&xs, &shape, &perm);
                assert_close(&what, &y, &want, 0.0, 0.0);
                let g = sample(n, 2, 1.0);
                let (bg, bdx) = (upload(&g, dt), upload(&vec![0.0; n], dt));
                sim_copy(sim, &bg, &bdx, &Walk::new(&out_shape, &os, &read), dt);
                let want = cpu::permute_backward_cpu(&as_stored(&g, dt), &out_shape, &perm);
                assert_close(
                    &format!("{what} backward"),
                    &download(&bdx, dt),
                    &want,
                    0.0,
                    0.0,
                );
            }
            // narrow (a window read at an offset) and its backward (a window write into zeros).
            let (outer, n, inner, start, len) = (4usize, 50usize, 33usize, 7usize, 20usize);
            let shape = [outer, n, inner];
            let out_shape = [outer, len, inner];
            let (xst, os) = (contiguous_strides(&shape), contiguous_strides(&out_shape));
            let off = start * xst[1];
            let x = sample(outer * n * inner, 3, 4.0);
            let (bx, by) = (upload(&x, dt), upload(&vec![0.0; outer * len * inner], dt));
            sim_copy(
                sim,
                &bx,
                &by,
                &Walk::new(&out_shape, &xst, &os).src_at(off),
                dt,
            );
            let want = cpu::narrow_forward_cpu(&as_stored(&x, dt), n, inner, start, len);
            assert_close(
                &format!("narrow {dt:?}"),
                &download(&by, dt),
                &want,
                0.0,
                0.0,
            );
            let g = sample(outer * len * inner, 4, 1.0);
            let (bg, bdx) = (upload(&g, dt), upload(&vec![0.0; outer * n * inner], dt));
            sim_copy(
                sim,
                &bg,
                &bdx,
                &Walk::new(&out_shape, &os, &xst).dst_at(off),
                dt,
            );
            let want = cpu::narrow_backward_cpu(&as_stored(&g, dt), outer, n, inner, start, len);
            assert_close(
                &format!("narrow backward {dt:?}"),
                &download(&bdx, dt),
                &want,
                0.0,
                0.0,
            );
            // concat along the middle axis: each input written into its window of the output.
            let (sizes, inner) = ([5usize, 8, 1], 11usize);
            let total: usize = sizes.iter().sum();
            let out_shape = [3, total, inner];
            let os = contiguous_strides(&out_shape);
            let by = upload(&vec![0.0; 3 * total * inner], dt);
            let parts: Vec<Vec<f32>> = sizes
                .iter()
                .enumerate()
                .map(|(k, &s)| sample(3 * s * inner, 10 + k as u64, 4.0))
                .collect();
            let mut at = 0;
            for (p, &s) in parts.iter().zip(&sizes) {
                let dims = [3, s, inner];
                let bp = upload(p, dt);
                sim_copy(
                    sim,
                    &bp,
                    &by,
                    &Walk::new(&dims, &contiguous_strides(&dims), &os).dst_at(at * os[1]),
                    dt,
                );
                at += s;
            }
            let stored: Vec<Vec<f32>> = parts.iter().map(|p| as_stored(p, dt)).collect();
            let refs: Vec<&[f32]> = stored.iter().map(|p| &p[..]).collect();
            let want = cpu::concat_forward_cpu(&refs, &sizes, inner);
            assert_close(
                &format!("concat {dt:?}"),
                &download(&by, dt),
                &want,
                0.0,
                0.0,
            );
            // sum_axis backward: g [outer, inner] spread along n with a stride-0 read.
            let (outer, n, inner) = (3usize, 7usize, 129usize);
            let g = sample(outer * inner, 5, 1.0);
            let dims = [outer, n, inner];
            let (bg, bdx) = (upload(&g, dt), upload(&vec![0.0; outer * n * inner], dt));
            sim_copy(
                sim,
                &bg,
                &bdx,
                &Walk::new(&dims, &[inner, 0, 1], &contiguous_strides(&dims)),
                dt,
            );
            let want = sum_axis_backward_cpu(&as_stored(&g, dt), n, inner);
            assert_close(
                &format!("sum_axis backward {dt:?}"),
                &download(&bdx, dt),
                &want,
                0.0,
                0.0,
            );
        }
    }

    #[test]
    fn reduction_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::layout as cpu;
        let Some(sim) = host_sim() else { return };
        for dt in [DType::F32, DType::BF16] {
            // sum_axis: the rows added in order, as the CPU: exact in f32, and in bf16 the
            // CPU's f32 sum rounded once.
            for (outer, n, inner) in [(4usize, 33usize, 257usize), (3, 1000, 1), (1, 5, 300)] {
                let x = sample(outer * n * inner, 1, 2.0);
                let (bx, by) = (upload(&x, dt), upload(&vec![0.0; outer * inner], dt));
                let m = meta(&[outer, inner, n * inner, 1, n, inner]);
                let plan =
                    reduce_plan(bx.ptr(), by.ptr(), &[outer, inner], &[n], m.ptr(), dt).unwrap();
                run_plan(sim, &plan);
                let want = as_stored(
                    &cpu::sum_axis_forward_cpu(&as_stored(&x, dt), outer, n, inner),
                    dt,
                );
                assert_close(
                    &format!("sum_axis [{outer}, {n}, {inner}] {dt:?}"),
                    &download(&by, dt),
                    &want,
                    0.0,
                    0.0,
                );
            }
            // sum_to_shape: the CPU sums a row first when the last axis is reduced: another
            // order, so f32 rounding slack (at most 210 values of magnitude <= 1 per output:
            // 1e-5 absolute is far above their f32 rounding), and one bf16 ulp for bf16 outputs.
            let (rel, abs) = if dt == DType::BF16 {
                (8e-3, 1e-5)
            } else {
                (1e-5, 1e-5)
            };
            let gshape = [4usize, 6, 35];
            let g = sample(gshape.iter().product(), 2, 1.0);
            let gs = as_stored(&g, dt);
            let bg = upload(&g, dt);
            for target in [
                vec![6usize, 1],
                vec![35],
                vec![4, 1, 35],
                vec![1, 6, 1],
                vec![1],
                vec![],
            ] {
                let (kd, rd, words) = sum_to_shape_meta(&gshape, &target);
                let m = meta(&words);
                let count: usize = target.iter().product();
                let by = upload(&vec![0.0; count], dt);
                run_plan(
                    sim,
                    &reduce_plan(bg.ptr(), by.ptr(), &kd, &rd, m.ptr(), dt).unwrap(),
                );
                let want = crate::backend::elementwise::sum_to_shape_cpu(&gs, &gshape, &target);
                assert_close(
                    &format!("sum_to_shape {gshape:?} -> {target:?} {dt:?}"),
                    &download(&by, dt),
                    &want,
                    rel,
                    abs,
                );
            }
            // sum_all (sum and mean): f64 sums in another order than the CPU's, rounded to f32
            // once: at most an f32 ulp apart.
            for n in [1usize, 1000, 70_001] {
                let x = sample(n, 3, 2.0);
                let bx = upload(&x, dt);
                for divisor in [1, n] {
                    let out = SimBuffer::from_slice(&[f32::NAN]);
                    run_plan(
                        sim,
                        &sum_all_plan(bx.ptr(), out.ptr(), n, divisor, dt).unwrap(),
                    );
                    let want = (cpu::sum_cpu(&as_stored(&x, dt)) / divisor as f64) as f32;
                    assert_close(
                        &format!("sum_all n={n} / {divisor} {dt:?}"),
                        &out.read::<f32>().unwrap(),
                        &[want],
                        2.5e-7,
                        1e-12,
                    );
                }
            }
        }
    }

    /// One f32 operation per element, as binary_forward_cpu: exact (bf16: the CPU's result
    /// rounded once).
    #[test]
    fn broadcast_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::elementwise::{binary_forward_cpu, broadcast_shape};
        let Some(sim) = host_sim() else { return };
        for (a_shape, b_shape) in [
            (vec![4usize, 1, 35], vec![6usize, 1]),
            (vec![3, 257], vec![257]),
            (vec![1], vec![2, 3, 129]),
            (vec![5, 1, 7, 1], vec![1, 3, 1, 9]),
            (vec![2, 3, 1000], vec![2, 1, 1000]),
        ] {
            let out_shape = broadcast_shape(&a_shape, &b_shape).unwrap();
            let n: usize = out_shape.iter().product();
            let a = sample(a_shape.iter().product(), 1, 3.0);
            let b = sample(b_shape.iter().product(), 2, 3.0);
            let m = meta(&broadcast_meta(&a_shape, &b_shape, &out_shape));
            for dt in [DType::F32, DType::BF16] {
                let (ba, bb) = (upload(&a, dt), upload(&b, dt));
                for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                    let by = upload(&vec![0.0; n], dt);
                    let plan =
                        broadcast_plan(op, ba.ptr(), bb.ptr(), by.ptr(), &out_shape, m.ptr(), dt)
                            .unwrap();
                    run_plan(sim, &plan);
                    let want = binary_forward_cpu(
                        op,
                        &as_stored(&a, dt),
                        &a_shape,
                        &as_stored(&b, dt),
                        &b_shape,
                        &out_shape,
                    );
                    assert_close(
                        &format!("{} {a_shape:?} with {b_shape:?} {dt:?}", op.name()),
                        &download(&by, dt),
                        &as_stored(&want, dt),
                        0.0,
                        0.0,
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_strides_read_a_single_value_along_broadcast_dims() {
        assert_eq!(broadcast_strides(&[3], &[2, 3]), vec![0, 1]);
        assert_eq!(broadcast_strides(&[4, 1, 5], &[4, 3, 5]), vec![5, 0, 1]);
        assert_eq!(broadcast_strides(&[2, 3], &[2, 3]), vec![3, 1]);
        assert_eq!(broadcast_strides(&[1, 1], &[1, 1]), vec![1, 1]);
    }
}
