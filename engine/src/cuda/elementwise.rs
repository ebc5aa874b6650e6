//! The CUDA arm of the elementwise ops (`add`, `sub`, `mul` of equal shapes, `scale`,
//! `add_scalar`, `bias_add`), the activations (`relu`, `gelu`, `tanh`), and the tensor copies,
//! casts and accumulation (`Tensor::deep_copy`, `cast`, `copy_from`, `add_assign`): the
//! `elementwise` kernel family (`elementwise.cu`). Broadcasting binary ops go to `layout.rs`.
//! **Compiled, not run on a GPU.**

use recycle_kernels::launch as kl;
use recycle_kernels::names;

use super::common::{as_dtype, empty, grid_stride, kernel, run, view};
use super::launch::{shape_err, Arg, KernelCall};
use super::{common_device, kernel_suffix, DeviceBuffer};
use crate::ops::elementwise::BinaryOp;
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

// ---------------------------------------------------------------------------------------------
// Copies, casts, accumulation
// ---------------------------------------------------------------------------------------------

fn cast_plan(x: u64, y: u64, n: usize, from: DType, to: DType) -> Result<Vec<KernelCall>> {
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

fn accumulate_plan(src: u64, dst: u64, n: usize, src_dtype: DType) -> Result<Vec<KernelCall>> {
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

fn binary_plan(
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

fn scalar_plan(
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
enum Saved {
    Input,
    Output,
}

/// The saved value of each activation kernel's backward.
fn activation_saved(op: &str) -> Result<Saved> {
    match op {
        "relu" | "tanh" => Ok(Saved::Output),
        "gelu" => Ok(Saved::Input),
        other => Err(Error::invalid(
            "activation",
            format!("not implemented on CUDA yet: {other}"),
        )),
    }
}

fn activation_fwd_plan(
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

fn activation_bwd_plan(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::common::check_all;

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
        }
        check_all(&cast_plan(1, 2, 10, DType::F32, DType::BF16).unwrap());
        check_all(&cast_plan(1, 2, 10, DType::BF16, DType::F32).unwrap());
        assert!(cast_plan(1, 2, 10, DType::I32, DType::F32).is_err());
        assert!(binary_plan(BinaryOp::Add, 1, 2, 3, 10, DType::I32).is_err());
    }

    #[test]
    fn empty_shapes_launch_nothing_and_huge_ones_are_errors() {
        assert!(binary_plan(BinaryOp::Add, 1, 2, 3, 0, DType::F32)
            .unwrap()
            .is_empty());
        assert!(channel_add_plan(1, 2, 3, 4, 1 << 33, 1, DType::F32).is_err());
        assert!(activation_saved("conv2d").is_err());
    }
}
