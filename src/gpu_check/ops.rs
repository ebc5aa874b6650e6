//! Checks beside the op table (`recycle_engine::op_table`, which `Checker::table` runs on the
//! device, one group per family): the tensor casts and copies, and the running statistics a
//! batch-norm training step leaves.

use recycle_engine::ops::{self, batch_norm2d, BatchNormOptions};
use recycle_engine::{DType, Device, Error, Result, Tape, Tensor};

use super::checker::{dims, Checker};

/// The running statistics after one batch-norm training step, f32 and bf16 inputs.
pub(super) fn batch_norm_stats_checks(c: &mut Checker) -> Result<()> {
    for dt in [DType::F32, DType::BF16] {
        let (x_cpu, x_gpu) = c.fresh(&[6, 24, 7, 7], dt)?;
        let mut stats = Vec::new();
        for x in [&x_gpu, &x_cpu] {
            let dev = x.device();
            let tape = Tape::inference();
            let w = tape.constant(Tensor::ones(&[24], DType::F32, dev)?);
            let b = tape.constant(Tensor::zeros(&[24], DType::F32, dev)?);
            let rm = Tensor::from_slice(&[0.1f32; 24], &[24], dev)?;
            let rv = Tensor::from_slice(&[2.0f32; 24], &[24], dev)?;
            batch_norm2d(
                &tape,
                &tape.constant(x.clone()),
                &w,
                &b,
                &rm,
                &rv,
                BatchNormOptions::default(),
            )?;
            stats.push((rm, rv));
        }
        let shape = dims(&[6, 24, 7, 7]);
        c.record(
            "batch_norm2d running_mean",
            shape.clone(),
            dt,
            &stats[0].0,
            &stats[1].0,
            1e-5,
        )?;
        c.record(
            "batch_norm2d running_var",
            shape,
            dt,
            &stats[0].1,
            &stats[1].1,
            1e-5,
        )?;
    }
    Ok(())
}

/// Copies, casts (plain and on the tape), accumulation and zeroing of tensors on the device.
pub(super) fn tensor_checks(c: &mut Checker) -> Result<()> {
    let shape = [1000, 37];
    let (x_cpu, x_gpu) = c.fresh(&shape, DType::F32)?;
    let round = x_gpu.to_device(Device::Cpu)?;
    c.record(
        "to_device round trip",
        dims(&shape),
        DType::F32,
        &round,
        &x_cpu,
        0.0,
    )?;
    let b_gpu = x_gpu.cast(DType::BF16)?;
    let b_cpu = x_cpu.cast(DType::BF16)?;
    c.record(
        "cast f32 to bf16",
        dims(&shape),
        DType::BF16,
        &b_gpu,
        &b_cpu,
        0.0,
    )?;
    c.record(
        "cast bf16 to f32",
        dims(&shape),
        DType::BF16,
        &b_gpu.cast(DType::F32)?,
        &b_cpu.cast(DType::F32)?,
        0.0,
    )?;
    // The differentiable cast (`ops::elementwise::cast`, how a model enters its compute
    // dtype): forward and the gradient cast back, both exact roundings (tolerance 0). The
    // upstream gradient is f32 in both directions, so bf16 → f32 checks the rounding of the
    // gradient to bf16 on the device.
    for (from, to) in [(DType::F32, DType::BF16), (DType::BF16, DType::F32)] {
        let (x_cpu, x_gpu) = c.fresh(&shape, from)?;
        let (g_cpu, g_gpu) = c.fresh(&shape, DType::F32)?;
        let run = |x: &Tensor, g: &Tensor| -> Result<(Tensor, Tensor)> {
            let tape = Tape::recording();
            let xv = tape.watch(x.clone());
            let y = ops::elementwise::cast(&tape, &xv, to)?;
            let grads = tape.backward_with(&y, g.clone())?;
            let dx = grads
                .get(&xv)
                .cloned()
                .ok_or_else(|| Error::Autograd("cast: no gradient for its input".to_string()))?;
            Ok((y.into_tensor(), dx))
        };
        let (y_gpu, dx_gpu) = run(&x_gpu, &g_gpu)?;
        let (y_cpu, dx_cpu) = run(&x_cpu, &g_cpu)?;
        let name = format!("cast op {from} to {to}");
        c.record(&name, dims(&shape), from, &y_gpu, &y_cpu, 0.0)?;
        c.record(
            &format!("{name} backward"),
            dims(&shape),
            from,
            &dx_gpu,
            &dx_cpu,
            0.0,
        )?;
    }
    c.record(
        "deep_copy",
        dims(&shape),
        DType::F32,
        &x_gpu.deep_copy()?,
        &x_cpu,
        0.0,
    )?;
    for dt in [DType::F32, DType::BF16] {
        let (acc_cpu, acc_gpu) = c.fresh(&shape, DType::F32)?;
        let (src_cpu, src_gpu) = c.fresh(&shape, dt)?;
        let acc_cpu = acc_cpu.deep_copy()?;
        acc_cpu.add_assign(&src_cpu)?;
        acc_gpu.add_assign(&src_gpu)?;
        c.record(
            "add_assign (accumulate)",
            dims(&shape),
            dt,
            &acc_gpu,
            &acc_cpu,
            1e-6,
        )?;
    }
    let z = x_gpu.deep_copy()?;
    z.zero_()?;
    let zeros = Tensor::zeros(&shape, DType::F32, Device::Cpu)?;
    c.record("zero_", dims(&shape), DType::F32, &z, &zeros, 0.0)?;
    Ok(())
}
