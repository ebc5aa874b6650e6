//! Allocations per training step: a synthetic step through ops with a CUDA arm, counted from
//! the context's counters after warm-up, its losses and parameters checked against the CPU.

use recycle_engine::cuda;
use recycle_engine::ops::elementwise::{add, bias_add, scale};
use recycle_engine::ops::{self, activation, CrossEntropyOptions};
use recycle_engine::optim::{Optimizer, Sgdw};
use recycle_engine::{DType, Device, FlatParams, Result, Tape, Tensor};

use super::checker::Checker;

/// A training step made only of ops with a CUDA arm: two bias layers with GELU and a residual,
/// cross-entropy, backward, SGDW. Returns the loss.
fn synthetic_step(params: &FlatParams, opt: &mut Sgdw, x: &Tensor, labels: &Tensor) -> Result<f32> {
    params.zero_grad()?;
    let tape = Tape::recording();
    let xv = tape.constant(x.clone());
    let b1 = params.var(&tape, "b1")?;
    let b2 = params.var(&tape, "b2")?;
    let h = bias_add(&tape, &xv, &b1, 1)?;
    let h = activation::gelu(&tape, &h)?;
    let h = scale(&tape, &h, 0.5)?;
    let h = add(&tape, &h, &xv)?;
    let h = bias_add(&tape, &h, &b2, 1)?;
    let loss = ops::cross_entropy(&tape, &h, labels, CrossEntropyOptions::default())?;
    tape.backward(&loss)?;
    opt.step(params, 0.05)?;
    loss.tensor().to_scalar_f32()
}

pub(super) fn allocation_check(c: &mut Checker) -> Result<(u64, String)> {
    let (rows, width) = (256, 512);
    let specs = vec![
        ("b1".to_string(), vec![width]),
        ("b2".to_string(), vec![width]),
    ];
    let (x_cpu, x_gpu) = c.fresh(&[rows, width], DType::F32)?;
    let labels: Vec<i32> = (0..rows).map(|r| (r * 31 % width) as i32).collect();
    let labels_cpu = Tensor::from_vec(labels.clone(), &[rows], Device::Cpu)?;
    let labels_gpu = labels_cpu.to_device(c.device)?;
    let p_cpu = FlatParams::new(&specs, Device::Cpu)?;
    let p_gpu = FlatParams::new(&specs, c.device)?;
    let mut o_cpu = Sgdw::paper(p_cpu.len(), 0.05)?;
    let mut o_gpu = Sgdw::paper(p_gpu.len(), 0.05)?;
    let ordinal = super::ordinal_of(c.device)?;
    let mut losses = (Vec::new(), Vec::new());
    let mut per_step = 0;
    for _ in 0..3 {
        let before = cuda::alloc_stats(ordinal)?;
        losses
            .1
            .push(synthetic_step(&p_gpu, &mut o_gpu, &x_gpu, &labels_gpu)?);
        cuda::synchronize(c.device)?;
        per_step = cuda::alloc_stats(ordinal)?.allocations_since(&before);
        losses
            .0
            .push(synthetic_step(&p_cpu, &mut o_cpu, &x_cpu, &labels_cpu)?);
    }
    let l_gpu = Tensor::f32(losses.1, &[3])?;
    let l_cpu = Tensor::f32(losses.0, &[3])?;
    c.record(
        "training step: losses of 3 steps",
        format!("[{rows}, {width}]"),
        DType::F32,
        &l_gpu,
        &l_cpu,
        1e-4,
    )?;
    c.record(
        "training step: parameters",
        format!("[{}]", p_cpu.len()),
        DType::F32,
        p_gpu.values(),
        p_cpu.values(),
        1e-4,
    )?;
    Ok((
        per_step,
        format!(
            "synthetic step on [{rows}, {width}]: bias_add, gelu, scale, add, bias_add, \
             cross_entropy, backward, SGDW; third step"
        ),
    ))
}
