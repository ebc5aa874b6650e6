//! `recycle gpu-check`: every op that has a CUDA arm, run on the GPU and on the CPU (the
//! oracle) on the same fresh random inputs, compared element by element.
//!
//! Method, per op: inputs drawn fresh (normal, scale 1.5, a new seed for every tensor: never
//! zeros, never the values of another check), in f32 and in bf16; every buffer the GPU
//! allocates during the check starts as NaN (`cuda::set_poison_allocations`), so an output
//! element a kernel fails to write cannot pass; the forward output and, for tape ops, the
//! gradient of every input (for a random upstream gradient) are copied back and compared with
//! the CPU op's. The error of an element is `|gpu - cpu| / max(|cpu|, 1e-3 · max|cpu|)` (near
//! zero, relative to the tensor's scale), a NaN or infinity where the CPU has a finite value
//! counts as infinite, and a check passes when the largest error is within its tolerance:
//! 1e-6 where the kernel promises the CPU's bits, 1e-4 to 1e-5 where it uses a different
//! `exp`/`erf` or summation order, 2e-2 for bf16 storage (8 bits of mantissa).
//!
//! Also measured: allocations per training step (a synthetic step through the ops that run on
//! CUDA), from the context's counters.
//!
//! Host copies (`host_copy_checks`): i32 tensors uploaded from the CPU are read back (whole,
//! as views, after `copy_from_i32`, `zero_` and `deep_copy`) without a download and equal to
//! what the device holds; the attention's padding mask is made into its additive form once and
//! again after a write into the mask. The model-step rows below also count the bytes each step
//! copies to the host ([`STEP_BYTES_TO_HOST`]).
//!
//! The teacher stream (`teacher_stream_checks`): a distillation step of each small model with
//! its teacher on the teacher stream equals, bit for bit, the same step with the teacher run
//! first on the student stream.
//!
//! The NCCL all-reduce group (`cuda::AllReduceGroup`) over the checked GPU: one rank, so the
//! mean must return the buffer bit for bit.
//!
//! Whole models: one training step (forward, loss, backward, then an SGDW update) of a small
//! ResNet-18 (small stem, width 1/8, batch 8 of 1x28x28) and of BERT-tiny (batch 4, sequence
//! 32, vocabulary 512), on the GPU and on the CPU from the same weights and batch (the GPU
//! model is `Model::to_device` of the CPU one), in f32 and again with bf16 activations and a
//! bf16 working copy of the weights. Rows of the same table: the loss, the norm of the flat
//! gradient, the flat gradient element by element (bf16: as a relative L2 error), and the
//! parameters after the update (bf16: the update, and the GPU's working copy against its
//! master rounded). Then (`throughput`; `recycle gpu-check` runs it after printing the table,
//! unless `--no-throughput`) the throughput of a plain training step of ResNet-50 (batch 256, 3x224x224, 1000 classes) and BERT-base (batch 128, sequence 128),
//! both computing in bf16 from a bf16 working copy of their f32 master weights, in samples per
//! second: warm-up steps, then timed steps closed by a device synchronisation.
//!
//! On a machine without a GPU the first step, opening the device, fails with the error that
//! says what is missing (no driver, no CUDA backend in this build, ...).

use std::fmt::Write as _;

use recycle_engine::cuda::{self, AllocStats};
use recycle_engine::ops::elementwise::{add, add_scalar, bias_add, mul, scale, sub};
use recycle_engine::ops::{self, activation, CrossEntropyOptions};
use recycle_engine::optim::{AdamW, Optimizer, Sgdw};
use recycle_engine::{DType, Device, Error, FlatParams, Result, Tape, Tensor, Var};

use crate::distill::loss::{kd_loss, KdLoss};
use crate::trainer::{forward_backward, train_step, Architecture, Batch, Model};
use recycle_models::{BertConfig, ResNetConfig};

/// One line of the report.
#[derive(Debug, Clone)]
pub struct CheckRow {
    pub op: String,
    pub shapes: String,
    pub dtype: DType,
    pub max_rel_err: f64,
    pub tolerance: f64,
    pub pass: bool,
}

/// What `run` found.
#[derive(Debug, Clone)]
pub struct GpuCheckReport {
    pub device: cuda::DeviceInfo,
    pub rows: Vec<CheckRow>,
    /// Allocations (`cuMemAllocAsync` calls) of one synthetic training step, after warm-up.
    pub allocations_per_step: u64,
    pub step_description: String,
    pub stats: AllocStats,
}

/// How `throughput` measures.
#[derive(Debug, Clone)]
pub struct ThroughputOptions {
    /// Untimed steps before the timed ones.
    pub warmup_steps: usize,
    /// Timed steps.
    pub timed_steps: usize,
}

impl Default for ThroughputOptions {
    fn default() -> Self {
        ThroughputOptions {
            warmup_steps: 3,
            timed_steps: 10,
        }
    }
}

/// The throughput of one model's plain training step.
#[derive(Debug, Clone)]
pub struct ThroughputRow {
    pub model: String,
    /// Batch and input, as text.
    pub batch: String,
    /// The dtype the activations run in (the master weights, gradients and optimizer state
    /// are f32; bf16 activations read a bf16 working copy of the weights).
    pub activations: DType,
    pub samples_per_step: usize,
    pub timed_steps: usize,
    /// Seconds per step, or the error that stopped the measurement.
    pub outcome: std::result::Result<f64, String>,
}

impl ThroughputRow {
    pub fn samples_per_second(&self) -> Option<f64> {
        self.outcome
            .as_ref()
            .ok()
            .map(|s| self.samples_per_step as f64 / s)
    }
}

/// The throughput table: model, batch, activations, steps, ms per step, samples per second.
pub fn format_throughput(rows: &[ThroughputRow]) -> String {
    let mut s = String::from(
        "throughput of a plain training step (forward, cross-entropy, backward, SGDW):\n\
         | model | batch | activations | timed steps | ms / step | samples / s |\n\
         |---|---|---|---:|---:|---:|\n",
    );
    for r in rows {
        let (ms, sps) = match (&r.outcome, r.samples_per_second()) {
            (Ok(sec), Some(sps)) => (format!("{:.1}", sec * 1e3), format!("{sps:.1}")),
            (Err(e), _) => ("-".to_string(), format!("error: {e}")),
            _ => ("-".to_string(), "-".to_string()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {ms} | {sps} |",
            r.model, r.batch, r.activations, r.timed_steps
        );
    }
    s
}

impl GpuCheckReport {
    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }

    /// The report as text: the device, the table, the allocation count, the verdict.
    pub fn to_text(&self) -> String {
        let d = &self.device;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "device: cuda:{} {} (sm_{}{}), driver CUDA {}.{}, {:.1} GiB, kernels: {}",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.driver_version / 1000,
            (d.driver_version % 1000) / 10,
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.kernel_image
        );
        s.push_str(&format_table(&self.rows));
        let _ = writeln!(
            s,
            "allocations per training step: {} ({}; stream-ordered cuMemAllocAsync from the \
             driver's pool, release threshold: never)",
            self.allocations_per_step, self.step_description
        );
        let _ = writeln!(
            s,
            "device memory: {} allocations, {} frees, peak {:.1} MiB in use; {:.1} MiB to the \
             device, {:.1} MiB to the host",
            self.stats.allocations,
            self.stats.frees,
            self.stats.peak_bytes_in_use as f64 / (1 << 20) as f64,
            self.stats.bytes_to_device as f64 / (1 << 20) as f64,
            self.stats.bytes_to_host as f64 / (1 << 20) as f64
        );
        let _ = writeln!(
            s,
            "{} passed, {} failed",
            self.rows.len() - self.failures(),
            self.failures()
        );
        s
    }
}

/// The table: op, shapes, dtype, max relative error, tolerance, pass.
pub fn format_table(rows: &[CheckRow]) -> String {
    let mut s = String::from("| op | shapes | dtype | max rel err | tolerance | pass |\n");
    s.push_str("|---|---|---|---:|---:|---|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3e} | {:.0e} | {} |",
            r.op,
            r.shapes,
            r.dtype,
            r.max_rel_err,
            r.tolerance,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
    s
}

/// Largest element error of `gpu` against the oracle `cpu` (see the module doc); infinite for
/// a length mismatch or a non-finite value where the CPU has a finite one.
pub fn max_rel_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() {
        return f64::INFINITY;
    }
    let scale = cpu
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f64, |m, &v| m.max((v as f64).abs()));
    let floor = (1e-3 * scale).max(f64::MIN_POSITIVE);
    gpu.iter().zip(cpu).fold(0f64, |worst, (&g, &c)| {
        let e = if !c.is_finite() {
            // The oracle itself is not finite (a NaN row by definition): the GPU must agree.
            if g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()) {
                0.0
            } else {
                f64::INFINITY
            }
        } else if !g.is_finite() {
            f64::INFINITY
        } else {
            ((g as f64) - (c as f64)).abs() / (c as f64).abs().max(floor)
        };
        worst.max(e)
    })
}

struct Checker {
    device: Device,
    seed: u64,
    rows: Vec<CheckRow>,
}

fn dims(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Checker {
    /// A fresh random tensor of `dtype` on the CPU and its copy on the GPU.
    fn fresh(&mut self, shape: &[usize], dtype: DType) -> Result<(Tensor, Tensor)> {
        self.seed += 1;
        let cpu = Tensor::randn(shape, 0.0, 1.5, 0x5eed_0000 + self.seed, dtype, Device::Cpu)?;
        let gpu = cpu.to_device(self.device)?;
        Ok((cpu, gpu))
    }

    fn record(
        &mut self,
        op: &str,
        shapes: String,
        dtype: DType,
        gpu: &Tensor,
        cpu: &Tensor,
        tol: f64,
    ) -> Result<()> {
        let err = if gpu.shape() != cpu.shape() {
            f64::INFINITY
        } else {
            max_rel_err(&gpu.to_vec_f32()?, &cpu.to_vec_f32()?)
        };
        self.record_err(op, shapes, dtype, err, tol);
        Ok(())
    }

    fn record_err(&mut self, op: &str, shapes: String, dtype: DType, err: f64, tol: f64) {
        self.rows.push(CheckRow {
            op: op.to_string(),
            shapes,
            dtype,
            max_rel_err: err,
            tolerance: tol,
            pass: err <= tol,
        });
    }

    /// A tape op of `inputs.len()` tensors: forward output and every input's gradient.
    fn tape_op(
        &mut self,
        name: &str,
        shapes: &[&[usize]],
        dtype: DType,
        tol: f64,
        f: impl Fn(&Tape, &[Var]) -> Result<Var>,
    ) -> Result<()> {
        let mut cpu_in = Vec::new();
        let mut gpu_in = Vec::new();
        for s in shapes {
            let (c, g) = self.fresh(s, dtype)?;
            cpu_in.push(c);
            gpu_in.push(g);
        }
        let run = |inputs: &[Tensor],
                   upstream: Option<&Tensor>|
         -> Result<(Tensor, Vec<Tensor>, Tensor)> {
            let tape = Tape::recording();
            let vars: Vec<Var> = inputs.iter().map(|t| tape.watch(t.clone())).collect();
            let y = f(&tape, &vars)?;
            let out = y.tensor().clone();
            let g = match upstream {
                Some(g) => g.clone(),
                None => Tensor::ones(out.shape(), DType::F32, out.device())?,
            };
            let grads = tape.backward_with(&y, g.clone())?;
            let dx =
                vars.iter()
                    .map(|v| {
                        grads.get(v).cloned().ok_or_else(|| {
                            Error::Autograd(format!("{name}: no gradient for an input"))
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
            Ok((out, dx, g))
        };
        // The upstream gradient: random, of the output's shape (found by a CPU forward).
        let out_shape = f(
            &Tape::inference(),
            &cpu_in
                .iter()
                .map(|t| Tape::inference().constant(t.clone()))
                .collect::<Vec<_>>(),
        )?
        .shape()
        .to_vec();
        let (g_cpu, g_gpu) = if out_shape.iter().product::<usize>() == 1 {
            (None, None)
        } else {
            let (c, g) = self.fresh(&out_shape, dtype)?;
            (Some(c), Some(g))
        };
        let (y_gpu, dx_gpu, _) = run(&gpu_in, g_gpu.as_ref())?;
        let (y_cpu, dx_cpu, _) = run(&cpu_in, g_cpu.as_ref())?;
        let shape_text = shapes.iter().map(|s| dims(s)).collect::<Vec<_>>().join(" ");
        self.record(name, shape_text.clone(), dtype, &y_gpu, &y_cpu, tol)?;
        for (i, (g, c)) in dx_gpu.iter().zip(&dx_cpu).enumerate() {
            let label = if shapes.len() == 1 {
                format!("{name} backward")
            } else {
                format!("{name} backward d{i}")
            };
            self.record(&label, shape_text.clone(), dtype, g, c, tol)?;
        }
        Ok(())
    }
}

/// Tolerance of an op in `dtype`: `f32_tol` for f32 storage, 2e-2 for bf16.
fn tol(dtype: DType, f32_tol: f64) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        _ => f32_tol,
    }
}

fn elementwise_checks(c: &mut Checker) -> Result<()> {
    for dt in [DType::F32, DType::BF16] {
        let s: &[usize] = &[37, 513];
        c.tape_op("add", &[s, s], dt, tol(dt, 1e-6), |t, v| {
            add(t, &v[0], &v[1])
        })?;
        c.tape_op("sub", &[s, s], dt, tol(dt, 1e-6), |t, v| {
            sub(t, &v[0], &v[1])
        })?;
        c.tape_op("mul", &[s, s], dt, tol(dt, 1e-6), |t, v| {
            mul(t, &v[0], &v[1])
        })?;
        c.tape_op("scale", &[s], dt, tol(dt, 1e-6), |t, v| {
            scale(t, &v[0], -0.37)
        })?;
        c.tape_op("add_scalar", &[s], dt, tol(dt, 1e-6), |t, v| {
            add_scalar(t, &v[0], 2.5)
        })?;
        // Bias over NCHW channels (one block per plane) and over the last axis (rows).
        c.tape_op(
            "bias_add axis 1",
            &[&[4, 16, 7, 7], &[16]],
            dt,
            tol(dt, 1e-5),
            |t, v| bias_add(t, &v[0], &v[1], 1),
        )?;
        c.tape_op(
            "bias_add last axis",
            &[&[300, 768], &[768]],
            dt,
            tol(dt, 1e-5),
            |t, v| bias_add(t, &v[0], &v[1], 1),
        )?;
        c.tape_op("relu", &[s], dt, tol(dt, 1e-6), |t, v| {
            activation::relu(t, &v[0])
        })?;
        c.tape_op("gelu", &[s], dt, tol(dt, 1e-5), |t, v| {
            activation::gelu(t, &v[0])
        })?;
        c.tape_op("tanh", &[s], dt, tol(dt, 1e-5), |t, v| {
            activation::tanh(t, &v[0])
        })?;
        for shape in [&[64usize, 1000][..], &[8, 30_522]] {
            c.tape_op("softmax", &[shape], dt, tol(dt, 1e-5), |t, v| {
                ops::softmax(t, &v[0])
            })?;
            c.tape_op("log_softmax", &[shape], dt, tol(dt, 1e-5), |t, v| {
                ops::log_softmax(t, &v[0])
            })?;
        }
    }
    Ok(())
}

/// cuBLASLt products: every transpose combination, strided batches, linear with and without
/// the bias epilogue. Tolerance: fp32 accumulation in another order than the CPU's gemm (1e-4 for f32 over
/// k ≤ 768), and bf16 storage of the result.
fn matmul_checks(c: &mut Checker) -> Result<()> {
    use ops::matmul::{batched_matmul, linear, matmul};
    for dt in [DType::F32, DType::BF16] {
        let (m, k, n) = (67, 129, 45);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let sa = if ta { [k, m] } else { [m, k] };
            let sb = if tb { [n, k] } else { [k, n] };
            c.tape_op(
                &format!("matmul ta={ta} tb={tb}"),
                &[&sa, &sb],
                dt,
                tol(dt, 1e-4),
                move |t, v| matmul(t, &v[0], &v[1], ta, tb),
            )?;
        }
        // Attention-shaped: [batch, heads, seq, dim] x its transpose.
        c.tape_op(
            "batched_matmul tb",
            &[&[2, 4, 33, 16], &[2, 4, 33, 16]],
            dt,
            tol(dt, 1e-4),
            |t, v| batched_matmul(t, &v[0], &v[1], false, true),
        )?;
        c.tape_op(
            "batched_matmul ta",
            &[&[6, 17, 9], &[6, 17, 12]],
            dt,
            tol(dt, 1e-4),
            |t, v| batched_matmul(t, &v[0], &v[1], true, false),
        )?;
        c.tape_op(
            "linear + bias",
            &[&[4, 50, 768], &[300, 768], &[300]],
            dt,
            tol(dt, 1e-4),
            |t, v| linear(t, &v[0], &v[1], Some(&v[2])),
        )?;
        c.tape_op(
            "linear",
            &[&[37, 64], &[10, 64]],
            dt,
            tol(dt, 1e-4),
            |t, v| linear(t, &v[0], &v[1], None),
        )?;
    }
    Ok(())
}

/// cuDNN convolutions (forward, backward-data, backward-filter) and the bias kernels: a 3x3
/// same convolution with bias, a strided padded one, ResNet's 7x7 stride-2 stem, a 1x1
/// stride-2 downsample. f32 runs without TF32 (FMA math), so 1e-4 covers the summation order.
fn conv_checks(c: &mut Checker) -> Result<()> {
    use ops::conv::{conv2d, Conv2dOptions};
    let o = |stride, padding| Conv2dOptions { stride, padding };
    for dt in [DType::F32, DType::BF16] {
        c.tape_op(
            "conv2d 3x3 + bias",
            &[&[4, 16, 14, 14], &[32, 16, 3, 3], &[32]],
            dt,
            tol(dt, 1e-4),
            move |t, v| conv2d(t, &v[0], &v[1], Some(&v[2]), o(1, 1)),
        )?;
        c.tape_op(
            "conv2d 3x3 s2 p1",
            &[&[3, 8, 15, 13], &[12, 8, 3, 3]],
            dt,
            tol(dt, 1e-4),
            move |t, v| conv2d(t, &v[0], &v[1], None, o(2, 1)),
        )?;
        c.tape_op(
            "conv2d 7x7 s2 p3",
            &[&[2, 3, 64, 64], &[16, 3, 7, 7]],
            dt,
            tol(dt, 1e-4),
            move |t, v| conv2d(t, &v[0], &v[1], None, o(2, 3)),
        )?;
        c.tape_op(
            "conv2d 1x1 s2 + bias",
            &[&[4, 32, 8, 8], &[64, 32, 1, 1], &[64]],
            dt,
            tol(dt, 1e-4),
            move |t, v| conv2d(t, &v[0], &v[1], Some(&v[2]), o(2, 0)),
        )?;
    }
    Ok(())
}

/// Layer norm (BERT's rows) and batch norm (training with the running-statistics update, and
/// evaluation from the running statistics).
fn norm_checks(c: &mut Checker) -> Result<()> {
    use ops::{batch_norm2d, layer_norm, BatchNormOptions};
    for dt in [DType::F32, DType::BF16] {
        c.tape_op(
            "layer_norm",
            &[&[4, 33, 768], &[768], &[768]],
            dt,
            tol(dt, 1e-4),
            |t, v| layer_norm(t, &v[0], &v[1], &v[2], 1e-12),
        )?;
        for training in [true, false] {
            let opts = BatchNormOptions {
                training,
                ..BatchNormOptions::default()
            };
            // Running statistics made beside the input, on its device: the same values on
            // both sides (mean 0.1, variance 2).
            let bn = move |t: &Tape, v: &[Var]| {
                let dev = v[0].tensor().device();
                let rm = Tensor::from_slice(&[0.1f32; 24], &[24], dev)?;
                let rv = Tensor::from_slice(&[2.0f32; 24], &[24], dev)?;
                batch_norm2d(t, &v[0], &v[1], &v[2], &rm, &rv, opts)
            };
            c.tape_op(
                &format!("batch_norm2d training={training}"),
                &[&[6, 24, 7, 7], &[24], &[24]],
                dt,
                tol(dt, 1e-4),
                bn,
            )?;
        }
        // The running statistics after one training step.
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

/// Row gathers (embedding, gather_rows) with repeated ids, whose backward adds several rows
/// into one (the counting-sort backward: the CPU's order, so f32 is bit-exact), and dropout
/// (the shared counter-based mask: the same elements dropped, the same bits in f32).
fn gather_dropout_checks(c: &mut Checker) -> Result<()> {
    use ops::dropout::dropout;
    use ops::embedding::embedding;
    use ops::gather::gather_rows;
    // 2 * 300 ids over a vocabulary of 1000: many repeats, many unused rows.
    let ids: Vec<i32> = (0..600u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as i32 % 1000)
        .collect();
    for dt in [DType::F32, DType::BF16] {
        let ids_e = ids.clone();
        c.tape_op(
            "embedding",
            &[&[1000, 96]],
            dt,
            tol(dt, 1e-6),
            move |t, v| {
                let dev = v[0].tensor().device();
                embedding(t, &v[0], &Tensor::from_slice(&ids_e, &[2, 300], dev)?)
            },
        )?;
        let ids_g: Vec<i32> = ids.iter().map(|i| i % 50).collect();
        c.tape_op(
            "gather_rows",
            &[&[50, 4, 7]],
            dt,
            tol(dt, 1e-6),
            move |t, v| {
                let dev = v[0].tensor().device();
                gather_rows(t, &v[0], &Tensor::from_slice(&ids_g, &[600], dev)?)
            },
        )?;
        c.tape_op("dropout p=0.1", &[&[37, 513]], dt, tol(dt, 1e-6), |t, v| {
            dropout(t, &v[0], 0.1, 0xd409, true)
        })?;
    }
    Ok(())
}

/// Pooling (ResNet's stem max-pool and head), the layout copies, reductions and broadcasting
/// binary ops (`layout.cu`: strided copies, per-output sequential sums, f64 whole-tensor sums).
fn pool_layout_checks(c: &mut Checker) -> Result<()> {
    use ops::elementwise::{mean, sum, sum_axis};
    use ops::layout::{concat, narrow, permute, transpose};
    use ops::pool::{global_avg_pool2d, max_pool2d};
    for dt in [DType::F32, DType::BF16] {
        c.tape_op(
            "max_pool2d 3x3 s2 p1",
            &[&[4, 8, 28, 27]],
            dt,
            tol(dt, 1e-6),
            |t, v| max_pool2d(t, &v[0], 3, 2, 1),
        )?;
        c.tape_op(
            "global_avg_pool2d",
            &[&[4, 64, 7, 7]],
            dt,
            tol(dt, 1e-6),
            |t, v| global_avg_pool2d(t, &v[0]),
        )?;
        c.tape_op("permute", &[&[2, 33, 12, 16]], dt, tol(dt, 1e-6), |t, v| {
            permute(t, &v[0], &[0, 2, 1, 3])
        })?;
        c.tape_op("transpose", &[&[37, 53]], dt, tol(dt, 1e-6), |t, v| {
            transpose(t, &v[0], 0, 1)
        })?;
        c.tape_op("narrow", &[&[5, 40, 9]], dt, tol(dt, 1e-6), |t, v| {
            narrow(t, &v[0], 1, 7, 20)
        })?;
        c.tape_op(
            "concat axis 1",
            &[&[3, 5, 8], &[3, 2, 8], &[3, 7, 8]],
            dt,
            tol(dt, 1e-6),
            |t, v| concat(t, &[&v[0], &v[1], &v[2]], 1),
        )?;
        c.tape_op("sum", &[&[300, 77]], dt, tol(dt, 1e-5), |t, v| {
            sum(t, &v[0])
        })?;
        c.tape_op("mean", &[&[300, 77]], dt, tol(dt, 1e-5), |t, v| {
            mean(t, &v[0])
        })?;
        c.tape_op("sum_axis 1", &[&[6, 50, 33]], dt, tol(dt, 1e-6), |t, v| {
            sum_axis(t, &v[0], 1, false)
        })?;
        // Broadcasting: a row vector, a [N, 1, D] against [N, S, D] (attention masks).
        c.tape_op(
            "add broadcast",
            &[&[64, 96], &[96]],
            dt,
            tol(dt, 1e-5),
            |t, v| add(t, &v[0], &v[1]),
        )?;
        c.tape_op(
            "sub broadcast",
            &[&[4, 1, 32], &[4, 17, 32]],
            dt,
            tol(dt, 1e-5),
            |t, v| sub(t, &v[0], &v[1]),
        )?;
        c.tape_op(
            "mul broadcast",
            &[&[4, 17, 32], &[4, 1, 32]],
            dt,
            tol(dt, 1e-5),
            |t, v| mul(t, &v[0], &v[1]),
        )?;
    }
    Ok(())
}

/// Attention, composed on the GPU of the product, scale, mask, softmax and dropout arms:
/// against the fused CPU op, with a padding mask (the last 7 keys of item 1) and dropout.
fn attention_checks(c: &mut Checker) -> Result<()> {
    use ops::{scaled_dot_product_attention, AttentionOptions};
    let mut mask = vec![1i32; 2 * 40];
    mask[40 + 33..].iter_mut().for_each(|m| *m = 0);
    for dt in [DType::F32, DType::BF16] {
        for training in [false, true] {
            let mask = mask.clone();
            let opts = AttentionOptions {
                dropout: 0.1,
                seed: 0xa77e,
                training,
            };
            c.tape_op(
                &format!("attention mask, dropout={training}"),
                &[&[2, 4, 33, 16], &[2, 4, 40, 16], &[2, 4, 40, 24]],
                dt,
                tol(dt, 1e-4),
                move |t, v| {
                    let m = Tensor::from_slice(&mask, &[2, 40], v[0].tensor().device())?;
                    scaled_dot_product_attention(t, &v[0], &v[1], &v[2], Some(&m), opts)
                },
            )?;
        }
    }
    Ok(())
}

fn tensor_checks(c: &mut Checker) -> Result<()> {
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

/// The GPU behind `device` (`cuda:N`).
fn ordinal_of(device: Device) -> Result<usize> {
    match device {
        Device::Cuda(n) => Ok(n),
        Device::Cpu => Err(Error::invalid(
            "gpu-check",
            "compares a GPU with the CPU: give a CUDA device (cuda:N)".to_string(),
        )),
    }
}

/// Bytes copied device → host on `device` so far (the context's counter).
fn bytes_to_host(device: Device) -> Result<u64> {
    Ok(cuda::alloc_stats(ordinal_of(device)?)?.bytes_to_host)
}

/// The i32 values as the device holds them (a download that bypasses the host copy).
fn device_i32(t: &Tensor) -> Result<Vec<i32>> {
    Ok(t.device_bytes()?
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// The host copy of i32 tensors uploaded from the CPU: reads of ids, labels and masks come
/// from it without a download, views read their own slice, every write into the device
/// storage keeps it true, and the attention's additive mask is made once per mask. Each row's
/// error is the number of bytes a read downloaded (it must download none: tolerance 0), or
/// infinite when the values read differ from the expected ones or from what the device holds
/// (read back on purpose, outside the measured read).
fn host_copy_checks(c: &mut Checker) -> Result<()> {
    let device = c.device;
    let shape = [6usize, 50];
    let text = dims(&shape);
    let mut want: Vec<i32> = (0..300).map(|i| i * 7 - 1000).collect();
    let t = Tensor::from_slice(&want, &shape, device)?;
    // Reads `v` on the host; the error: the bytes that read downloaded, or infinite when it
    // differs from `expect` or from the device's bytes.
    let check = |c: &mut Checker, name: &str, v: &Tensor, expect: &[i32]| -> Result<()> {
        let before = bytes_to_host(device)?;
        let got = v.to_vec::<i32>()?;
        let downloaded = bytes_to_host(device)? - before;
        let right = got == expect && device_i32(v)? == expect;
        let err = if right {
            downloaded as f64
        } else {
            f64::INFINITY
        };
        c.record_err(name, text.clone(), DType::I32, err, 0.0);
        Ok(())
    };
    check(c, "host copy: i32 upload read back", &t, &want)?;
    check(
        c,
        "host copy: view (rows 2..5) read back",
        &t.narrow_rows(2, 3)?,
        &want[100..250],
    )?;
    let new_row: Vec<i32> = (0..50).map(|i| 5000 + i).collect();
    t.narrow_rows(1, 1)?.copy_from_i32(&new_row)?;
    want[50..100].copy_from_slice(&new_row);
    check(c, "host copy: after copy_from_i32 into row 1", &t, &want)?;
    t.narrow_rows(4, 2)?.zero_()?;
    want[200..].fill(0);
    check(c, "host copy: after zero_ of rows 4..6", &t, &want)?;
    check(c, "host copy: deep_copy read back", &t.deep_copy()?, &want)?;
    let zeros = Tensor::zeros(&shape, DType::I32, device)?;
    check(
        c,
        "host copy: Tensor::zeros (i32) read back",
        &zeros,
        &[0; 300],
    )?;

    // The attention's padding mask: made into an additive mask once, kept with the mask, and
    // made again after a write into the mask.
    use ops::{scaled_dot_product_attention, AttentionOptions};
    let (b, h, s, d) = (2usize, 4usize, 40usize, 16usize);
    let mut mask = vec![1i32; b * s];
    mask[s + 33..].fill(0);
    let mask_gpu = Tensor::from_slice(&mask, &[b, s], device)?;
    let (q_cpu, q_gpu) = c.fresh(&[b, h, s, d], DType::F32)?;
    let (k_cpu, k_gpu) = c.fresh(&[b, h, s, d], DType::F32)?;
    let (v_cpu, v_gpu) = c.fresh(&[b, h, s, d], DType::F32)?;
    let opts = AttentionOptions {
        dropout: 0.0,
        seed: 0,
        training: false,
    };
    let attend = |q: &Tensor, k: &Tensor, v: &Tensor, m: &Tensor| -> Result<Tensor> {
        let tape = Tape::inference();
        let (q, k, v) = (
            tape.constant(q.clone()),
            tape.constant(k.clone()),
            tape.constant(v.clone()),
        );
        Ok(scaled_dot_product_attention(&tape, &q, &k, &v, Some(m), opts)?.into_tensor())
    };
    let stats = || cuda::alloc_stats(ordinal_of(device)?);
    let text = format!("[{b}, {h}, {s}, {d}], mask [{b}, {s}]");
    let s0 = stats()?;
    attend(&q_gpu, &k_gpu, &v_gpu, &mask_gpu)?;
    let s1 = stats()?;
    let y_gpu = attend(&q_gpu, &k_gpu, &v_gpu, &mask_gpu)?;
    let s2 = stats()?;
    c.record_err(
        "host copy: attention mask, two calls download nothing",
        text.clone(),
        DType::F32,
        (s2.bytes_to_host - s0.bytes_to_host) as f64,
        0.0,
    );
    // Both calls upload the same shape words of their layout and broadcast kernels; the first
    // also uploads the additive mask (f32, then cast on the device), the second reuses it: the
    // difference must be exactly the mask's bytes.
    let first = s1.bytes_to_device - s0.bytes_to_device;
    let second = s2.bytes_to_device - s1.bytes_to_device;
    let mask_bytes = (b * s * 4) as u64;
    c.record_err(
        "host copy: attention mask, second call uploads no additive mask (bytes off)",
        text.clone(),
        DType::F32,
        (first as f64 - second as f64 - mask_bytes as f64).abs(),
        0.0,
    );
    let mask_cpu = Tensor::from_slice(&mask, &[b, s], Device::Cpu)?;
    c.record(
        "host copy: attention with the kept additive mask",
        text.clone(),
        DType::F32,
        &y_gpu,
        &attend(&q_cpu, &k_cpu, &v_cpu, &mask_cpu)?,
        1e-4,
    )?;
    // A write into the mask drops the kept additive mask: the next call sees the new padding.
    mask[20..s].fill(0);
    mask_gpu.copy_from_i32(&mask)?;
    let mask_cpu = Tensor::from_slice(&mask, &[b, s], Device::Cpu)?;
    c.record(
        "host copy: attention after a write into the mask",
        text,
        DType::F32,
        &attend(&q_gpu, &k_gpu, &v_gpu, &mask_gpu)?,
        &attend(&q_cpu, &k_cpu, &v_cpu, &mask_cpu)?,
        1e-4,
    )?;
    Ok(())
}

fn cross_entropy_checks(c: &mut Checker) -> Result<()> {
    for dt in [DType::F32, DType::BF16] {
        for (rows, classes, smoothing) in [(64usize, 1000usize, 0.0f32), (48, 30_522, 0.1)] {
            c.seed += 1;
            let labels: Vec<i32> = (0..rows)
                .map(|r| {
                    if r % 7 == 3 {
                        -100
                    } else {
                        ((r as u64 * 2_654_435_761 + c.seed) % classes as u64) as i32
                    }
                })
                .collect();
            let labels = Tensor::from_vec(labels, &[rows], Device::Cpu)?;
            let opts = CrossEntropyOptions {
                ignore_index: Some(-100),
                label_smoothing: smoothing,
            };
            c.tape_op(
                &format!("cross_entropy (smoothing {smoothing})"),
                &[&[rows, classes]],
                dt,
                tol(dt, 1e-5),
                |t, v| ops::cross_entropy(t, &v[0], &labels, opts),
            )?;
        }
    }
    Ok(())
}

fn optimizer_checks(c: &mut Checker) -> Result<()> {
    let n = 100_003;
    let specs = vec![("w".to_string(), vec![n])];
    for which in ["sgdw", "adamw"] {
        let p_cpu = FlatParams::new(&specs, Device::Cpu)?;
        let p_gpu = FlatParams::new(&specs, c.device)?;
        let (w_cpu, _) = c.fresh(&[n], DType::F32)?;
        p_cpu.set("w", &w_cpu)?;
        p_gpu.set("w", &w_cpu)?;
        let mut opts: Vec<Box<dyn Optimizer>> = match which {
            "sgdw" => vec![
                Box::new(Sgdw::paper(n, 0.1)?),
                Box::new(Sgdw::paper(n, 0.1)?),
            ],
            _ => vec![
                Box::new(AdamW::torch_default(n)?),
                Box::new(AdamW::torch_default(n)?),
            ],
        };
        for step in 0..3 {
            let (g_cpu, _) = c.fresh(&[n], DType::F32)?;
            p_cpu.grads().copy_from(&g_cpu)?;
            p_gpu.grads().copy_from(&g_cpu)?;
            let lr = 0.1 / (step + 1) as f32;
            opts[0].step(&p_cpu, lr)?;
            opts[1].step(&p_gpu, lr)?;
        }
        let shapes = format!("[{n}] x 3 steps");
        c.record(
            &format!("{which} step: parameters"),
            shapes.clone(),
            DType::F32,
            p_gpu.values(),
            p_cpu.values(),
            1e-6,
        )?;
        let (s_cpu, s_gpu) = (opts[0].state(), opts[1].state());
        for ((name, sc), (_, sg)) in s_cpu.iter().zip(&s_gpu) {
            if sc.dtype() == DType::I32 {
                continue;
            }
            c.record(
                &format!("{which} step: {name}"),
                shapes.clone(),
                DType::F32,
                sg,
                sc,
                1e-6,
            )?;
        }
    }
    Ok(())
}

/// The fused distillation loss against its CPU twin at the vocabulary sizes of the issue: 10
/// (Fashion-MNIST classes), 1000 (ImageNet) and 30522 (BERT's WordPiece vocabulary, a row
/// longer than any block: the kernel strides over it).
fn kd_loss_checks(c: &mut Checker) -> Result<()> {
    let cases = [
        (
            "kd_loss KL T=4, 2 teachers",
            KdLoss::kl(4.0, 0.7),
            2usize,
            false,
        ),
        (
            "kd_loss KL T=2, 3 teachers, mask",
            KdLoss::kl(2.0, 1.0),
            3,
            true,
        ),
        ("kd_loss MSE, 1 teacher", KdLoss::mse(0.5), 1, false),
        ("kd_loss CE only", KdLoss::kl(4.0, 0.5), 0, false),
    ];
    for (name, cfg, k, masked) in cases {
        for (rows, classes) in [(128usize, 10usize), (64, 1000), (16, 30_522)] {
            // f32 student logits with bf16 teacher logits: the trainer's default on a GPU (f32
            // activations, bf16 teachers), kernels `kd_loss_{kl,mse}_f32_bf16`.
            for (s_dt, t_dt) in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::F32, DType::BF16),
            ] {
                if k == 0 && s_dt != t_dt {
                    continue; // no teacher logits: the (f32, f32) row already
                }
                let (s_cpu, s_gpu) = c.fresh(&[rows, classes], s_dt)?;
                let mut t_cpu = Vec::new();
                let mut t_gpu = Vec::new();
                for _ in 0..k {
                    let (tc, tg) = c.fresh(&[rows, classes], t_dt)?;
                    t_cpu.push(tc);
                    t_gpu.push(tg);
                }
                let labels: Vec<i32> = (0..rows)
                    .map(|r| {
                        if r % 5 == 2 {
                            -100
                        } else {
                            ((r * 7919 + c.seed as usize) % classes) as i32
                        }
                    })
                    .collect();
                let labels = Tensor::from_vec(labels, &[rows], Device::Cpu)?;
                let mask = if masked {
                    let m: Vec<i32> = (0..rows).map(|r| (r % 3 != 0) as i32).collect();
                    Some(Tensor::from_vec(m, &[rows], Device::Cpu)?)
                } else {
                    None
                };
                let run = |s: &Tensor, ts: &[Tensor]| -> Result<(Tensor, Tensor)> {
                    let tape = Tape::recording();
                    let sv = tape.watch(s.clone());
                    let out = kd_loss(&tape, &cfg, &sv, ts, &labels, mask.as_ref())?;
                    let g = tape.backward(&out.total)?;
                    let grad = g.get(&sv).cloned().ok_or_else(|| {
                        Error::Autograd("kd_loss: no gradient for the student".into())
                    })?;
                    let losses = Tensor::f32(
                        vec![out.ce, out.kd, out.total.tensor().to_scalar_f32()?],
                        &[3],
                    )?;
                    Ok((losses, grad))
                };
                let (l_gpu, g_gpu) = run(&s_gpu, &t_gpu)?;
                let (l_cpu, g_cpu) = run(&s_cpu, &t_cpu)?;
                let shapes = if s_dt == t_dt {
                    format!("[{rows}, {classes}] x {k} teachers")
                } else {
                    format!("[{rows}, {classes}] x {k} {t_dt} teachers")
                };
                c.record(
                    &format!("{name}: ce, kd, total"),
                    shapes.clone(),
                    s_dt,
                    &l_gpu,
                    &l_cpu,
                    1e-4,
                )?;
                c.record(
                    &format!("{name}: gradient"),
                    shapes,
                    s_dt,
                    &g_gpu,
                    &g_cpu,
                    tol(s_dt, 1e-4),
                )?;
            }
        }
    }
    Ok(())
}

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

fn allocation_check(c: &mut Checker) -> Result<(u64, String)> {
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
    let ordinal = match c.device {
        Device::Cuda(n) => n,
        Device::Cpu => 0,
    };
    let mut losses = (Vec::new(), Vec::new());
    let mut per_step = 0;
    for step in 0..3 {
        let before = cuda::alloc_stats(ordinal)?;
        losses
            .1
            .push(synthetic_step(&p_gpu, &mut o_gpu, &x_gpu, &labels_gpu)?);
        cuda::synchronize(c.device)?;
        per_step = cuda::alloc_stats(ordinal)?.allocations_since(&before);
        losses
            .0
            .push(synthetic_step(&p_cpu, &mut o_cpu, &x_cpu, &labels_cpu)?);
        let _ = step;
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

/// The small models of the step check: a ResNet-18 with the small stem at width 1/8 on a
/// batch of 8 1x28x28 images (10 classes), and BERT-tiny on 4 sequences of 32 tokens from a
/// vocabulary of 512 (15% masked).
pub fn small_step_cases() -> Result<Vec<(String, Architecture, Batch)>> {
    let mut resnet = ResNetConfig::new(18, 10);
    resnet.in_channels = 1;
    resnet.small_stem = true;
    resnet.width = 0.125;
    Ok(vec![
        (
            "ResNet-18 small stem, width 1/8".to_string(),
            Architecture::ResNet(resnet),
            image_batch(8, 1, 28, 10, 0x1a)?,
        ),
        (
            "BERT-tiny, vocabulary 512".to_string(),
            Architecture::Bert(BertConfig::tiny(512)),
            crate::bench::mlm_batch(4, 32, 512)?,
        ),
    ])
}

/// `n` random `c x hw x hw` images (normal, f32, on the CPU) and labels in `[0, classes)`.
fn image_batch(n: usize, c: usize, hw: usize, classes: usize, seed: u64) -> Result<Batch> {
    let x = Tensor::randn(&[n, c, hw, hw], 0.0, 1.0, seed, DType::F32, Device::Cpu)?;
    let mut rng = recycle_engine::rng::Rng::new(seed + 1);
    let labels: Vec<i32> = (0..n).map(|_| rng.below(classes as u64) as i32).collect();
    Ok(Batch::Image {
        x,
        labels: Tensor::from_vec(labels, &[n], Device::Cpu)?,
    })
}

/// The shapes column of a model-step row.
fn batch_text(batch: &Batch) -> String {
    match batch {
        Batch::Image { x, .. } => format!("{:?}", x.shape()),
        Batch::Mlm(b) => format!(
            "{:?} tokens, {} masked",
            b.input_ids.shape(),
            b.labels.elem_count()
        ),
    }
}

/// Euclidean norm, accumulated in f64.
pub fn l2_norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// Relative difference of two scalars (infinite when either is not finite).
pub fn scalar_rel_err(gpu: f64, cpu: f64) -> f64 {
    if !gpu.is_finite() || !cpu.is_finite() {
        return f64::INFINITY;
    }
    (gpu - cpu).abs() / cpu.abs().max(f64::MIN_POSITIVE)
}

/// Relative L2 error `‖gpu − cpu‖ / ‖cpu‖` (f64), infinite for a length mismatch or a
/// non-finite value: the measure of the bf16 model-step rows, where single elements near zero
/// carry no information (their bf16 rounding is as large as they are) but the vector as a
/// whole must agree.
pub fn rel_l2_err(gpu: &[f32], cpu: &[f32]) -> f64 {
    if gpu.len() != cpu.len() || gpu.iter().chain(cpu).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let diff: f64 = gpu
        .iter()
        .zip(cpu)
        .map(|(&g, &c)| (g as f64 - c as f64).powi(2))
        .sum();
    diff.sqrt() / l2_norm(cpu).max(f64::MIN_POSITIVE)
}

/// Tolerances of the bf16 model-step rows of `arch`: (loss, gradient norm, gradient and
/// parameter update as relative L2 errors).
///
/// Both devices start from the same f32 master weights and the same bf16 working copy, and
/// both hand the loss bf16 logits; they differ in where they round. The GPU rounds every
/// activation and every gradient of the step to bf16 (8 significant bits: up to 2^-9 ≈ 2e-3
/// relative per op); the CPU rounds the input (or the embeddings), the logits and, where it
/// has bf16 products, the inputs of convolutions and linear layers, and computes in f32 in
/// between. How far that moves a step depends on the model, so the tolerances are set from
/// the CPU's own bf16-versus-f32 differences (`bf16_model_steps_run_on_the_cpu` keeps them
/// below half of these), the GPU's extra roundings being of the same kind:
///
/// - BERT-tiny is well conditioned: bf16 against f32 moves the loss and the gradient norm by
///   ~1e-4 and the gradient by 3e-3 (relative L2). Tolerances 1e-2, 2e-2, 5e-2.
/// - The small ResNet is not: a training-mode BatchNorm network at initialisation is chaotic in
///   its gradients (each BatchNorm backward subtracts the gradient's projection on the batch
///   mean and on the normalised input, cancelling most of it), so rounding only its weights to
///   bf16 already turns the gradient by 22% (relative L2; 26% with the input too), while the
///   loss moves by 4e-5 and the gradient norm by 2%. Tolerances 1e-2 on the loss, 1e-1 on the
///   norm and 0.75 on the gradient and the update: that still fails a missing, zero,
///   sign-flipped or unrelated gradient (relative L2 ≥ 1), not a wrong layer among twenty.
///
/// First estimates, to revise once the check has run on a GPU.
fn bf16_step_tolerances(arch: &Architecture) -> (f64, f64, f64) {
    match arch {
        Architecture::ResNet(_) => (1e-2, 1e-1, 0.75),
        Architecture::Bert(_) => (1e-2, 2e-2, 5e-2),
    }
}

/// Bytes a training step (`forward_backward`, no teachers) on the GPU copies back to the host
/// when its batch was uploaded from the CPU. Ids, labels, masked positions, the padding mask
/// and BatchNorm's step counters are read from their host copies (`Tensor::to_device` keeps
/// the values of an i32 upload), so what remains is:
/// - 12: the fused loss's totals (CE, KD, their sum) in one copy: the loss the step returns and
///   its terms for the metrics log, the one read a step needs;
/// - 4: the backward's seed (1.0, uploaded by `Tape::backward`), read back by the fused loss's
///   backward to scale its gradient.
///
/// The second comes right after the first, when the stream holds nothing but a 4-byte upload,
/// so it waits for nothing (`forward_backward` takes the loss's value from the fused loss, not
/// from its tensor). Any id or mask read that downloads is at least 4 bytes per element (76
/// bytes for BERT-tiny's ~19 masked positions, 80 for ResNet's 20 step counters), so it shows.
pub const STEP_BYTES_TO_HOST: u64 = 12 + 4;

/// One training step of each small model on the GPU and on the CPU, from the same weights and
/// batch: loss, gradient norm, flat gradient, and the parameters after an SGDW update; first
/// in f32, then with bf16 activations and the bf16 working copy of the weights
/// (`Model::with_activations`).
///
/// f32: parameters and activations f32; tolerances allow for cuDNN's and cuBLASLt's summation
/// orders compounding through the layers: 1e-4 on the loss and the gradient norm, 1e-3 on each
/// gradient element (relative to the gradient's scale near zero) and on the updated
/// parameters.
///
/// bf16: rows with dtype bf16, compared as relative L2 errors ([`bf16_step_tolerances`] says
/// why and how much), the update (parameters after minus before) instead of the parameters
/// (which the update barely moves), and one exact row: after the GPU's SGDW step, its working
/// copy must be its own master rounded to bf16, bit for bit (the kernel's `working` output).
fn model_step_checks(c: &mut Checker) -> Result<()> {
    let loss = KdLoss::kl(4.0, 1.0);
    let (lr, seed) = (0.05f32, 0x57e9);
    for activations in [DType::F32, DType::BF16] {
        for (name, arch, batch_cpu) in small_step_cases()? {
            let cpu = Model::new(&arch, 11)?;
            let cpu = match activations {
                DType::F32 => cpu,
                dt => cpu.with_activations(dt)?,
            };
            // The working copy travels with the model: both devices read the same bf16 weights.
            let gpu = cpu.to_device(c.device)?;
            let batch_gpu = batch_cpu.to_device(c.device)?;
            let before = bytes_to_host(c.device)?;
            let out_gpu = forward_backward(&gpu, None, &loss, &batch_gpu, lr, 0, seed)?;
            let downloaded = bytes_to_host(c.device)? - before;
            let out_cpu = forward_backward(&cpu, None, &loss, &batch_cpu, lr, 0, seed)?;
            let (p_gpu, p_cpu) = (gpu.params()?, cpu.params()?);
            let g_gpu = p_gpu.grads().to_vec_f32()?;
            let g_cpu = p_cpu.grads().to_vec_f32()?;
            let before = p_cpu.values().to_vec_f32()?;
            let shapes = batch_text(&batch_cpu);
            let bf16 = activations == DType::BF16;
            let (t_loss, t_norm, t_vec) = if bf16 {
                bf16_step_tolerances(&arch)
            } else {
                (1e-4, 1e-4, 1e-3)
            };
            c.record_err(
                &format!("{name} step: loss"),
                shapes.clone(),
                activations,
                scalar_rel_err(out_gpu.loss as f64, out_cpu.loss as f64),
                t_loss,
            );
            c.record_err(
                &format!("{name} step: bytes copied to the host (batch uploaded from the CPU)"),
                shapes.clone(),
                activations,
                downloaded as f64,
                STEP_BYTES_TO_HOST as f64,
            );
            c.record_err(
                &format!("{name} step: gradient norm"),
                shapes.clone(),
                activations,
                scalar_rel_err(l2_norm(&g_gpu), l2_norm(&g_cpu)),
                t_norm,
            );
            let (measure, g_err) = if bf16 {
                (", relative L2", rel_l2_err(&g_gpu, &g_cpu))
            } else {
                ("", max_rel_err(&g_gpu, &g_cpu))
            };
            c.record_err(
                &format!("{name} step: gradient ({} scalars{measure})", g_cpu.len()),
                shapes.clone(),
                activations,
                g_err,
                t_vec,
            );
            let mut o_gpu = Sgdw::paper(p_gpu.len(), lr as f64)?;
            let mut o_cpu = Sgdw::paper(p_cpu.len(), lr as f64)?;
            o_gpu.step(p_gpu, lr)?;
            o_cpu.step(p_cpu, lr)?;
            if !bf16 {
                c.record(
                    &format!("{name} step: parameters after SGDW"),
                    shapes,
                    DType::F32,
                    p_gpu.values(),
                    p_cpu.values(),
                    t_vec,
                )?;
                continue;
            }
            let update = |after: Vec<f32>| -> Vec<f32> {
                after.iter().zip(&before).map(|(a, b)| a - b).collect()
            };
            c.record_err(
                &format!("{name} step: SGDW update (relative L2)"),
                shapes.clone(),
                activations,
                rel_l2_err(
                    &update(p_gpu.values().to_vec_f32()?),
                    &update(p_cpu.values().to_vec_f32()?),
                ),
                t_vec,
            );
            let working = p_gpu.working().ok_or_else(|| {
                Error::invalid(
                    "gpu-check",
                    "the bf16 model has no working copy".to_string(),
                )
            })?;
            c.record(
                &format!("{name} step: working copy = bf16(master) after SGDW"),
                shapes,
                activations,
                working,
                // The reference rounding is the CPU's (`half`'s round to nearest even).
                &p_gpu.values().to_device(Device::Cpu)?.cast(DType::BF16)?,
                0.0,
            )?;
        }
    }
    Ok(())
}

/// The teacher stream, as `train_step` runs a distillation step: one step of each small model
/// with a one-teacher pool, the teacher's forward queued on the teacher stream
/// (`cuda::on_stream`) and joined right before the fused loss, against the same step on the GPU
/// with the teacher's logits computed first on the student stream (the order the CPU test
/// `teachers_first_changes_no_bit_on_the_cpu` pins down). The teacher is made as the trainer
/// makes it on a GPU (bf16 weights, bf16 activations), the student computes in f32. Every
/// kernel is deterministic, so the loss, the KD term and the gradient must agree bit for bit
/// (tolerance 0): a missing or misplaced join reads poisoned (NaN) or unfinished teacher logits,
/// and the per-stream cuBLASLt workspaces, cuDNN handles and the teacher's per-call padding
/// bias run here for the first time.
fn teacher_stream_checks(c: &mut Checker) -> Result<()> {
    use crate::distill::{TeacherEntry, TeacherPool, TeacherStrategy};
    let loss = KdLoss::kl(4.0, 1.0);
    let (lr, step, seed) = (0.05f32, 3u64, 0x7eac);
    for (name, arch, batch_cpu) in small_step_cases()? {
        // Two students with the same weights and their own buffers (on the CPU, where this
        // runs in the unit tests, `to_device` would share one).
        let device = c.device;
        let student = || Model::new(&arch, 21)?.to_device(device);
        let teacher = Model::new(&arch, 22)?
            .teacher(DType::BF16)?
            .with_activations(DType::BF16)?
            .to_device(device)?;
        let pool = TeacherPool::new(
            vec![TeacherEntry {
                name: "teacher".to_string(),
                accuracy: 0.5,
                model: teacher,
            }],
            TeacherStrategy::Single,
            1,
        )?;
        let batch = batch_cpu.to_device(device)?;
        let shapes = batch_text(&batch_cpu);

        // Through the teacher stream.
        let scoped = student()?;
        let out = forward_backward(&scoped, Some(&pool), &loss, &batch, lr, step, seed)?;

        // Everything on the student stream: the teacher first, then the student.
        let plain = student()?;
        let teacher_logits = pool.logits(step, |t| {
            Ok(t.logits(&Tape::inference(), &batch, false, 0)?
                .into_tensor())
        })?;
        let tape = Tape::recording();
        let dropout_seed = recycle_engine::rng::bits_at(seed, step);
        let logits = plain.logits(&tape, &batch, true, dropout_seed)?;
        let o = kd_loss(&tape, &loss, &logits, &teacher_logits, batch.labels(), None)?;
        tape.backward(&o.total)?;

        let row = |what: &str| format!("{name} KD step, teacher stream vs student stream: {what}");
        c.record_err(
            &row("loss"),
            shapes.clone(),
            DType::F32,
            scalar_rel_err(out.loss as f64, o.total_value as f64),
            0.0,
        );
        c.record_err(
            &row("KD term"),
            shapes.clone(),
            DType::F32,
            scalar_rel_err(out.kd.unwrap_or(f32::NAN) as f64, o.kd as f64),
            0.0,
        );
        c.record(
            &row("gradient"),
            shapes,
            DType::F32,
            scoped.params()?.grads(),
            plain.params()?.grads(),
            0.0,
        )?;
    }
    Ok(())
}

/// The NCCL all-reduce group over the checked GPU alone: with one rank the mean is the input,
/// bit for bit (NCCL divides by 1), so the tolerance is 0 — what it checks is that the group
/// is made, the reduction is queued on the communication stream between the two events, and
/// the buffer comes back untouched. A group that cannot be made (no libnccl.so.2) is a failed
/// row naming the error, not the end of the report.
fn all_reduce_checks(c: &mut Checker) -> Result<()> {
    let mut group = match cuda::AllReduceGroup::new(&[c.device]) {
        Ok(g) => g,
        Err(e) => {
            c.record_err(
                &format!("all_reduce_mean (NCCL): {e}"),
                "-".to_string(),
                DType::F32,
                f64::INFINITY,
                0.0,
            );
            return Ok(());
        }
    };
    for dt in [DType::F32, DType::BF16] {
        let (cpu, gpu) = c.fresh(&[1 << 20], dt)?;
        group.all_reduce_mean(&[&gpu])?;
        c.record(
            "all_reduce_mean (NCCL), 1 rank",
            dims(&[1 << 20]),
            dt,
            &gpu,
            &cpu,
            0.0,
        )?;
    }
    Ok(())
}

/// The large models of the throughput measurement, both with bf16 activations and the bf16
/// working copy of their f32 master weights (`Model::with_activations`): ResNet-50 on 256
/// 3x224x224 images (1000 classes; the model casts the f32 images to bf16 first) and BERT-base
/// on 128 sequences of 128 tokens (vocabulary 30522; the embedding sum is cast, so the encoder
/// and the MLM head run in bf16).
fn throughput_cases() -> Result<Vec<(String, Architecture, Batch, DType)>> {
    Ok(vec![
        (
            "ResNet-50".to_string(),
            Architecture::ResNet(ResNetConfig::new(50, 1000)),
            image_batch(256, 3, 224, 1000, 0x50)?,
            DType::BF16,
        ),
        (
            "BERT-base".to_string(),
            Architecture::Bert(BertConfig::base(30_522)),
            crate::bench::mlm_batch(128, 128, 30_522)?,
            DType::BF16,
        ),
    ])
}

/// Seconds per plain training step (train_step with SGDW, no teachers) of `arch` computing in
/// `activations` on `device`: `warmup` untimed steps, then `steps` timed ones closed by a
/// device synchronisation.
fn time_steps(
    device: Device,
    arch: &Architecture,
    batch: &Batch,
    activations: DType,
    (warmup, steps): (usize, usize),
) -> Result<f64> {
    let model = Model::new(arch, 5)?
        .with_activations(activations)?
        .to_device(device)?;
    let batch = batch.to_device(device)?;
    let params = model.params()?;
    let mut opt = Sgdw::paper(params.len(), 0.01)?;
    let loss = KdLoss::kl(4.0, 1.0);
    for step in 0..warmup {
        train_step(&model, None, &loss, &batch, &mut opt, 0.01, step as u64, 1)?;
    }
    cuda::synchronize(device)?;
    let t0 = std::time::Instant::now();
    for step in warmup..warmup + steps {
        train_step(&model, None, &loss, &batch, &mut opt, 0.01, step as u64, 1)?;
    }
    cuda::synchronize(device)?;
    Ok(t0.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// The throughput of a plain training step of ResNet-50 and BERT-base on `device` (a GPU),
/// run after `run` (`recycle gpu-check` prints the table first). A model that fails to step
/// gets its error in its row; the error returned is the device's (none, or not a GPU).
pub fn throughput(device: Device, opts: &ThroughputOptions) -> Result<Vec<ThroughputRow>> {
    let ordinal = match device {
        Device::Cuda(n) => n,
        Device::Cpu => {
            return Err(Error::invalid(
                "gpu-check",
                "measures a GPU: give a CUDA device (cuda:N)".to_string(),
            ))
        }
    };
    cuda::device_info(ordinal)?;
    let mut rows = Vec::new();
    for (model, arch, batch, activations) in throughput_cases()? {
        let counts = (opts.warmup_steps, opts.timed_steps);
        let outcome =
            time_steps(device, &arch, &batch, activations, counts).map_err(|e| e.to_string());
        rows.push(ThroughputRow {
            model,
            batch: batch_text(&batch),
            activations,
            samples_per_step: batch.samples(),
            timed_steps: opts.timed_steps,
            outcome,
        });
    }
    Ok(rows)
}

/// Runs every check on `device` (a GPU) and returns the report; the first error is opening
/// the device when there is none.
pub fn run(device: Device) -> Result<GpuCheckReport> {
    let ordinal = match device {
        Device::Cuda(n) => n,
        Device::Cpu => {
            return Err(Error::invalid(
                "gpu-check",
                "compares a GPU with the CPU: give a CUDA device (cuda:N)".to_string(),
            ))
        }
    };
    let info = cuda::device_info(ordinal)?;
    cuda::set_poison_allocations(ordinal, true)?;
    let mut c = Checker {
        device,
        seed: 0,
        rows: Vec::new(),
    };
    tensor_checks(&mut c)?;
    host_copy_checks(&mut c)?;
    elementwise_checks(&mut c)?;
    matmul_checks(&mut c)?;
    conv_checks(&mut c)?;
    norm_checks(&mut c)?;
    gather_dropout_checks(&mut c)?;
    pool_layout_checks(&mut c)?;
    attention_checks(&mut c)?;
    cross_entropy_checks(&mut c)?;
    optimizer_checks(&mut c)?;
    kd_loss_checks(&mut c)?;
    let (allocations_per_step, step_description) = allocation_check(&mut c)?;
    model_step_checks(&mut c)?;
    teacher_stream_checks(&mut c)?;
    all_reduce_checks(&mut c)?;
    cuda::synchronize(device)?;
    cuda::set_poison_allocations(ordinal, false)?;
    Ok(GpuCheckReport {
        device: info,
        rows: c.rows,
        allocations_per_step,
        step_description,
        stats: cuda::alloc_stats(ordinal)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_counts_nan_and_scale() {
        assert_eq!(max_rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((max_rel_err(&[1.001, 2.0], &[1.0, 2.0]) - 1e-3).abs() < 1e-6);
        // A poisoned (never written) element is a failure, whatever the tolerance.
        assert_eq!(max_rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]), f64::INFINITY);
        assert_eq!(max_rel_err(&[1.0], &[1.0, 2.0]), f64::INFINITY);
        // Near zero the error is relative to the tensor's scale, not to the tiny value.
        let e = max_rel_err(&[1e-8, 100.0], &[0.0, 100.0]);
        assert!(e < 1e-6, "{e}");
        // Where the oracle is NaN (a row of -inf), the GPU must be NaN too.
        assert_eq!(max_rel_err(&[f32::NAN], &[f32::NAN]), 0.0);
        assert_eq!(max_rel_err(&[0.0], &[f32::NAN]), f64::INFINITY);
    }

    #[test]
    fn table_has_every_column() {
        let rows = vec![CheckRow {
            op: "relu".into(),
            shapes: "[2, 3]".into(),
            dtype: DType::BF16,
            max_rel_err: 1.5e-3,
            tolerance: 2e-2,
            pass: true,
        }];
        let t = format_table(&rows);
        assert!(t.contains("| op | shapes | dtype | max rel err | tolerance | pass |"));
        assert!(
            t.contains("| relu | [2, 3] | bf16 | 1.500e-3 | 2e-2 | pass |"),
            "{t}"
        );
    }

    #[test]
    fn scalar_errors_and_norms() {
        assert_eq!(l2_norm(&[3.0, 4.0]), 5.0);
        assert_eq!(scalar_rel_err(2.0, 2.0), 0.0);
        assert!((scalar_rel_err(2.002, 2.0) - 1e-3).abs() < 1e-9);
        assert_eq!(scalar_rel_err(f64::NAN, 2.0), f64::INFINITY);
    }

    #[test]
    fn throughput_table_shows_rates_and_errors() {
        let rows = vec![
            ThroughputRow {
                model: "ResNet-50".into(),
                batch: "[256, 3, 224, 224]".into(),
                activations: DType::BF16,
                samples_per_step: 256,
                timed_steps: 10,
                outcome: Ok(0.5),
            },
            ThroughputRow {
                model: "BERT-base".into(),
                batch: "[128, 128] tokens".into(),
                activations: DType::BF16,
                samples_per_step: 128,
                timed_steps: 10,
                outcome: Err("out of memory".into()),
            },
        ];
        assert_eq!(rows[0].samples_per_second(), Some(512.0));
        let t = format_throughput(&rows);
        assert!(
            t.contains("| ResNet-50 | [256, 3, 224, 224] | bf16 | 10 | 500.0 | 512.0 |"),
            "{t}"
        );
        assert!(
            t.contains("| BERT-base | [128, 128] tokens | bf16 | 10 | - | error: out of memory |"),
            "{t}"
        );
    }

    /// Both throughput models train in bf16 (BERT too, now that it has a bf16 mode), from f32
    /// inputs the models cast themselves.
    #[test]
    fn throughput_cases_run_in_bf16() {
        let cases = throughput_cases().unwrap();
        assert_eq!(cases.len(), 2);
        for (name, _, batch, activations) in &cases {
            assert_eq!(*activations, DType::BF16, "{name}");
            if let Batch::Image { x, .. } = batch {
                assert_eq!(x.dtype(), DType::F32);
                assert_eq!(x.shape(), &[256, 3, 224, 224]);
            }
        }
        assert!(matches!(cases[1].2, Batch::Mlm(_)));
    }

    #[test]
    fn relative_l2_error() {
        assert_eq!(rel_l2_err(&[3.0, 4.0], &[3.0, 4.0]), 0.0);
        assert!((rel_l2_err(&[3.0, 4.5], &[3.0, 4.0]) - 0.1).abs() < 1e-12);
        assert_eq!(rel_l2_err(&[f32::NAN, 4.0], &[3.0, 4.0]), f64::INFINITY);
        assert_eq!(rel_l2_err(&[3.0], &[3.0, 4.0]), f64::INFINITY);
    }

    /// The bf16 step rows' path on the CPU: a model with bf16 activations and a working copy
    /// steps with a finite loss and a non-zero gradient, and a copy moved to the CPU (as the
    /// check moves it to the GPU, working copy included) gives the same bits. Against the f32
    /// step, its own roundings stay below half of the bf16 tolerances (which are set from
    /// these differences: the GPU rounds more often, not differently).
    #[test]
    fn bf16_model_steps_run_on_the_cpu() {
        let loss = KdLoss::kl(4.0, 1.0);
        for (name, arch, batch) in small_step_cases().unwrap() {
            let (t_loss, t_norm, t_vec) = bf16_step_tolerances(&arch);
            let f = Model::new(&arch, 11).unwrap();
            let b = Model::new(&arch, 11)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap();
            let moved = Model::new(&arch, 11)
                .unwrap()
                .with_activations(DType::BF16)
                .unwrap()
                .to_device(Device::Cpu)
                .unwrap();
            assert!(moved.params().unwrap().working().is_some(), "{name}");
            let of = forward_backward(&f, None, &loss, &batch, 0.05, 0, 7).unwrap();
            let ob = forward_backward(&b, None, &loss, &batch, 0.05, 0, 7).unwrap();
            assert!(ob.loss.is_finite(), "{name}");
            let gf = f.params().unwrap().grads().to_vec_f32().unwrap();
            let gb = b.params().unwrap().grads().to_vec_f32().unwrap();
            assert!(l2_norm(&gb) > 0.0, "{name}");
            let e_loss = scalar_rel_err(ob.loss as f64, of.loss as f64);
            let e_norm = scalar_rel_err(l2_norm(&gb), l2_norm(&gf));
            let e_grad = rel_l2_err(&gb, &gf);
            assert!(e_loss > 0.0 && e_grad > 0.0, "{name}: bf16 changed nothing");
            assert!(e_loss < t_loss / 2.0, "{name}: loss {e_loss}");
            assert!(e_norm < t_norm / 2.0, "{name}: gradient norm {e_norm}");
            assert!(e_grad < t_vec / 2.0, "{name}: gradient {e_grad}");

            let batch_moved = batch.to_device(Device::Cpu).unwrap();
            let om = forward_backward(&moved, None, &loss, &batch_moved, 0.05, 0, 7).unwrap();
            assert_eq!(om.loss.to_bits(), ob.loss.to_bits(), "{name}");
            let gm = moved.params().unwrap().grads().to_vec_f32().unwrap();
            assert_eq!(max_rel_err(&gm, &gb), 0.0, "{name}");
        }
    }

    /// The teacher-stream rows on the CPU, where the scope runs the teacher in place: every
    /// row passes at tolerance 0 (the GPU run must match the same way), and the KD term is
    /// there to compare.
    #[test]
    fn teacher_stream_rows_pass_on_the_cpu() {
        let mut c = Checker {
            device: Device::Cpu,
            seed: 0,
            rows: Vec::new(),
        };
        teacher_stream_checks(&mut c).unwrap();
        assert_eq!(c.rows.len(), 6);
        for r in &c.rows {
            assert!(
                r.pass && r.max_rel_err == 0.0,
                "{}: {}",
                r.op,
                r.max_rel_err
            );
        }
    }

    /// The step check's path on the CPU alone: both small models take a step whose loss is
    /// finite and whose gradient is not zero, and a model moved to the CPU gives the same loss
    /// and gradient bit for bit (the GPU run compares the same numbers across devices).
    #[test]
    fn small_model_steps_run_on_the_cpu() {
        let loss = KdLoss::kl(4.0, 1.0);
        for (name, arch, batch) in small_step_cases().unwrap() {
            let a = Model::new(&arch, 11).unwrap();
            let b = Model::new(&arch, 11)
                .unwrap()
                .to_device(Device::Cpu)
                .unwrap();
            let moved = batch.to_device(Device::Cpu).unwrap();
            let oa = forward_backward(&a, None, &loss, &batch, 0.05, 0, 7).unwrap();
            let ob = forward_backward(&b, None, &loss, &moved, 0.05, 0, 7).unwrap();
            assert!(oa.loss.is_finite(), "{name}");
            assert_eq!(oa.loss.to_bits(), ob.loss.to_bits(), "{name}");
            let ga = a.params().unwrap().grads().to_vec_f32().unwrap();
            let gb = b.params().unwrap().grads().to_vec_f32().unwrap();
            assert!(l2_norm(&ga) > 0.0, "{name}");
            assert_eq!(max_rel_err(&gb, &ga), 0.0, "{name}");
        }
    }

    #[test]
    fn without_a_gpu_the_check_says_what_is_missing() {
        if cuda::device_info(0).is_ok() {
            return; // a GPU machine: scripts/gpu-check.sh runs the check itself
        }
        let e = run(Device::Cuda(0)).unwrap_err().to_string();
        assert!(
            e.contains("no CUDA backend") || e.contains("no NVIDIA driver found"),
            "{e}"
        );
        assert!(run(Device::Cpu).is_err());
        let opts = ThroughputOptions::default();
        let e = throughput(Device::Cuda(0), &opts).unwrap_err().to_string();
        assert!(
            e.contains("no CUDA backend") || e.contains("no NVIDIA driver found"),
            "{e}"
        );
        assert!(throughput(Device::Cpu, &opts).is_err());
    }
}
