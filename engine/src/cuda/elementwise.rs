//! The CUDA arm of the elementwise ops (`add`, `sub`, `mul` of equal shapes, `scale`,
//! `add_scalar`, `bias_add`), the activations (`relu`, `gelu`, `tanh`), and the tensor copies,
//! casts and accumulation (`Tensor::deep_copy`, `cast`, `copy_from`, `add_assign`): the
//! `elementwise` kernel family (`elementwise.cu`). Broadcasting binary ops go to `layout.rs`.

use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use super::common::{dptr, empty, grid_stride, p, view, with_float};
use super::launch::{fit_u32, launch, shape_err};
use super::{CudaContext, DeviceBuffer};
use crate::backend::{Activation, BinaryOp};
use crate::{DType, Device, Error, Result, Tensor};

// ---------------------------------------------------------------------------------------------
// Copies, casts, accumulation
// ---------------------------------------------------------------------------------------------

/// Casts the `n` values at `x` (`from`) into `y` (`to`): f32 ↔ bf16 (round to nearest even,
/// as the CPU).
fn cast_into(ctx: &CudaContext, x: u64, y: u64, n: usize, from: DType, to: DType) -> Result<()> {
    let (cfg, len) = (grid_stride(n), n as u64);
    let call = match (from, to) {
        (DType::F32, DType::BF16) => cfg.map(|c| k::cast_f32_to_bf16(c, p(x), p(y), len)),
        (DType::BF16, DType::F32) => cfg.map(|c| k::cast_bf16_to_f32(c, p(x), p(y), len)),
        _ => {
            return Err(Error::invalid(
                "cast",
                format!("not implemented on CUDA yet: cast from {from} to {to}"),
            ))
        }
    };
    call.map_or(Ok(()), |call| launch(ctx, &call))
}

/// `Tensor::cast` on a GPU.
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = view(t, "cast")?;
    let y = empty(&x.ctx, dtype, t.shape())?;
    cast_into(
        &x.ctx,
        x.ptr,
        view(&y, "cast")?.ptr,
        x.len,
        t.dtype(),
        dtype,
    )?;
    Ok(y)
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
                cast_into(&d.ctx, s.ptr, d.ptr, d.len, src.dtype(), dst.dtype())
            }
        }
        _ => {
            let host = src.to_device(Device::Cpu)?.cast(dst.dtype())?;
            super::copy_to_device(&d, &host.to_bytes()?)
        }
    }
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
    let Some(cfg) = grid_stride(d.len) else {
        return Ok(());
    };
    with_float!("add_assign", src.dtype(), |T| launch(
        &d.ctx,
        &k::accumulate::<T>(cfg, p(s.ptr), p(d.ptr), d.len as u64)
    ))
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

pub(crate) fn scalar_raw(base: &'static str, x: &Tensor, s: f32) -> Result<Tensor> {
    let dtype = float_inputs(base, &[x])?;
    let xv = view(x, base)?;
    with_float!(base, dtype, |T| {
        let launcher = match base {
            "scale" => k::scale::<T>,
            "add_scalar" => k::add_scalar::<T>,
            other => {
                return Err(Error::invalid(
                    other,
                    "not a scalar op of the elementwise kernels (scale, add_scalar)",
                ))
            }
        };
        let y = empty(&xv.ctx, dtype, x.shape())?;
        if let Some(cfg) = grid_stride(xv.len) {
            let out = dptr(&y, base)?;
            launch(&xv.ctx, &launcher(cfg, p(xv.ptr), out, xv.len as u64, s))?;
        }
        Ok(y)
    })
}

/// The CUDA arm of [`crate::backend::elementwise::binary_fwd`]: same dtypes; same shapes in one
/// launch, broadcast ones (`out_shape`, validated by the caller) through `layout.cu`.
pub(crate) fn binary_fwd(
    op: BinaryOp,
    a: &Tensor,
    b: &Tensor,
    out_shape: &[usize],
) -> Result<Tensor> {
    if a.shape() != b.shape() {
        return super::layout::broadcast(op, a, b, out_shape);
    }
    let name = op.name();
    let dtype = float_inputs(name, &[a, b])?;
    let av = view(a, name)?;
    let y = empty(&av.ctx, dtype, a.shape())?;
    if let Some(cfg) = grid_stride(av.len) {
        with_float!(name, dtype, |T| {
            let launcher = match op {
                BinaryOp::Add => k::add::<T>,
                BinaryOp::Sub => k::sub::<T>,
                BinaryOp::Mul => k::mul::<T>,
            };
            let (a, b, out) = (dptr(a, name)?, dptr(b, name)?, dptr(&y, name)?);
            launch(&av.ctx, &launcher(cfg, a, b, out, av.len as u64))
        })?;
    }
    Ok(y)
}

/// The CUDA arm of [`crate::backend::elementwise::bias_add_fwd`] (shapes validated by the
/// caller): `x` and `bias` of one dtype, kept.
pub(crate) fn bias_add_fwd(x: &Tensor, bias: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    let dtype = float_inputs("bias_add", &[x, bias])?;
    let y = empty(&view(x, "bias_add")?.ctx, dtype, x.shape())?;
    channel_add(x, bias, &y, c, inner)?;
    Ok(y)
}

/// `out = x + bias` per channel over `[outer, c, inner]`, all of one dtype (`out` may be `x`:
/// each element reads and writes its own address).
pub(crate) fn channel_add(
    x: &Tensor,
    bias: &Tensor,
    out: &Tensor,
    c: usize,
    inner: usize,
) -> Result<()> {
    const OP: &str = "bias_add";
    let name = "channel_add";
    let xv = view(x, OP)?;
    let outer = xv.len.checked_div(c * inner).unwrap_or(0);
    let cfg = kl::channel_rows(name, outer as u64, c as u64, inner as u64).map_err(shape_err)?;
    let Some(cfg) = cfg else { return Ok(()) };
    let (c, inner) = (
        fit_u32(name, "the number of channels", c)?,
        fit_u32(name, "the inner size", inner)?,
    );
    with_float!(OP, x.dtype(), |T| launch(
        &xv.ctx,
        &k::channel_add::<T>(cfg, p(xv.ptr), dptr(bias, OP)?, dptr(out, OP)?, c, inner)
    ))
}

/// The CUDA arm of [`crate::backend::elementwise::bias_add_bwd`]: the sum of `g` over `outer`
/// and `inner` per channel, f32 `[c]`.
pub(crate) fn bias_add_bwd(g: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    const OP: &str = "bias_add backward";
    let dtype = float_inputs(OP, &[g])?;
    let gv = view(g, OP)?;
    let outer = gv.len.checked_div(c * inner).unwrap_or(0);
    let db = empty(&gv.ctx, DType::F32, &[c])?;
    let (gp, out) = (gv.ptr, dptr(&db, OP)?);
    let call = if inner == 1 {
        let name = "channel_sum_last";
        let cfg = kl::channel_sum_last(name, outer as u64, c as u64).map_err(shape_err)?;
        let (rows, cols) = (
            fit_u32(name, "the number of rows", outer)?,
            fit_u32(name, "the number of columns", c)?,
        );
        with_float!(OP, dtype, |T| Ok(cfg.map(|cfg| k::channel_sum_last::<T>(
            cfg,
            p(gp),
            out,
            rows,
            cols
        ))))?
    } else {
        let name = "channel_sum";
        let cfg = kl::channel_sum(name, outer as u64, c as u64, inner as u64).map_err(shape_err)?;
        let (planes, c, inner) = (
            fit_u32(name, "the number of planes", outer)?,
            fit_u32(name, "the number of channels", c)?,
            fit_u32(name, "the plane size", inner)?,
        );
        with_float!(OP, dtype, |T| Ok(cfg.map(|cfg| k::channel_sum::<T>(
            cfg,
            p(gp),
            out,
            planes,
            c,
            inner
        ))))?
    };
    if let Some(call) = call {
        launch(&gv.ctx, &call)?;
    }
    Ok(db)
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

fn not_an_activation(op: &str) -> Error {
    Error::invalid("activation", format!("not implemented on CUDA yet: {op}"))
}

/// The CUDA arm of [`crate::backend::activation::activation_fwd`]: the output in `x`'s dtype.
pub(crate) fn activation_fwd(kind: Activation, x: &Tensor) -> Result<Tensor> {
    let op = kind.name();
    let dtype = float_inputs(op, &[x])?;
    let xv = view(x, op)?;
    let y = empty(&xv.ctx, dtype, x.shape())?;
    let Some(cfg) = grid_stride(xv.len) else {
        return Ok(y);
    };
    with_float!("activation", dtype, |T| {
        let launcher = match op {
            "relu" => k::relu_fwd::<T>,
            "gelu" => k::gelu_fwd::<T>,
            "tanh" => k::tanh_fwd::<T>,
            other => return Err(not_an_activation(other)),
        };
        launch(
            &xv.ctx,
            &launcher(cfg, p(xv.ptr), dptr(&y, op)?, xv.len as u64),
        )
    })?;
    Ok(y)
}

/// The CUDA arm of [`crate::backend::activation::activation_bwd`]: `saved` (the output for
/// relu and tanh, the input for gelu) and `g` of one dtype, which the gradient keeps.
pub(crate) fn activation_bwd(kind: Activation, saved: &Tensor, g: &Tensor) -> Result<Tensor> {
    let op = kind.name();
    let dtype = float_inputs(op, &[saved, g])?;
    let sv = view(saved, op)?;
    let dx = empty(&sv.ctx, dtype, g.shape())?;
    let Some(cfg) = grid_stride(sv.len) else {
        return Ok(dx);
    };
    with_float!("activation", dtype, |T| {
        let launcher = match op {
            "relu" => k::relu_bwd::<T>,
            "gelu" => k::gelu_bwd::<T>,
            "tanh" => k::tanh_bwd::<T>,
            other => return Err(not_an_activation(other)),
        };
        let (gp, dxp) = (dptr(g, op)?, dptr(&dx, op)?);
        launch(&sv.ctx, &launcher(cfg, p(sv.ptr), gp, dxp, sv.len as u64))
    })?;
    Ok(dx)
}
