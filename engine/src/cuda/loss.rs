//! The CUDA arm of the cross-entropy's backend-level functions (`crate::backend::loss`): the
//! `cross_entropy` kernel family. No tape here: the op and its one backward are in
//! `crate::ops::loss`. The fused distillation loss has its own file, `kd_loss.rs`.

use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use super::common::{empty, host_i32, on_gpu_i32, p, rows_cfg, run, view, with_float};
use super::elementwise::float_inputs;
use super::launch::{fit_u32, KernelCall};
use crate::backend::loss::{cross_entropy_check_labels_cpu, CrossEntropySaved};
use crate::backend::CrossEntropyOptions;
use crate::{DType, Result, Tensor};

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// The device buffers both passes read: the logits, the i32 labels and the rows' lse (f32,
/// written by the forward).
#[derive(Clone, Copy)]
struct Inputs {
    logits: u64,
    labels: u64,
    lse: u64,
}

/// Forward: per-row lse and loss, then the mean over `kept` rows into `out[0]`.
fn cross_entropy_fwd_plan(
    x: Inputs,
    row_loss: u64,
    out: u64,
    (rows, classes, kept): (usize, usize, usize),
    opts: &CrossEntropyOptions,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = "cross_entropy_fwd";
    let n_classes = fit_u32(name, "the number of classes", classes)?;
    let (ignore, has_ignore) = (
        opts.ignore_index.unwrap_or(0),
        opts.ignore_index.is_some() as i32,
    );
    let mut calls = Vec::new();
    if let Some(cfg) = rows_cfg(name, rows, classes)? {
        calls.push(with_float!("cross_entropy", dtype, |T| Ok(
            k::cross_entropy_fwd::<T>(
                cfg,
                p(x.logits),
                p(x.labels),
                p(x.lse),
                p(row_loss),
                n_classes,
                ignore,
                has_ignore,
                opts.label_smoothing,
            )
        ))?);
    }
    let r = "cross_entropy_reduce";
    calls.push(k::cross_entropy_reduce(
        kl::single_block(),
        p(row_loss),
        fit_u32(r, "the number of rows", rows)?,
        fit_u32(r, "the number of kept rows", kept)?,
        p(out),
    ));
    Ok(calls)
}

fn cross_entropy_bwd_plan(
    x: Inputs,
    dlogits: u64,
    (rows, classes): (usize, usize),
    opts: &CrossEntropyOptions,
    scale: f32,
    dtype: DType,
) -> Result<Vec<KernelCall>> {
    let name = "cross_entropy_bwd";
    let Some(cfg) = rows_cfg(name, rows, classes)? else {
        return Ok(vec![]);
    };
    let n_classes = fit_u32(name, "the number of classes", classes)?;
    with_float!("cross_entropy", dtype, |T| Ok(vec![
        k::cross_entropy_bwd::<T>(
            cfg,
            p(x.logits),
            p(x.labels),
            p(x.lse),
            p(dlogits),
            n_classes,
            opts.ignore_index.unwrap_or(0),
            opts.ignore_index.is_some() as i32,
            opts.label_smoothing,
            scale,
        )
    ]))
}

/// The CUDA arm of [`crate::backend::loss::cross_entropy_fwd`] (shapes and options validated
/// there). The labels are checked on the host (copied back when they are on the GPU), as the
/// CPU arm does.
pub(crate) fn cross_entropy_fwd(
    logits: &Tensor,
    labels: &Tensor,
    opts: &CrossEntropyOptions,
) -> Result<(Tensor, CrossEntropySaved)> {
    const OP: &str = "cross_entropy";
    let dtype = float_inputs(OP, &[logits])?;
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    let labels_host = host_i32(labels)?;
    let kept = cross_entropy_check_labels_cpu(&labels_host, classes, opts.ignore_index)?;
    let lv = view(logits, OP)?;
    let ctx = lv.ctx.clone();
    let labels_dev = on_gpu_i32(&ctx, labels, &labels_host)?;
    let lse = empty(&ctx, DType::F32, &[rows])?;
    let row_loss = empty(&ctx, DType::F32, &[rows])?;
    let out = empty(&ctx, DType::F32, &[])?;
    let x = Inputs {
        logits: lv.ptr,
        labels: view(&labels_dev, OP)?.ptr,
        lse: view(&lse, OP)?.ptr,
    };
    let (row_loss_ptr, out_ptr) = (view(&row_loss, OP)?.ptr, view(&out, OP)?.ptr);
    let dims = (rows, classes, kept);
    let plan = cross_entropy_fwd_plan(x, row_loss_ptr, out_ptr, dims, opts, dtype)?;
    run(&ctx, &plan)?;
    let saved = CrossEntropySaved {
        labels: labels_dev,
        lse,
        kept,
    };
    Ok((out, saved))
}

/// The CUDA arm of [`crate::backend::loss::cross_entropy_bwd`]: the gradient in the logits'
/// dtype, `scale` the upstream gradient over the kept rows.
pub(crate) fn cross_entropy_bwd(
    logits: &Tensor,
    saved: &CrossEntropySaved,
    opts: &CrossEntropyOptions,
    scale: f32,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let dtype = float_inputs(OP, &[logits])?;
    let (rows, classes) = (logits.shape()[0], logits.shape()[1]);
    let sv = view(logits, OP)?;
    let d = empty(&sv.ctx, dtype, logits.shape())?;
    let x = Inputs {
        logits: sv.ptr,
        labels: view(&saved.labels, OP)?.ptr,
        lse: view(&saved.lse, OP)?.ptr,
    };
    let dims = (rows, classes);
    let plan = cross_entropy_bwd_plan(x, view(&d, OP)?.ptr, dims, opts, scale, dtype)?;
    run(&sv.ctx, &plan)?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    /// Labels for `rows` rows of `classes`: every third row (from row 1) the ignore index when
    /// there is one, a class spread over the vocabulary otherwise.
    fn sim_labels(rows: usize, classes: usize, ignore: Option<i32>) -> Vec<i32> {
        (0..rows)
            .map(|r| match ignore {
                Some(i) if r % 3 == 1 => i,
                _ => ((r * 7919 + 3) % classes) as i32,
            })
            .collect()
    }

    /// The cross-entropy plans on the kernel simulator against the CPU twins
    /// (`cross_entropy_forward_cpu` / `cross_entropy_backward_cpu`), with the gradient factor
    /// of `cross_entropy_grad_scale`: ignored rows, label smoothing, no ignore index, f32 and
    /// bf16 logits, the gradient in a separate buffer and in place.
    #[test]
    fn cross_entropy_plans_on_the_simulator_match_the_cpu_twins() {
        use crate::backend::loss::{
            cross_entropy_backward_cpu, cross_entropy_forward_cpu, cross_entropy_grad_scale,
        };
        use crate::cuda::sim_check::{
            as_stored, assert_close, download, host_sim, run_plan, sample, upload,
        };
        use recycle_kernels::sim::SimBuffer;
        let Some(sim) = host_sim() else { return };
        for (rows, classes) in [(7usize, 10usize), (4, 1000), (2, 30_522)] {
            for dt in [DType::F32, DType::BF16] {
                for (oi, (ignore_index, eps, upstream)) in [
                    (Some(-100), 0.0f32, 1.0f32),
                    (Some(7), 0.1, 0.5),
                    (None, 0.05, 2.0),
                ]
                .into_iter()
                .enumerate()
                {
                    // Time: the simulator's 1024-thread blocks are slow; two option sets suffice
                    // for the longest rows.
                    if classes > 5000 && oi == 2 {
                        continue;
                    }
                    let opts = CrossEntropyOptions {
                        ignore_index,
                        label_smoothing: eps,
                    };
                    let what = format!("cross_entropy {rows}x{classes} {dt:?} {opts:?}");
                    let x = sample(rows * classes, 31, 8.0);
                    let labels = sim_labels(rows, classes, ignore_index);
                    let kept =
                        cross_entropy_check_labels_cpu(&labels, classes, ignore_index).unwrap();
                    let bx = upload(&x, dt);
                    let bl = SimBuffer::from_slice(&labels);
                    let (blse, brow, bout) = (
                        SimBuffer::zeros::<f32>(rows),
                        SimBuffer::zeros::<f32>(rows),
                        SimBuffer::zeros::<f32>(1),
                    );
                    let inputs = |logits: &SimBuffer| Inputs {
                        logits: logits.ptr(),
                        labels: bl.ptr(),
                        lse: blse.ptr(),
                    };
                    let dims = (rows, classes, kept);
                    let plan = cross_entropy_fwd_plan(
                        inputs(&bx),
                        brow.ptr(),
                        bout.ptr(),
                        dims,
                        &opts,
                        dt,
                    )
                    .unwrap();
                    run_plan(sim, &plan);
                    // Both sides compute in f32 from the same stored values (bf16 logits are
                    // exact in f32): the lse differs by the order of the sums and the host's
                    // exp (a few ulp of a value about ln C + max |x|), the row loss (in f64
                    // from the lse) likewise.
                    let xs = as_stored(&x, dt);
                    let (want_loss, want_lse) =
                        cross_entropy_forward_cpu(&xs, &labels, classes, &opts);
                    let lse = download(&blse, DType::F32);
                    assert_close(&format!("{what}: lse"), &lse, &want_lse, 2e-6, 1e-6);
                    let loss = download(&bout, DType::F32);
                    assert_close(&format!("{what}: loss"), &loss, &[want_loss], 1e-5, 1e-6);

                    let scale = cross_entropy_grad_scale(upstream, kept);
                    let mut want_d = vec![0.0; rows * classes];
                    cross_entropy_backward_cpu(
                        &xs,
                        &labels,
                        &want_lse,
                        classes,
                        &opts,
                        scale,
                        &mut want_d,
                    );
                    // f32: softmax terms differ by the lse's few ulp, relative to the scale;
                    // bf16: the kernel rounds its f32 value once, within one ulp (2^-7
                    // relative) of the CPU's f32 value.
                    let rel = if dt == DType::BF16 { 1.0 / 128.0 } else { 2e-5 };
                    let abs = 2e-6 * scale.abs();
                    // In place for every other case (each dtype and shape sees both).
                    let in_place = (oi + (dt == DType::BF16) as usize) % 2 == 1;
                    {
                        let bx = upload(&x, dt);
                        let bd = if in_place {
                            None
                        } else {
                            Some(upload(&vec![f32::NAN; rows * classes], dt))
                        };
                        let dptr = bd.as_ref().map_or(bx.ptr(), |b| b.ptr());
                        let dims = (rows, classes);
                        let plan =
                            cross_entropy_bwd_plan(inputs(&bx), dptr, dims, &opts, scale, dt)
                                .unwrap();
                        run_plan(sim, &plan);
                        let d = download(bd.as_ref().unwrap_or(&bx), dt);
                        let what = format!("{what}: gradient (in place: {in_place})");
                        assert_close(&what, &d, &want_d, rel, abs);
                        for (r, &y) in labels.iter().enumerate() {
                            if Some(y) == ignore_index {
                                let row = &d[r * classes..(r + 1) * classes];
                                assert!(row.iter().all(|&v| v == 0.0), "{what}: row {r}");
                            }
                        }
                    }
                }
            }
        }
    }
}
