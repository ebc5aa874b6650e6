//! Checks beside the op table (`recycle_engine::op_table`, which `Checker::table` runs on the
//! device, one group per family, with its casts and optimizer steps): the tensor copies, and
//! the running statistics a batch-norm training step leaves.

use recycle_engine::ops::{batch_norm2d, BatchNormOptions};
use recycle_engine::{DType, Device, Result, Tape, Tensor};

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

/// Copies, accumulation and zeroing of tensors on the device (the casts are
/// `op_table::compare_casts`).
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
