//! The CUDA arm of the elementwise, activation, softmax, cross-entropy, optimizer and fused
//! distillation-loss ops, and the helpers every family file uses. **Compiled, not run on a GPU.**
//!
//! Each op comes in two layers:
//! - a *plan*: the kernel calls for given device addresses and shapes (pure data, checked
//!   against the kernels' ABI; the tests build them for sample shapes on the CPU);
//! - the tensor-level function, which validates inputs as the CPU op does, allocates the
//!   outputs, launches the plan on the current stream (the student's, or a scope's) and, for
//!   tape ops, records a backward that launches the backward kernels.
//!
//! Conventions that differ from the CPU ops: an op's output has its input's dtype (bf16
//! activations stay bf16; the CPU ops widen everything to f32), and the inputs of one kernel
//! share a dtype (a gradient of another dtype is cast first). Broadcasting binary ops go to
//! `layout.rs`; the other families have their own files (`matmul.rs`, `conv.rs`, `norm.rs`,
//! `gather.rs`, `dropout.rs`, `pool.rs`, `layout.rs`); this file keeps the shared helpers.

use std::sync::Arc;

use recycle_kernels::kd::{self as kdh, KdScalars, TeacherLogits};
use recycle_kernels::launch::{self as kl, LaunchConfig};
use recycle_kernels::names;

use super::launch::{shape_err, Arg, KernelCall};
use super::{
    common_device, kernel_suffix, CudaContext, CudaView, DeviceBuffer, KdLossDevice, KdTerm,
};
use crate::ops::elementwise::BinaryOp;
use crate::ops::loss::{cross_entropy_check_labels_cpu, CrossEntropyOptions};
use crate::optim::{AdamWStep, SgdwStep};
use crate::tensor::elem_count;
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The kernel `{base}_{suffix}` as the `'static` name of the kernels crate.
pub(crate) fn kernel(base: &str, suffix: &str) -> Result<&'static str> {
    let want = format!("{base}_{suffix}");
    names::FAMILIES
        .iter()
        .flat_map(|(_, ks)| ks.iter())
        .find(|k| **k == want)
        .copied()
        .ok_or_else(|| Error::invalid("cuda launch", format!("no kernel named {want}")))
}

/// A grid-stride call over `n` elements; `None` when there is nothing to do.
pub(crate) fn grid_stride(kernel: &'static str, n: usize, args: Vec<Arg>) -> Option<KernelCall> {
    kl::elementwise(n as u64).map(|cfg| KernelCall::new(kernel, cfg, args))
}

pub(crate) fn rows_cfg(
    kernel: &'static str,
    rows: usize,
    cols: usize,
) -> Result<Option<LaunchConfig>> {
    kl::rows(kernel, rows as u64, cols as u64).map_err(shape_err)
}

pub(crate) fn run(ctx: &CudaContext, calls: &[KernelCall]) -> Result<()> {
    calls.iter().try_for_each(|c| c.launch(ctx))
}

pub(crate) fn view(t: &Tensor, op: &'static str) -> Result<CudaView> {
    t.cuda_view(op)
}

/// An uninitialised tensor on `ctx`'s GPU (filled with NaN when poisoning is on).
pub(crate) fn empty(ctx: &Arc<CudaContext>, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let buf = DeviceBuffer::alloc(ctx, elem_count(shape) * dtype.size_in_bytes())?;
    Ok(Tensor::from_device_buffer(buf, dtype, shape))
}

/// `t` in `dtype` (a cast on the device when it differs).
pub(crate) fn as_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        cast(t, dtype)
    }
}

/// The i32 values of `t` on the host (labels, masks): on a GPU, the host copy it was uploaded
/// with (no copy, no wait), or a download when a kernel computed it.
pub(crate) fn host_i32(t: &Tensor) -> Result<Vec<i32>> {
    match t.device() {
        Device::Cpu => Ok(t.read_i32()?.to_vec()),
        Device::Cuda(_) => t.to_vec::<i32>(),
    }
}

/// `t` (i32) on `ctx`'s GPU: itself when already there.
pub(crate) fn on_gpu_i32(ctx: &Arc<CudaContext>, t: &Tensor, host: &[i32]) -> Result<Tensor> {
    if t.device() == Device::Cuda(ctx.ordinal()) {
        return Ok(t.clone());
    }
    Tensor::from_slice(host, t.shape(), Device::Cuda(ctx.ordinal()))
}

// ---------------------------------------------------------------------------------------------
// Copies, casts, accumulation
// ---------------------------------------------------------------------------------------------

pub(crate) fn cast_plan(
    x: u64,
    y: u64,
    n: usize,
    from: DType,
    to: DType,
) -> Result<Vec<KernelCall>> {
    let k = match (from, to) {
        (DType::F32, DType::BF16) => names::elementwise::cast_f32_to_bf16,
        (DType::BF16, DType::F32) => names::elementwise::cast_bf16_to_f32,
        _ => {
            return Err(Error::invalid(
                "cast",
                format!("not implemented on CUDA yet: cast from {from} to {to}"),
            ))
        }
    };
    Ok(
        grid_stride(k, n, vec![Arg::Ptr(x), Arg::Ptr(y), Arg::U64(n as u64)])
            .into_iter()
            .collect(),
    )
}

/// `Tensor::cast` on a GPU: f32 ↔ bf16 (round to nearest even, as the CPU).
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = view(t, "cast")?;
    let out = empty(&x.ctx, dtype, t.shape())?;
    let y = view(&out, "cast")?;
    run(&x.ctx, &cast_plan(x.ptr, y.ptr, x.len, t.dtype(), dtype)?)?;
    Ok(out)
}

/// `Tensor::deep_copy` on a GPU. A copy of i32 values the host knows is known too.
pub(crate) fn deep_copy(t: &Tensor) -> Result<Tensor> {
    let x = view(t, "deep_copy")?;
    let out = match t.known_i32() {
        Some(values) => Tensor::from_device_buffer_with_host(
            DeviceBuffer::alloc(&x.ctx, x.bytes())?,
            t.dtype(),
            t.shape(),
            crate::host_copy::HostCopy::of(values),
        ),
        None => empty(&x.ctx, t.dtype(), t.shape())?,
    };
    super::copy_device_to_device(&view(&out, "deep_copy")?, &x)?;
    Ok(out)
}

/// `Tensor::copy_from` into a GPU tensor: from the host (converted there), from the same GPU
/// (copied or cast on the device), or from another GPU (through the host).
pub(crate) fn copy_into(dst: &Tensor, src: &Tensor) -> Result<()> {
    if dst.dtype() == DType::I32 || src.dtype() == DType::I32 {
        return Err(Error::DType {
            op: "copy_from",
            expected: DType::F32,
            got: DType::I32,
        });
    }
    let d = dst.cuda_view_mut("copy_from")?;
    match src.device() {
        Device::Cuda(n) if n == d.ctx.ordinal() => {
            let s = view(src, "copy_from")?;
            if src.dtype() == dst.dtype() {
                if src.same_storage(dst) && s.ptr == d.ptr {
                    return Ok(());
                }
                super::copy_device_to_device(&d, &s)
            } else {
                run(
                    &d.ctx,
                    &cast_plan(s.ptr, d.ptr, d.len, src.dtype(), dst.dtype())?,
                )
            }
        }
        _ => {
            let host = src.to_device(Device::Cpu)?.cast(dst.dtype())?;
            super::copy_to_device(&d, &host.to_bytes()?)
        }
    }
}

pub(crate) fn accumulate_plan(
    src: u64,
    dst: u64,
    n: usize,
    src_dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("accumulate", kernel_suffix("add_assign", src_dtype)?)?;
    Ok(
        grid_stride(k, n, vec![Arg::Ptr(src), Arg::Ptr(dst), Arg::U64(n as u64)])
            .into_iter()
            .collect(),
    )
}

/// `Tensor::add_assign` on a GPU: `dst` (f32) += `src` (f32 or bf16).
pub(crate) fn accumulate(dst: &Tensor, src: &Tensor) -> Result<()> {
    dst.expect_dtype("add_assign", DType::F32)?;
    src.expect_float("add_assign")?;
    // Overlapping views of one buffer at different offsets would race; copy the source.
    let src = if dst.same_storage(src) && dst.offset() != src.offset() {
        deep_copy(src)?
    } else {
        src.clone()
    };
    let (d, s) = (dst.cuda_view_mut("add_assign")?, view(&src, "add_assign")?);
    run(&d.ctx, &accumulate_plan(s.ptr, d.ptr, d.len, src.dtype())?)
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

pub(crate) fn float_inputs(op: &'static str, xs: &[&Tensor]) -> Result<DType> {
    let dtype = xs[0].dtype();
    for x in xs {
        x.expect_float(op)?;
        if x.dtype() != dtype {
            return Err(Error::DType {
                op,
                expected: dtype,
                got: x.dtype(),
            });
        }
    }
    Ok(dtype)
}

pub(crate) fn binary_plan(
    op: BinaryOp,
    a: u64,
    b: u64,
    out: u64,
    n: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(op.name(), kernel_suffix(op.name(), dtype)?)?;
    let args = vec![Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(out), Arg::U64(n as u64)];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

fn binary_raw(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dtype = float_inputs(op.name(), &[a, b])?;
    let (av, bv) = (view(a, op.name())?, view(b, op.name())?);
    let out = empty(&av.ctx, dtype, a.shape())?;
    let ov = view(&out, op.name())?;
    run(
        &av.ctx,
        &binary_plan(op, av.ptr, bv.ptr, ov.ptr, av.len, dtype)?,
    )?;
    Ok(out)
}

pub(crate) fn scalar_plan(
    base: &'static str,
    x: u64,
    out: u64,
    n: usize,
    s: f32,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(base, kernel_suffix(base, dtype)?)?;
    let args = vec![Arg::Ptr(x), Arg::Ptr(out), Arg::U64(n as u64), Arg::F32(s)];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

pub(crate) fn scalar_raw(base: &'static str, x: &Tensor, s: f32) -> Result<Tensor> {
    let dtype = float_inputs(base, &[x])?;
    let xv = view(x, base)?;
    let out = empty(&xv.ctx, dtype, x.shape())?;
    run(
        &xv.ctx,
        &scalar_plan(base, xv.ptr, view(&out, base)?.ptr, xv.len, s, dtype)?,
    )?;
    Ok(out)
}

/// The CUDA arm of `add` / `sub` / `mul`: same shapes and dtypes (broadcasting: not yet).
pub(crate) fn binary(tape: &Tape, op: BinaryOp, a: &Var, b: &Var) -> Result<Var> {
    let name = op.name();
    common_device(name, &[a.tensor(), b.tensor()])?;
    if a.shape() != b.shape() {
        let out_shape =
            crate::ops::elementwise::broadcast_shape(a.shape(), b.shape()).ok_or_else(|| {
                Error::shape(
                    name,
                    format!(
                        "shapes {:?} and {:?} do not broadcast",
                        a.shape(),
                        b.shape()
                    ),
                )
            })?;
        return super::layout::broadcast_binary(tape, op, a, b, out_shape);
    }
    let out = binary_raw(op, a.tensor(), b.tensor())?;
    let dtype = out.dtype();
    let saved = (op == BinaryOp::Mul).then(|| (a.tensor().clone(), b.tensor().clone()));
    Ok(tape.record(
        out,
        &[a, b],
        Box::new(move |g, needs| {
            let g = as_dtype(g, dtype)?;
            let (ga, gb) = match (&saved, op) {
                (Some((av, bv)), BinaryOp::Mul) => (
                    needs[0]
                        .then(|| binary_raw(BinaryOp::Mul, &g, bv))
                        .transpose()?,
                    needs[1]
                        .then(|| binary_raw(BinaryOp::Mul, &g, av))
                        .transpose()?,
                ),
                _ => (
                    needs[0].then(|| g.clone()),
                    needs[1]
                        .then(|| {
                            if op == BinaryOp::Sub {
                                scalar_raw("scale", &g, -1.0)
                            } else {
                                Ok(g.clone())
                            }
                        })
                        .transpose()?,
                ),
            };
            Ok(vec![ga, gb])
        }),
    ))
}

/// The CUDA arm of `scale` (`s * x`) and `add_scalar` (`x + s`).
pub(crate) fn scalar_op(tape: &Tape, base: &'static str, x: &Var, s: f32) -> Result<Var> {
    let out = scalar_raw(base, x.tensor(), s)?;
    let dtype = out.dtype();
    let is_scale = base == "scale";
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| {
                    if is_scale {
                        scalar_raw("scale", &as_dtype(g, dtype)?, s)
                    } else {
                        Ok(g.clone())
                    }
                })
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

/// `bias_add` forward: `channel_add` over `[outer, c, inner]`.
pub(crate) fn channel_add_plan(
    x: u64,
    v: u64,
    out: u64,
    outer: usize,
    c: usize,
    inner: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("channel_add", kernel_suffix("bias_add", dtype)?)?;
    let cfg = kl::channel_rows(k, outer as u64, c as u64, inner as u64).map_err(shape_err)?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(v),
        Arg::Ptr(out),
        Arg::u32(k, "the number of channels", c)?,
        Arg::u32(k, "the inner size", inner)?,
    ];
    Ok(cfg
        .map(|cfg| KernelCall::new(k, cfg, args))
        .into_iter()
        .collect())
}

/// `bias_add` backward for the bias: the sum of `g` over `outer` and `inner` per channel, into
/// `out` (f32 `[c]`), overwritten.
pub(crate) fn channel_sum_plan(
    g: u64,
    out: u64,
    outer: usize,
    c: usize,
    inner: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let s = kernel_suffix("bias_add", dtype)?;
    if inner == 1 {
        let k = kernel("channel_sum_last", s)?;
        let cfg = kl::channel_sum_last(k, outer as u64, c as u64).map_err(shape_err)?;
        let args = vec![
            Arg::Ptr(g),
            Arg::Ptr(0),
            Arg::Ptr(out),
            Arg::u32(k, "the number of rows", outer)?,
            Arg::u32(k, "the number of columns", c)?,
            Arg::I32(0),
        ];
        Ok(cfg
            .map(|cfg| KernelCall::new(k, cfg, args))
            .into_iter()
            .collect())
    } else {
        let k = kernel("channel_sum", s)?;
        let cfg = kl::channel_sum(k, outer as u64, c as u64, inner as u64).map_err(shape_err)?;
        let args = vec![
            Arg::Ptr(g),
            Arg::Ptr(0),
            Arg::Ptr(out),
            Arg::u32(k, "the number of planes", outer)?,
            Arg::u32(k, "the number of channels", c)?,
            Arg::u32(k, "the plane size", inner)?,
            Arg::I32(0),
        ];
        Ok(cfg
            .map(|cfg| KernelCall::new(k, cfg, args))
            .into_iter()
            .collect())
    }
}

/// The CUDA arm of `bias_add` (shapes already validated by the caller).
pub(crate) fn bias_add(tape: &Tape, x: &Var, bias: &Var, c: usize, inner: usize) -> Result<Var> {
    common_device("bias_add", &[x.tensor(), bias.tensor()])?;
    let dtype = float_inputs("bias_add", &[x.tensor(), bias.tensor()])?;
    let xv = view(x.tensor(), "bias_add")?;
    let bv = view(bias.tensor(), "bias_add")?;
    let outer = xv.len.checked_div(c * inner).unwrap_or(0);
    let out = empty(&xv.ctx, dtype, x.shape())?;
    run(
        &xv.ctx,
        &channel_add_plan(
            xv.ptr,
            bv.ptr,
            view(&out, "bias_add")?.ptr,
            outer,
            c,
            inner,
            dtype,
        )?,
    )?;
    Ok(tape.record(
        out,
        &[x, bias],
        Box::new(move |g, needs| {
            let g = as_dtype(g, dtype)?;
            let gx = needs[0].then(|| g.clone());
            let gb = needs[1]
                .then(|| -> Result<Tensor> {
                    let gv = view(&g, "bias_add backward")?;
                    let db = empty(&gv.ctx, DType::F32, &[c])?;
                    let dv = view(&db, "bias_add backward")?;
                    run(
                        &gv.ctx,
                        &channel_sum_plan(gv.ptr, dv.ptr, outer, c, inner, dtype)?,
                    )?;
                    Ok(db)
                })
                .transpose()?;
            Ok(vec![gx, gb])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

/// Which saved value an activation's backward kernel reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Saved {
    Input,
    Output,
}

/// The saved value of each activation kernel's backward.
pub(crate) fn activation_saved(op: &str) -> Result<Saved> {
    match op {
        "relu" | "tanh" => Ok(Saved::Output),
        "gelu" => Ok(Saved::Input),
        other => Err(Error::invalid(
            "activation",
            format!("not implemented on CUDA yet: {other}"),
        )),
    }
}

pub(crate) fn activation_fwd_plan(
    op: &str,
    x: u64,
    y: u64,
    n: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(&format!("{op}_fwd"), kernel_suffix("activation", dtype)?)?;
    Ok(
        grid_stride(k, n, vec![Arg::Ptr(x), Arg::Ptr(y), Arg::U64(n as u64)])
            .into_iter()
            .collect(),
    )
}

pub(crate) fn activation_bwd_plan(
    op: &str,
    saved: u64,
    g: u64,
    dx: u64,
    n: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel(&format!("{op}_bwd"), kernel_suffix("activation", dtype)?)?;
    let args = vec![
        Arg::Ptr(saved),
        Arg::Ptr(g),
        Arg::Ptr(dx),
        Arg::U64(n as u64),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// The CUDA arm of `relu`, `gelu`, `tanh`.
pub(crate) fn activation(tape: &Tape, op: &'static str, x: &Var) -> Result<Var> {
    let saved_kind = activation_saved(op)?;
    let dtype = float_inputs(op, &[x.tensor()])?;
    let xv = view(x.tensor(), op)?;
    let out = empty(&xv.ctx, dtype, x.shape())?;
    run(
        &xv.ctx,
        &activation_fwd_plan(op, xv.ptr, view(&out, op)?.ptr, xv.len, dtype)?,
    )?;
    let keep = match saved_kind {
        Saved::Input => x.tensor().clone(),
        Saved::Output => out.clone(),
    };
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| -> Result<Tensor> {
                    let g = as_dtype(g, dtype)?;
                    let (sv, gv) = (view(&keep, op)?, view(&g, op)?);
                    let dx = empty(&sv.ctx, dtype, g.shape())?;
                    let dv = view(&dx, op)?;
                    run(
                        &sv.ctx,
                        &activation_bwd_plan(op, sv.ptr, gv.ptr, dv.ptr, sv.len, dtype)?,
                    )?;
                    Ok(dx)
                })
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Softmax
// ---------------------------------------------------------------------------------------------

pub(crate) fn softmax_fwd_plan(
    log: bool,
    x: u64,
    y: u64,
    rows: usize,
    cols: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let base = if log {
        "log_softmax_fwd"
    } else {
        "softmax_fwd"
    };
    let k = kernel(base, kernel_suffix("softmax", dtype)?)?;
    let args = vec![
        Arg::Ptr(x),
        Arg::Ptr(y),
        Arg::u32(k, "the row length", cols)?,
    ];
    Ok(rows_cfg(k, rows, cols)?
        .map(|cfg| KernelCall::new(k, cfg, args))
        .into_iter()
        .collect())
}

pub(crate) fn softmax_bwd_plan(
    log: bool,
    y: u64,
    dy: u64,
    dx: u64,
    rows: usize,
    cols: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let base = if log {
        "log_softmax_bwd"
    } else {
        "softmax_bwd"
    };
    let k = kernel(base, kernel_suffix("softmax", dtype)?)?;
    let args = vec![
        Arg::Ptr(y),
        Arg::Ptr(dy),
        Arg::Ptr(dx),
        Arg::u32(k, "the row length", cols)?,
    ];
    Ok(rows_cfg(k, rows, cols)?
        .map(|cfg| KernelCall::new(k, cfg, args))
        .into_iter()
        .collect())
}

/// The CUDA arm of `softmax` / `log_softmax` over the last dimension (rank checked by the
/// caller).
pub(crate) fn softmax(tape: &Tape, x: &Var, log: bool) -> Result<Var> {
    let op = if log { "log_softmax" } else { "softmax" };
    let dtype = float_inputs(op, &[x.tensor()])?;
    let cols = *x.shape().last().unwrap_or(&1);
    let rows = x.tensor().elem_count().checked_div(cols).unwrap_or(0);
    let xv = view(x.tensor(), op)?;
    let out = empty(&xv.ctx, dtype, x.shape())?;
    run(
        &xv.ctx,
        &softmax_fwd_plan(log, xv.ptr, view(&out, op)?.ptr, rows, cols, dtype)?,
    )?;
    let y = out.clone();
    Ok(tape.record(
        out,
        &[x],
        Box::new(move |g, needs| {
            let gx = needs[0]
                .then(|| -> Result<Tensor> {
                    let g = as_dtype(g, dtype)?;
                    let (yv, gv) = (view(&y, op)?, view(&g, op)?);
                    let dx = empty(&yv.ctx, dtype, g.shape())?;
                    let plan = softmax_bwd_plan(
                        log,
                        yv.ptr,
                        gv.ptr,
                        view(&dx, op)?.ptr,
                        rows,
                        cols,
                        dtype,
                    )?;
                    run(&yv.ctx, &plan)?;
                    Ok(dx)
                })
                .transpose()?;
            Ok(vec![gx])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Forward: per-row lse and loss, then the mean over `kept` rows into `out[0]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_entropy_fwd_plan(
    logits: u64,
    labels: u64,
    lse: u64,
    row_loss: u64,
    out: u64,
    rows: usize,
    classes: usize,
    kept: usize,
    opts: &CrossEntropyOptions,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("cross_entropy_fwd", kernel_suffix("cross_entropy", dtype)?)?;
    let mut calls = Vec::new();
    if let Some(cfg) = rows_cfg(k, rows, classes)? {
        calls.push(KernelCall::new(
            k,
            cfg,
            vec![
                Arg::Ptr(logits),
                Arg::Ptr(labels),
                Arg::Ptr(lse),
                Arg::Ptr(row_loss),
                Arg::u32(k, "the number of classes", classes)?,
                Arg::I32(opts.ignore_index.unwrap_or(0)),
                Arg::I32(opts.ignore_index.is_some() as i32),
                Arg::F32(opts.label_smoothing),
            ],
        ));
    }
    let r = names::cross_entropy::cross_entropy_reduce;
    calls.push(KernelCall::new(
        r,
        kl::single_block(),
        vec![
            Arg::Ptr(row_loss),
            Arg::u32(r, "the number of rows", rows)?,
            Arg::u32(r, "the number of kept rows", kept)?,
            Arg::Ptr(out),
        ],
    ));
    Ok(calls)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_entropy_bwd_plan(
    logits: u64,
    labels: u64,
    lse: u64,
    dlogits: u64,
    rows: usize,
    classes: usize,
    opts: &CrossEntropyOptions,
    scale: f32,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("cross_entropy_bwd", kernel_suffix("cross_entropy", dtype)?)?;
    let args = vec![
        Arg::Ptr(logits),
        Arg::Ptr(labels),
        Arg::Ptr(lse),
        Arg::Ptr(dlogits),
        Arg::u32(k, "the number of classes", classes)?,
        Arg::I32(opts.ignore_index.unwrap_or(0)),
        Arg::I32(opts.ignore_index.is_some() as i32),
        Arg::F32(opts.label_smoothing),
        Arg::F32(scale),
    ];
    Ok(rows_cfg(k, rows, classes)?
        .map(|cfg| KernelCall::new(k, cfg, args))
        .into_iter()
        .collect())
}

/// The CUDA arm of `cross_entropy` (shapes and options validated by the caller). The labels
/// are checked on the host (copied back when they are on the GPU), as the CPU op does; the
/// backward reads the upstream gradient (a scalar) back to the host to fold it into the scale.
pub(crate) fn cross_entropy(
    tape: &Tape,
    logits: &Var,
    labels: &Tensor,
    opts: CrossEntropyOptions,
) -> Result<Var> {
    const OP: &str = "cross_entropy";
    let lt = logits.tensor();
    let dtype = float_inputs(OP, &[lt])?;
    let (rows, classes) = (lt.shape()[0], lt.shape()[1]);
    let labels_host = host_i32(labels)?;
    let kept = cross_entropy_check_labels_cpu(&labels_host, classes, opts.ignore_index)?;
    let lv = view(lt, OP)?;
    let ctx = lv.ctx.clone();
    let labels_dev = on_gpu_i32(&ctx, labels, &labels_host)?;
    let lse = empty(&ctx, DType::F32, &[rows])?;
    let row_loss = empty(&ctx, DType::F32, &[rows])?;
    let out = empty(&ctx, DType::F32, &[])?;
    let plan = cross_entropy_fwd_plan(
        lv.ptr,
        view(&labels_dev, OP)?.ptr,
        view(&lse, OP)?.ptr,
        view(&row_loss, OP)?.ptr,
        view(&out, OP)?.ptr,
        rows,
        classes,
        kept,
        &opts,
        dtype,
    )?;
    run(&ctx, &plan)?;
    let saved = lt.clone();
    Ok(tape.record(
        out,
        &[logits],
        Box::new(move |g, needs| {
            if !needs[0] {
                return Ok(vec![None]);
            }
            let upstream = g.to_scalar_f32()?;
            let scale = if kept == 0 {
                0.0
            } else {
                upstream / kept as f32
            };
            let sv = view(&saved, OP)?;
            let d = empty(&sv.ctx, dtype, saved.shape())?;
            let plan = cross_entropy_bwd_plan(
                sv.ptr,
                view(&labels_dev, OP)?.ptr,
                view(&lse, OP)?.ptr,
                view(&d, OP)?.ptr,
                rows,
                classes,
                &opts,
                scale,
                dtype,
            )?;
            run(&sv.ctx, &plan)?;
            Ok(vec![Some(d)])
        }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Optimizers (fused over the flat buffer)
// ---------------------------------------------------------------------------------------------

/// `working`: the bf16 working copy the kernel rewrites in the same pass (0: none).
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgdw_plan(
    param: u64,
    grad: u64,
    momentum_buf: u64,
    working: u64,
    n: usize,
    s: &SgdwStep,
    grad_dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("sgdw_step", kernel_suffix("Sgdw::step", grad_dtype)?)?;
    let args = vec![
        Arg::Ptr(param),
        Arg::Ptr(grad),
        Arg::Ptr(momentum_buf),
        Arg::Ptr(working),
        Arg::U64(n as u64),
        Arg::F32(s.lr),
        Arg::F32(s.decay),
        Arg::F32(s.momentum),
        Arg::F32(s.grad_weight),
        Arg::I32(s.nesterov as i32),
        Arg::I32(s.first as i32),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn adamw_plan(
    param: u64,
    grad: u64,
    exp_avg: u64,
    exp_avg_sq: u64,
    working: u64,
    n: usize,
    s: &AdamWStep,
    grad_dtype: DType,
) -> Result<Vec<KernelCall>> {
    let k = kernel("adamw_step", kernel_suffix("AdamW::step", grad_dtype)?)?;
    let args = vec![
        Arg::Ptr(param),
        Arg::Ptr(grad),
        Arg::Ptr(exp_avg),
        Arg::Ptr(exp_avg_sq),
        Arg::Ptr(working),
        Arg::U64(n as u64),
        Arg::F32(s.decay),
        Arg::F32(s.grad_weight),
        Arg::F32(s.beta2),
        Arg::F32(s.sq_weight),
        Arg::F32(s.neg_step_size),
        Arg::F32(s.bias_correction2_sqrt),
        Arg::F32(s.eps),
    ];
    Ok(grid_stride(k, n, args).into_iter().collect())
}

/// The device address of the bf16 working copy the optimizer kernels rewrite (0 without
/// one), after checking that it is bf16, as long as the master and on its GPU.
fn working_ptr(op: &'static str, values: &Tensor, working: Option<&Tensor>) -> Result<u64> {
    let Some(w) = working else {
        return Ok(0);
    };
    w.expect_dtype(op, DType::BF16)?;
    common_device(op, &[values, w])?;
    if w.elem_count() != values.elem_count() {
        return Err(Error::shape(
            op,
            format!(
                "the bf16 working copy has {} elements, the parameter buffer {}",
                w.elem_count(),
                values.elem_count()
            ),
        ));
    }
    Ok(w.cuda_view_mut(op)?.ptr)
}

/// One fused SGDW step over a flat buffer on a GPU; `momentum` is the f32 state on the same
/// GPU (checked by the optimizer); `working`, the bf16 working copy, is rewritten from the
/// updated master in the same launch.
pub(crate) fn sgdw_step(
    values: &Tensor,
    grads: &Tensor,
    momentum: &Tensor,
    working: Option<&Tensor>,
    s: &SgdwStep,
) -> Result<()> {
    const OP: &str = "Sgdw::step";
    common_device(OP, &[values, grads, momentum])?;
    let w = working_ptr(OP, values, working)?;
    // Parameters and state are written in place (`cuda_view_mut`); the gradient is read.
    let (p, g, m) = (
        values.cuda_view_mut(OP)?,
        view(grads, OP)?,
        momentum.cuda_view_mut(OP)?,
    );
    run(
        &p.ctx,
        &sgdw_plan(p.ptr, g.ptr, m.ptr, w, p.len, s, grads.dtype())?,
    )
}

/// One fused AdamW step over a flat buffer on a GPU, rewriting the bf16 working copy (when
/// there is one) in the same launch.
pub(crate) fn adamw_step(
    values: &Tensor,
    grads: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    working: Option<&Tensor>,
    s: &AdamWStep,
) -> Result<()> {
    const OP: &str = "AdamW::step";
    common_device(OP, &[values, grads, exp_avg, exp_avg_sq])?;
    let w = working_ptr(OP, values, working)?;
    let (p, g, m, v) = (
        values.cuda_view_mut(OP)?,
        view(grads, OP)?,
        exp_avg.cuda_view_mut(OP)?,
        exp_avg_sq.cuda_view_mut(OP)?,
    );
    run(
        &p.ctx,
        &adamw_plan(p.ptr, g.ptr, m.ptr, v.ptr, w, p.len, s, grads.dtype())?,
    )
}

// ---------------------------------------------------------------------------------------------
// The fused distillation loss
// ---------------------------------------------------------------------------------------------

fn storage_of(op: &'static str, dtype: DType) -> Result<kdh::Storage> {
    match dtype {
        DType::F32 => Ok(kdh::Storage::F32),
        DType::BF16 => Ok(kdh::Storage::Bf16),
        DType::I32 => Err(Error::DType {
            op,
            expected: DType::F32,
            got: DType::I32,
        }),
    }
}

/// The row kernel and the reduction of the fused loss. `teachers` empty (and `row_kd` 0) for
/// the CE-only kernel; `mask` 0 when every row counts.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kd_loss_plan(
    kernel: &'static str,
    logits: u64,
    grad: u64,
    teachers: &[u64],
    labels: u64,
    mask: u64,
    row_ce: u64,
    row_kd: u64,
    out: u64,
    rows: usize,
    classes: usize,
    ignore_index: i32,
    s: &KdScalars,
) -> Result<Vec<KernelCall>> {
    let tl = if teachers.is_empty() {
        TeacherLogits::default()
    } else {
        TeacherLogits::new(teachers).map_err(|e| Error::invalid("kd_loss", e.to_string()))?
    };
    let mut calls = Vec::new();
    if let Some(cfg) = rows_cfg(kernel, rows, classes)? {
        calls.push(KernelCall::new(
            kernel,
            cfg,
            vec![
                Arg::Ptr(logits),
                Arg::Ptr(grad),
                Arg::Teachers(tl),
                Arg::U32(teachers.len() as u32),
                Arg::Ptr(labels),
                Arg::Ptr(mask),
                Arg::Ptr(row_ce),
                Arg::Ptr(row_kd),
                Arg::u32(kernel, "the number of classes", classes)?,
                Arg::I32(ignore_index),
                Arg::F32(s.inv_t),
                Arg::F32(s.t_sq),
                Arg::F32(s.grad_ce_weight),
                Arg::F32(s.grad_kd_scale),
            ],
        ));
    }
    let r = names::kd_loss::kd_loss_reduce;
    calls.push(KernelCall::new(
        r,
        kl::single_block(),
        vec![
            Arg::Ptr(row_ce),
            Arg::Ptr(row_kd),
            Arg::u32(r, "the number of rows", rows)?,
            Arg::F32(s.ce_weight),
            Arg::F32(s.kd_weight),
            Arg::F32(s.lambda),
            Arg::Ptr(out),
        ],
    ));
    Ok(calls)
}

/// See [`super::kd_loss`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn kd_loss(
    term: Option<KdTerm>,
    lambda: f32,
    ignore_index: i32,
    student: &Tensor,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
    upstream: f32,
) -> Result<KdLossDevice> {
    const OP: &str = "kd_loss";
    student.expect_rank(OP, "student logits", 2)?;
    labels.expect_dtype(OP, DType::I32)?;
    let (rows, classes) = (student.shape()[0], student.shape()[1]);
    if labels.shape() != [rows] {
        return Err(Error::shape(
            OP,
            format!(
                "labels {:?} do not match student logits {:?}",
                labels.shape(),
                student.shape()
            ),
        ));
    }
    let mut on_gpu: Vec<&Tensor> = vec![student];
    on_gpu.extend(teachers.iter());
    common_device(OP, &on_gpu)?;
    for (j, t) in teachers.iter().enumerate() {
        if t.shape() != student.shape() {
            return Err(Error::shape(
                OP,
                format!(
                    "teacher {j} logits {:?} differ from student logits {:?}",
                    t.shape(),
                    student.shape()
                ),
            ));
        }
    }
    let labels_host = host_i32(labels)?;
    let mask_host: Option<Vec<i32>> = match mask {
        None => None,
        Some(m) => {
            if m.shape() != [rows] {
                return Err(Error::shape(
                    OP,
                    format!("mask {:?} does not match {rows} rows", m.shape()),
                ));
            }
            Some(match m.dtype() {
                DType::I32 => host_i32(m)?,
                _ => m.to_vec_f32()?.iter().map(|&v| (v != 0.0) as i32).collect(),
            })
        }
    };
    let ker_term = match (term, teachers.is_empty() || lambda == 0.0) {
        (_, true) | (None, _) => None,
        (Some(KdTerm::Kl { temperature }), false) => Some(kdh::KdTerm::Kl { temperature }),
        (Some(KdTerm::Mse), false) => Some(kdh::KdTerm::Mse),
    };
    let kd = |e: kdh::KdError| Error::invalid(OP, e.0);
    let (ce_rows, kd_rows) = kdh::row_counts(
        &labels_host,
        mask_host.as_deref(),
        classes,
        ignore_index,
        ker_term.is_some(),
    )
    .map_err(kd)?;
    let s = KdScalars::new(ker_term, lambda, ce_rows, kd_rows, classes, upstream).map_err(kd)?;
    let student_storage = storage_of(OP, student.dtype())?;
    let teacher_storage = match teachers.first() {
        Some(t) => {
            let st = storage_of(OP, t.dtype())?;
            if teachers.iter().any(|u| u.dtype() != t.dtype()) {
                return Err(Error::invalid(
                    OP,
                    "the teachers' logits differ in dtype".to_string(),
                ));
            }
            st
        }
        None => student_storage,
    };
    let active_term = if s.kd_active() { ker_term } else { None };
    let kernel = kdh::kernel_name(active_term, student_storage, teacher_storage).map_err(kd)?;

    let sv = view(student, OP)?;
    let ctx = sv.ctx.clone();
    let labels_dev = on_gpu_i32(&ctx, labels, &labels_host)?;
    let mask_dev = match &mask_host {
        Some(m) => Some(Tensor::from_slice(m, &[rows], Device::Cuda(ctx.ordinal()))?),
        None => None,
    };
    let grad = empty(&ctx, student.dtype(), student.shape())?;
    let row_ce = empty(&ctx, DType::F32, &[rows])?;
    let row_kd = if active_term.is_some() {
        Some(empty(&ctx, DType::F32, &[rows])?)
    } else {
        None
    };
    let out = empty(&ctx, DType::F32, &[3])?;
    let teacher_ptrs: Vec<u64> = if active_term.is_some() {
        teachers
            .iter()
            .map(|t| view(t, OP).map(|v| v.ptr))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let ptr = |t: &Option<Tensor>| -> Result<u64> {
        t.as_ref()
            .map(|t| view(t, OP).map(|v| v.ptr))
            .unwrap_or(Ok(0))
    };
    let plan = kd_loss_plan(
        kernel,
        sv.ptr,
        view(&grad, OP)?.ptr,
        &teacher_ptrs,
        view(&labels_dev, OP)?.ptr,
        ptr(&mask_dev)?,
        view(&row_ce, OP)?.ptr,
        ptr(&row_kd)?,
        view(&out, OP)?.ptr,
        rows,
        classes,
        ignore_index,
        &s,
    )?;
    run(&ctx, &plan)?;
    let totals = out.to_vec::<f32>()?;
    Ok(KdLossDevice {
        ce: totals[0],
        kd: totals[1],
        total: totals[2],
        grad,
        ce_rows,
        kd_rows: if active_term.is_some() { kd_rows } else { 0 },
    })
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

    /// Every plan, for both storage types and a few shapes, matches the kernels' ABI.
    #[test]
    fn every_plan_matches_the_kernel_abi() {
        for dt in [DType::F32, DType::BF16] {
            for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                check_all(&binary_plan(op, 1, 2, 3, 1000, dt).unwrap());
            }
            check_all(&scalar_plan("scale", 1, 2, 10, 0.5, dt).unwrap());
            check_all(&scalar_plan("add_scalar", 1, 2, 10, 0.5, dt).unwrap());
            check_all(&accumulate_plan(1, 2, 10, dt).unwrap());
            check_all(&channel_add_plan(1, 2, 3, 8, 64, 49, dt).unwrap());
            check_all(&channel_add_plan(1, 2, 3, 32, 768, 1, dt).unwrap());
            check_all(&channel_sum_plan(1, 2, 8, 64, 49, dt).unwrap());
            check_all(&channel_sum_plan(1, 2, 32, 768, 1, dt).unwrap());
            for op in ["relu", "gelu", "tanh"] {
                check_all(&activation_fwd_plan(op, 1, 2, 10, dt).unwrap());
                check_all(&activation_bwd_plan(op, 1, 2, 3, 10, dt).unwrap());
            }
            for log in [false, true] {
                check_all(&softmax_fwd_plan(log, 1, 2, 4, 30_522, dt).unwrap());
                check_all(&softmax_bwd_plan(log, 1, 2, 3, 4, 10, dt).unwrap());
            }
            let opts = CrossEntropyOptions::default();
            check_all(&cross_entropy_fwd_plan(1, 2, 3, 4, 5, 8, 10, 7, &opts, dt).unwrap());
            check_all(&cross_entropy_bwd_plan(1, 2, 3, 4, 8, 10, &opts, 0.1, dt).unwrap());
            let sg = SgdwStep {
                lr: 0.1,
                decay: 0.99,
                momentum: 0.875,
                grad_weight: 1.0,
                nesterov: false,
                first: true,
            };
            check_all(&sgdw_plan(1, 2, 3, 0, 100, &sg, dt).unwrap());
            check_all(&sgdw_plan(1, 2, 3, 9, 100, &sg, dt).unwrap());
            let ad = AdamWStep {
                decay: 1.0,
                grad_weight: 0.1,
                beta2: 0.999,
                sq_weight: 0.001,
                neg_step_size: -0.01,
                bias_correction2_sqrt: 0.5,
                eps: 1e-8,
            };
            check_all(&adamw_plan(1, 2, 3, 4, 0, 100, &ad, dt).unwrap());
            check_all(&adamw_plan(1, 2, 3, 4, 9, 100, &ad, dt).unwrap());
        }
        check_all(&cast_plan(1, 2, 10, DType::F32, DType::BF16).unwrap());
        check_all(&cast_plan(1, 2, 10, DType::BF16, DType::F32).unwrap());
        assert!(cast_plan(1, 2, 10, DType::I32, DType::F32).is_err());
        assert!(binary_plan(BinaryOp::Add, 1, 2, 3, 10, DType::I32).is_err());
    }

    /// The optimizer plans hand the kernels the bf16 working copy's address in the parameter
    /// the ABI table calls `working`, and null without one; the pointers before it are the
    /// master, the gradient and the state, in order.
    #[test]
    fn optimizer_plans_pass_the_working_copy() {
        let sg = SgdwStep {
            lr: 0.1,
            decay: 1.0,
            momentum: 0.875,
            grad_weight: 1.0,
            nesterov: false,
            first: false,
        };
        let ad = AdamWStep {
            decay: 1.0,
            grad_weight: 0.1,
            beta2: 0.999,
            sq_weight: 0.001,
            neg_step_size: -0.01,
            bias_correction2_sqrt: 0.5,
            eps: 1e-8,
        };
        for dt in [DType::F32, DType::BF16] {
            for working in [0u64, 0xbf16_0000] {
                let s = &sgdw_plan(1, 2, 3, working, 100, &sg, dt).unwrap()[0];
                let a = &adamw_plan(1, 2, 3, 4, working, 100, &ad, dt).unwrap()[0];
                for (call, before) in [(s, vec![1, 2, 3]), (a, vec![1, 2, 3, 4])] {
                    let slot = recycle_kernels::abi::params(call.kernel)
                        .unwrap()
                        .split(", ")
                        .position(|p| p == "ptr working")
                        .unwrap();
                    assert_eq!(slot, before.len(), "{}", call.kernel);
                    assert_eq!(call.args[slot], Arg::Ptr(working), "{}", call.kernel);
                    let want: Vec<Arg> = before.into_iter().map(Arg::Ptr).collect();
                    assert_eq!(call.args[..slot], want[..], "{}", call.kernel);
                }
            }
        }
    }

    #[test]
    fn kd_loss_plans_for_every_kernel() {
        let s = KdScalars::new(
            Some(kdh::KdTerm::Kl { temperature: 2.0 }),
            0.5,
            3,
            4,
            10,
            1.0,
        )
        .unwrap();
        for (term, st, tt) in [
            (
                Some(kdh::KdTerm::Kl { temperature: 2.0 }),
                kdh::Storage::Bf16,
                kdh::Storage::Bf16,
            ),
            (
                Some(kdh::KdTerm::Kl { temperature: 2.0 }),
                kdh::Storage::F32,
                kdh::Storage::F32,
            ),
            (
                Some(kdh::KdTerm::Mse),
                kdh::Storage::F32,
                kdh::Storage::Bf16,
            ),
            (None, kdh::Storage::F32, kdh::Storage::F32),
        ] {
            let k = kdh::kernel_name(term, st, tt).unwrap();
            let teachers: &[u64] = if term.is_some() { &[10, 11] } else { &[] };
            let plan = kd_loss_plan(k, 1, 2, teachers, 3, 0, 4, 5, 6, 8, 30_522, -100, &s).unwrap();
            assert_eq!(plan.len(), 2);
            check_all(&plan);
        }
        // Nine teachers: more than the kernel averages.
        let k = names::kd_loss::kd_loss_kl_f32_f32;
        assert!(kd_loss_plan(k, 1, 2, &[1; 9], 3, 0, 4, 5, 6, 8, 10, -100, &s).is_err());
        // No rows: only the reduction runs (it writes zeros).
        let plan = kd_loss_plan(k, 1, 2, &[1], 3, 0, 4, 5, 6, 0, 10, -100, &s).unwrap();
        assert_eq!(plan.len(), 1);
        check_all(&plan);
    }

    #[test]
    fn empty_shapes_launch_nothing_and_huge_ones_are_errors() {
        assert!(binary_plan(BinaryOp::Add, 1, 2, 3, 0, DType::F32)
            .unwrap()
            .is_empty());
        assert!(softmax_fwd_plan(false, 1, 2, 0, 10, DType::F32)
            .unwrap()
            .is_empty());
        assert!(softmax_fwd_plan(false, 1, 2, 4, 1 << 33, DType::F32).is_err());
        assert!(channel_add_plan(1, 2, 3, 4, 1 << 33, 1, DType::F32).is_err());
        assert!(activation_saved("conv2d").is_err());
        assert_eq!(kernel("relu_fwd", "bf16").unwrap(), "relu_fwd_bf16");
        assert!(kernel("relu_fwd", "f16").is_err());
    }
}
