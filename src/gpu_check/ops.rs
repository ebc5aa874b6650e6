//! Per-op checks: the tensor casts and copies, elementwise ops and activations, cuBLASLt
//! products, cuDNN convolutions, the norms, row gathers and dropout, pooling and layout copies,
//! and attention, each on the GPU against the CPU in f32 and bf16.

use recycle_engine::ops::elementwise::{add, add_scalar, bias_add, mul, scale, sub};
use recycle_engine::ops::{self, activation};
use recycle_engine::{DType, Device, Error, Result, Tape, Tensor, Var};

use super::checker::{dims, tol, Checker};

pub(super) fn elementwise_checks(c: &mut Checker) -> Result<()> {
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
        // d1 sums 300 rows in 8 interleaved partial sums, the CPU in blocks of 256: ~1 ulp of
        // the sum (83 here) at an element under the floor measures ~1e-4.
        c.tape_op_tols(
            "bias_add last axis",
            &[&[300, 768], &[768]],
            dt,
            (tol(dt, 1e-5), tol(dt, 5e-4)),
            |t, v| bias_add(t, &v[0], &v[1], 1),
        )?;
        c.tape_op("relu", &[s], dt, tol(dt, 1e-6), |t, v| {
            activation::relu(t, &v[0])
        })?;
        // Backward: Φ(x) + xφ(x) cancels near x = -0.75, where f32 keeps ~1e-7 of terms ~1.
        c.tape_op_tols("gelu", &[s], dt, (tol(dt, 1e-5), tol(dt, 1e-4)), |t, v| {
            activation::gelu(t, &v[0])
        })?;
        c.tape_op("tanh", &[s], dt, tol(dt, 1e-5), |t, v| {
            activation::tanh(t, &v[0])
        })?;
        for shape in [&[64usize, 1000][..], &[8, 30_522]] {
            // Backward: y·(g − <g, y>) cancels in g − <g, y>, a sum over the row in another
            // order (block tree against the CPU's loop).
            c.tape_op_tols(
                "softmax",
                &[shape],
                dt,
                (tol(dt, 1e-5), tol(dt, 2e-4)),
                |t, v| ops::softmax(t, &v[0]),
            )?;
            // Backward: g − exp(y)·Σg, with y ≈ -10 known to ulp(10) ≈ 1e-6 (absolute), so
            // exp(y)·Σg (Σg ~ 250 over 30k columns) is known to ~1e-6 relative, cancelling.
            c.tape_op_tols(
                "log_softmax",
                &[shape],
                dt,
                (tol(dt, 1e-5), tol(dt, 2e-3)),
                |t, v| ops::log_softmax(t, &v[0]),
            )?;
        }
    }
    Ok(())
}

/// cuBLASLt products: every transpose combination, strided batches, linear with and without
/// the bias epilogue. Tolerance: fp32 accumulation in another order than the CPU's gemm (1e-4
/// for f32 over k ≤ 129, 1e-3 for the k = 768 linear), and bf16 storage of the result.
pub(super) fn matmul_checks(c: &mut Checker) -> Result<()> {
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
        // k = 768 (forward), 300 (d0), 200 (d1): a loop-order f32 sum errs by ~eps·σ²·k/√2
        // ≈ 7e-5 absolute, ~3e-4 of the floor (1e-3 of the scale ~270).
        c.tape_op(
            "linear + bias",
            &[&[4, 50, 768], &[300, 768], &[300]],
            dt,
            tol(dt, 1e-3),
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
/// stride-2 downsample. f32 runs without TF32 (FMA math), so 1e-4 covers the summation order
/// of the forward; the backward sums longer (backward-filter over N·H·W, up to 2048 terms
/// here): 1e-3, a few ulp of the scale at an element under the floor.
pub(super) fn conv_checks(c: &mut Checker) -> Result<()> {
    use ops::conv::{conv2d, Conv2dOptions};
    let o = |stride, padding| Conv2dOptions { stride, padding };
    for dt in [DType::F32, DType::BF16] {
        c.tape_op_tols(
            "conv2d 3x3 + bias",
            &[&[4, 16, 14, 14], &[32, 16, 3, 3], &[32]],
            dt,
            (tol(dt, 1e-4), tol(dt, 1e-3)),
            move |t, v| conv2d(t, &v[0], &v[1], Some(&v[2]), o(1, 1)),
        )?;
        c.tape_op_tols(
            "conv2d 3x3 s2 p1",
            &[&[3, 8, 15, 13], &[12, 8, 3, 3]],
            dt,
            (tol(dt, 1e-4), tol(dt, 1e-3)),
            move |t, v| conv2d(t, &v[0], &v[1], None, o(2, 1)),
        )?;
        c.tape_op_tols(
            "conv2d 7x7 s2 p3",
            &[&[2, 3, 64, 64], &[16, 3, 7, 7]],
            dt,
            (tol(dt, 1e-4), tol(dt, 1e-3)),
            move |t, v| conv2d(t, &v[0], &v[1], None, o(2, 3)),
        )?;
        c.tape_op_tols(
            "conv2d 1x1 s2 + bias",
            &[&[4, 32, 8, 8], &[64, 32, 1, 1], &[64]],
            dt,
            (tol(dt, 1e-4), tol(dt, 1e-3)),
            move |t, v| conv2d(t, &v[0], &v[1], Some(&v[2]), o(2, 0)),
        )?;
    }
    Ok(())
}

/// Layer norm (BERT's rows) and batch norm (training with the running-statistics update, and
/// evaluation from the running statistics).
pub(super) fn norm_checks(c: &mut Checker) -> Result<()> {
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
pub(super) fn gather_dropout_checks(c: &mut Checker) -> Result<()> {
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
pub(super) fn pool_layout_checks(c: &mut Checker) -> Result<()> {
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
pub(super) fn attention_checks(c: &mut Checker) -> Result<()> {
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
            // Backward: the GPU composes softmax's cancelling backward from stored parts (and
            // dropout's scaled copy), the CPU's fused op rounds elsewhere: a few ulp of scale.
            c.tape_op_tols(
                &format!("attention mask, dropout={training}"),
                &[&[2, 4, 33, 16], &[2, 4, 40, 16], &[2, 4, 40, 24]],
                dt,
                (tol(dt, 1e-4), tol(dt, 1e-3)),
                move |t, v| {
                    let m = Tensor::from_slice(&mask, &[2, 40], v[0].tensor().device())?;
                    scaled_dot_product_attention(t, &v[0], &v[1], &v[2], Some(&m), opts)
                },
            )?;
        }
    }
    Ok(())
}

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
