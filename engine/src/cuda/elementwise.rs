//! The CUDA arm of the elementwise ops (`add`, `sub`, `mul` of equal shapes, `scale`,
//! `add_scalar`, `bias_add`), the activations (`relu`, `gelu`, `tanh`), and the tensor copies,
//! casts and accumulation (`Tensor::deep_copy`, `cast`, `copy_from`, `add_assign`): the
//! `elementwise` kernel family (`elementwise.cu`). Broadcasting binary ops go to `layout.rs`.

use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use super::common::{empty, grid_stride, grid_stride_call, output, p, run, view, with_float};
use super::launch::{fit_u32, shape_err, KernelCall};
use super::DeviceBuffer;
use crate::backend::{Activation, BinaryOp};
use crate::{DType, Device, Error, Result, Tensor};

// ---------------------------------------------------------------------------------------------
// Copies, casts, accumulation
// ---------------------------------------------------------------------------------------------

fn cast_plan(x: u64, y: u64, n: usize, from: DType, to: DType) -> Result<Vec<KernelCall>> {
    let cfg = grid_stride(n);
    let len = n as u64;
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
    Ok(call.into_iter().collect())
}

/// `Tensor::cast` on a GPU: f32 ↔ bf16 (round to nearest even, as the CPU).
pub(crate) fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let x = view(t, "cast")?;
    output(&x.ctx, dtype, t.shape(), |y| {
        cast_plan(x.ptr, y, x.len, t.dtype(), dtype)
    })
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
    with_float!("add_assign", src_dtype, |T| Ok(grid_stride_call(n, |c| {
        k::accumulate::<T>(c, p(src), p(dst), n as u64)
    })))
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
    let len = n as u64;
    with_float!(op.name(), dtype, |T| Ok(grid_stride_call(n, |c| {
        let launcher = match op {
            BinaryOp::Add => k::add::<T>,
            BinaryOp::Sub => k::sub::<T>,
            BinaryOp::Mul => k::mul::<T>,
        };
        launcher(c, p(a), p(b), p(out), len)
    })))
}

fn binary_raw(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dtype = float_inputs(op.name(), &[a, b])?;
    let (av, bv) = (view(a, op.name())?, view(b, op.name())?);
    output(&av.ctx, dtype, a.shape(), |y| {
        binary_plan(op, av.ptr, bv.ptr, y, av.len, dtype)
    })
}

fn scalar_plan(
    base: &'static str,
    x: u64,
    out: u64,
    n: usize,
    s: f32,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let len = n as u64;
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
        Ok(grid_stride_call(n, |c| launcher(c, p(x), p(out), len, s)))
    })
}

pub(crate) fn scalar_raw(base: &'static str, x: &Tensor, s: f32) -> Result<Tensor> {
    let dtype = float_inputs(base, &[x])?;
    let xv = view(x, base)?;
    output(&xv.ctx, dtype, x.shape(), |y| {
        scalar_plan(base, xv.ptr, y, xv.len, s, dtype)
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
    if a.shape() == b.shape() {
        binary_raw(op, a, b)
    } else {
        super::layout::broadcast(op, a, b, out_shape)
    }
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
    let name = "channel_add";
    let cfg = kl::channel_rows(name, outer as u64, c as u64, inner as u64).map_err(shape_err)?;
    let (c, inner) = (
        fit_u32(name, "the number of channels", c)?,
        fit_u32(name, "the inner size", inner)?,
    );
    with_float!("bias_add", dtype, |T| Ok(cfg
        .map(|cfg| k::channel_add::<T>(cfg, p(x), p(v), p(out), c, inner))
        .into_iter()
        .collect()))
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
    if inner == 1 {
        let name = "channel_sum_last";
        let cfg = kl::channel_sum_last(name, outer as u64, c as u64).map_err(shape_err)?;
        let (rows, cols) = (
            fit_u32(name, "the number of rows", outer)?,
            fit_u32(name, "the number of columns", c)?,
        );
        with_float!("bias_add", dtype, |T| Ok(cfg
            .map(|cfg| k::channel_sum_last::<T>(cfg, p(g), p(out), rows, cols))
            .into_iter()
            .collect()))
    } else {
        let name = "channel_sum";
        let cfg = kl::channel_sum(name, outer as u64, c as u64, inner as u64).map_err(shape_err)?;
        let (planes, c, inner) = (
            fit_u32(name, "the number of planes", outer)?,
            fit_u32(name, "the number of channels", c)?,
            fit_u32(name, "the plane size", inner)?,
        );
        with_float!("bias_add", dtype, |T| Ok(cfg
            .map(|cfg| k::channel_sum::<T>(cfg, p(g), p(out), planes, c, inner))
            .into_iter()
            .collect()))
    }
}

/// The CUDA arm of [`crate::backend::elementwise::bias_add_fwd`] (shapes validated by the
/// caller): `x` and `bias` of one dtype, kept.
pub(crate) fn bias_add_fwd(x: &Tensor, bias: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    let dtype = float_inputs("bias_add", &[x, bias])?;
    let xv = view(x, "bias_add")?;
    let bv = view(bias, "bias_add")?;
    let outer = xv.len.checked_div(c * inner).unwrap_or(0);
    output(&xv.ctx, dtype, x.shape(), |y| {
        channel_add_plan(xv.ptr, bv.ptr, y, outer, c, inner, dtype)
    })
}

/// The CUDA arm of [`crate::backend::elementwise::bias_add_bwd`]: f32 `[c]`.
pub(crate) fn bias_add_bwd(g: &Tensor, c: usize, inner: usize) -> Result<Tensor> {
    let dtype = float_inputs("bias_add backward", &[g])?;
    let gv = view(g, "bias_add backward")?;
    let outer = gv.len.checked_div(c * inner).unwrap_or(0);
    output(&gv.ctx, DType::F32, &[c], |db| {
        channel_sum_plan(gv.ptr, db, outer, c, inner, dtype)
    })
}

// ---------------------------------------------------------------------------------------------
// Activations
// ---------------------------------------------------------------------------------------------

/// Which saved value an activation's backward kernel reads.
#[cfg(test)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Saved {
    Input,
    Output,
}

/// The saved value of each activation kernel's backward.
#[cfg(test)]
fn activation_saved(op: &str) -> Result<Saved> {
    match op {
        "relu" | "tanh" => Ok(Saved::Output),
        "gelu" => Ok(Saved::Input),
        other => Err(not_an_activation(other)),
    }
}

fn not_an_activation(op: &str) -> Error {
    Error::invalid("activation", format!("not implemented on CUDA yet: {op}"))
}

fn activation_fwd_plan(
    op: &str,
    x: u64,
    y: u64,
    n: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let len = n as u64;
    with_float!("activation", dtype, |T| {
        let launcher = match op {
            "relu" => k::relu_fwd::<T>,
            "gelu" => k::gelu_fwd::<T>,
            "tanh" => k::tanh_fwd::<T>,
            other => return Err(not_an_activation(other)),
        };
        Ok(grid_stride_call(n, |c| launcher(c, p(x), p(y), len)))
    })
}

fn activation_bwd_plan(
    op: &str,
    saved: u64,
    g: u64,
    dx: u64,
    n: usize,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let len = n as u64;
    with_float!("activation", dtype, |T| {
        let launcher = match op {
            "relu" => k::relu_bwd::<T>,
            "gelu" => k::gelu_bwd::<T>,
            "tanh" => k::tanh_bwd::<T>,
            other => return Err(not_an_activation(other)),
        };
        Ok(grid_stride_call(n, |c| {
            launcher(c, p(saved), p(g), p(dx), len)
        }))
    })
}

/// The CUDA arm of [`crate::backend::activation::activation_fwd`]: the output in `x`'s dtype.
pub(crate) fn activation_fwd(kind: Activation, x: &Tensor) -> Result<Tensor> {
    let op = kind.name();
    let dtype = float_inputs(op, &[x])?;
    let xv = view(x, op)?;
    output(&xv.ctx, dtype, x.shape(), |y| {
        activation_fwd_plan(op, xv.ptr, y, xv.len, dtype)
    })
}

/// The CUDA arm of [`crate::backend::activation::activation_bwd`]: `saved` and `g` of one
/// dtype, which the gradient keeps.
pub(crate) fn activation_bwd(kind: Activation, saved: &Tensor, g: &Tensor) -> Result<Tensor> {
    let op = kind.name();
    let dtype = float_inputs(op, &[saved, g])?;
    let (sv, gv) = (view(saved, op)?, view(g, op)?);
    output(&sv.ctx, dtype, g.shape(), |dx| {
        activation_bwd_plan(op, sv.ptr, gv.ptr, dx, sv.len, dtype)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::sim_check::{
        as_stored, assert_close, download, host_sim, run_plan, sample, upload,
    };
    use recycle_kernels::sim::SimBuffer;

    /// The plan with its grids cut to `blocks` blocks, so that a grid-stride kernel's threads
    /// loop over several elements each (as past `ELEMENTWISE_MAX_BLOCKS` on a GPU).
    fn capped(mut plan: Vec<KernelCall>, blocks: u32) -> Vec<KernelCall> {
        for call in &mut plan {
            call.config.grid[0] = call.config.grid[0].min(blocks);
        }
        plan
    }

    /// Sizes: below one block, not a multiple of the block (256), and several blocks.
    const SIZES: [usize; 3] = [3, 1000, 4099];

    /// The storage of an exact f32 result: the kernels compute in f32 and round once to the
    /// output's type, so a bf16 output is the CPU's f32 result rounded to nearest even (the
    /// comparisons of exact kernels are then exact in bf16 too).
    fn stored(values: &[f32], dt: DType) -> Vec<f32> {
        as_stored(values, dt)
    }

    #[test]
    fn casts_on_the_simulator_are_the_cpus_bits() {
        use half::bf16;
        let Some(sim) = host_sim() else { return };
        // bf16 -> f32: every one of the 65536 bit patterns widens exactly. NaN payloads are
        // not promised: the kernel shifts the bits (as the device's conversion), half also sets
        // the quiet bit of a signalling NaN; a NaN stays a NaN.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let (bx, by) = (
            SimBuffer::from_slice(&all),
            SimBuffer::zeros::<f32>(all.len()),
        );
        let plan = cast_plan(bx.ptr(), by.ptr(), all.len(), DType::BF16, DType::F32).unwrap();
        run_plan(sim, &plan);
        let got = by.read::<f32>().unwrap();
        for (i, (&b, g)) in all.iter().zip(got).enumerate() {
            let want = bf16::from_bits(b).to_f32();
            if want.is_nan() {
                assert!(g.is_nan(), "bf16 -> f32: element {i} ({b:#06x}): NaN");
            } else {
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "bf16 -> f32: element {i} ({b:#06x})"
                );
            }
        }
        // f32 -> bf16: random bit patterns (every exponent), the ties of round to nearest even
        // both ways, the overflow to infinity, zeros, subnormals, infinities and NaNs.
        let mut rng = crate::rng::Rng::new(11);
        let mut bits: Vec<u32> = (0..5000).map(|_| rng.next_u64() as u32).collect();
        bits.extend([
            0x3f80_8000, // 1 + half a bf16 ulp: a tie, to the even 1.0
            0x3f81_8000, // a tie from an odd mantissa: up
            0x3f80_8001, // just above a tie: up
            0xbf81_8000,
            0x7f7f_ffff, // f32::MAX: rounds to infinity
            0x7f7f_7fff, // just below the tie at the largest bf16: down
            0x0000_0000,
            0x8000_0000,
            0x0000_0001, // the smallest subnormal
            0x0040_8000,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0x7f80_0001, // a signalling NaN
        ]);
        for n in [bits.len(), 1000] {
            let x: Vec<f32> = bits[..n].iter().map(|&b| f32::from_bits(b)).collect();
            let (bx, by) = (SimBuffer::from_slice(&x), SimBuffer::zeros::<u16>(n));
            let plan = cast_plan(bx.ptr(), by.ptr(), n, DType::F32, DType::BF16).unwrap();
            for plan in [plan.clone(), capped(plan, 2)] {
                run_plan(sim, &plan);
                let got = by.read::<u16>().unwrap();
                for (i, (&v, g)) in x.iter().zip(got).enumerate() {
                    let want = bf16::from_f32(v).to_bits();
                    if v.is_nan() {
                        // NaN payloads are not promised (half keeps the payload, CUDA's
                        // conversion gives its canonical NaN): a NaN stays a NaN.
                        assert!(bf16::from_bits(g).is_nan(), "f32 -> bf16: element {i}: NaN");
                    } else {
                        assert_eq!(g, want, "f32 -> bf16: element {i} ({:#010x})", v.to_bits());
                    }
                }
            }
        }
    }

    #[test]
    fn arithmetic_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::elementwise as cpu;
        let Some(sim) = host_sim() else { return };
        for n in SIZES {
            for dt in [DType::F32, DType::BF16] {
                let a = sample(n, 1, 3.0);
                let b = sample(n, 2, 3.0);
                let (asv, bsv) = (as_stored(&a, dt), as_stored(&b, dt));
                let (ba, bb) = (upload(&a, dt), upload(&b, dt));
                // add/sub/mul: one f32 operation rounded once, as the CPU (bit-exact in f32;
                // in bf16, the CPU's f32 result rounded to nearest even): exact comparisons.
                for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul] {
                    let what = format!("{} n={n} {dt:?}", op.name());
                    let shape = [n];
                    let want = stored(
                        &cpu::binary_forward_cpu(op, &asv, &shape, &bsv, &shape, &shape),
                        dt,
                    );
                    for blocks in [u32::MAX, 2] {
                        let out = upload(&vec![0.0; n], dt);
                        let plan = binary_plan(op, ba.ptr(), bb.ptr(), out.ptr(), n, dt);
                        run_plan(sim, &capped(plan.unwrap(), blocks));
                        assert_close(&what, &download(&out, dt), &want, 0.0, 0.0);
                    }
                }
                // scale / add_scalar: exact likewise.
                for (base, s) in [("scale", -0.37f32), ("add_scalar", 1.25)] {
                    let out = upload(&vec![0.0; n], dt);
                    run_plan(
                        sim,
                        &scalar_plan(base, ba.ptr(), out.ptr(), n, s, dt).unwrap(),
                    );
                    let want: Vec<f32> = if base == "scale" {
                        cpu::map_cpu(&asv, |v| v * s)
                    } else {
                        cpu::map_cpu(&asv, |v| v + s)
                    };
                    assert_close(
                        &format!("{base} n={n} {dt:?}"),
                        &download(&out, dt),
                        &stored(&want, dt),
                        0.0,
                        0.0,
                    );
                }
                // accumulate: dst (f32) += src widened, as Tensor::add_assign: exact.
                let dst = SimBuffer::from_slice(&b);
                run_plan(sim, &accumulate_plan(ba.ptr(), dst.ptr(), n, dt).unwrap());
                let want: Vec<f32> = b.iter().zip(&asv).map(|(d, s)| d + s).collect();
                assert_close(
                    &format!("accumulate n={n} {dt:?}"),
                    &dst.read::<f32>().unwrap(),
                    &want,
                    0.0,
                    0.0,
                );
            }
        }
    }

    #[test]
    fn channel_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::elementwise as cpu;
        let Some(sim) = host_sim() else { return };
        // [outer, c, inner]: planes not a multiple of the block, one plane per block; rows of a
        // last-axis bias (inner 1) with c below 32, above 256 and not a multiple of 32, and
        // more rows than channel_sum_last's 8 row-threads and the CPU's 256-row blocks.
        for (outer, c, inner) in [
            (3usize, 5usize, 257usize),
            (2, 3, 1000),
            (37, 300, 1),
            (600, 7, 1),
        ] {
            let n = outer * c * inner;
            for dt in [DType::F32, DType::BF16] {
                let what = format!("[{outer}, {c}, {inner}] {dt:?}");
                let x = sample(n, 3, 2.0);
                let v = sample(c, 4, 2.0);
                let (xs, vs) = (as_stored(&x, dt), as_stored(&v, dt));
                let (bx, bv) = (upload(&x, dt), upload(&v, dt));
                // channel_add: one operation per element: exact.
                let out = upload(&vec![0.0; n], dt);
                let plan =
                    channel_add_plan(bx.ptr(), bv.ptr(), out.ptr(), outer, c, inner, dt).unwrap();
                run_plan(sim, &plan);
                assert_close(
                    &format!("channel_add {what}"),
                    &download(&out, dt),
                    &stored(&cpu::bias_add_forward_cpu(&xs, &vs, c, inner), dt),
                    0.0,
                    0.0,
                );
                // channel_sum(_last): f32 sums in another order than the CPU's (a block
                // reduction, or 8 strided partials): slack for count values of magnitude <= 2
                // summed in f32 in any order (about count * 2e-7 absolute at worst in practice).
                let g = sample(n, 5, 1.0);
                let gs = as_stored(&g, dt);
                let bg = upload(&g, dt);
                let count = (outer * inner) as f32;
                // The output is overwritten: start from other values.
                let out = SimBuffer::from_slice(&sample(c, 6, 1.0));
                let plan = channel_sum_plan(bg.ptr(), out.ptr(), outer, c, inner, dt).unwrap();
                run_plan(sim, &plan);
                assert_close(
                    &format!("{} {what}", plan[0].kernel),
                    &out.read::<f32>().unwrap(),
                    &cpu::bias_add_backward_cpu(&gs, c, inner),
                    1e-5,
                    count * 2e-7,
                );
            }
        }
    }

    #[test]
    fn activation_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::activation as cpu;
        let Some(sim) = host_sim() else { return };
        for n in SIZES {
            for dt in [DType::F32, DType::BF16] {
                let x = sample(n, 9, 5.0);
                let g = sample(n, 10, 1.0);
                let (xs, gs) = (as_stored(&x, dt), as_stored(&g, dt));
                let (bx, bg) = (upload(&x, dt), upload(&g, dt));
                for op in ["relu", "gelu", "tanh"] {
                    let what = format!("{op} n={n} {dt:?}");
                    let by = upload(&vec![0.0; n], dt);
                    run_plan(
                        sim,
                        &activation_fwd_plan(op, bx.ptr(), by.ptr(), n, dt).unwrap(),
                    );
                    let y = download(&by, dt);
                    let want = match op {
                        "relu" => cpu::relu_forward_cpu(&xs),
                        "gelu" => cpu::gelu_forward_cpu(&xs),
                        _ => cpu::tanh_forward_cpu(&xs),
                    };
                    // relu: exact. gelu: f32 through normcdff against the CPU's vectorised f32
                    // (each within a few ulp of the f64 formula); tanh: the device's tanhf is within 2 ulp of
                    // the CPU's. A bf16 output may then round to the neighbouring bf16 value:
                    // one bf16 ulp (2^-7 relative).
                    let (rel, abs) = match (op, dt) {
                        ("relu", _) => (0.0, 0.0),
                        (_, DType::BF16) => (8e-3, 1e-6),
                        _ => (1e-5, 1e-7),
                    };
                    let want = if rel == 0.0 { stored(&want, dt) } else { want };
                    assert_close(&format!("{what} forward"), &y, &want, rel, abs);

                    let saved = match activation_saved(op).unwrap() {
                        Saved::Input => &bx,
                        Saved::Output => &by,
                    };
                    let bdx = upload(&vec![0.0; n], dt);
                    run_plan(
                        sim,
                        &activation_bwd_plan(op, saved.ptr(), bg.ptr(), bdx.ptr(), n, dt).unwrap(),
                    );
                    let want_dx = match op {
                        "relu" => cpu::relu_backward_cpu(&y, &gs),
                        "gelu" => cpu::gelu_backward_cpu(&xs, &gs),
                        _ => cpu::tanh_backward_cpu(&y, &gs),
                    };
                    // relu and tanh backward: the CPU's f32 operations in its order (mul_rn,
                    // sub_rn: never contracted): exact. gelu: Phi(x) + x phi(x) in f32, on both
                    // sides in another way, cancels near x = -0.75: absolute slack of a few f32 ulp of the terms
                    // (|g| <= 1), and one bf16 ulp for bf16 storage.
                    let (rel, abs) = match (op, dt) {
                        ("gelu", DType::BF16) => (8e-3, 1e-6),
                        ("gelu", _) => (1e-5, 1e-6),
                        _ => (0.0, 0.0),
                    };
                    let want_dx = if rel == 0.0 {
                        stored(&want_dx, dt)
                    } else {
                        want_dx
                    };
                    assert_close(
                        &format!("{what} backward"),
                        &download(&bdx, dt),
                        &want_dx,
                        rel,
                        abs,
                    );
                }
            }
        }
    }

    #[test]
    fn empty_shapes_launch_nothing_and_huge_ones_are_errors() {
        assert!(binary_plan(BinaryOp::Add, 1, 2, 3, 0, DType::F32)
            .unwrap()
            .is_empty());
        assert!(channel_add_plan(1, 2, 3, 4, 1 << 33, 1, DType::F32).is_err());
        assert!(activation_saved("conv2d").is_err());
        assert!(cast_plan(1, 2, 10, DType::I32, DType::F32).is_err());
        assert!(binary_plan(BinaryOp::Add, 1, 2, 3, 10, DType::I32).is_err());
    }
}
