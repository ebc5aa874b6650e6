//! The CUDA arm of the losses: `cross_entropy` (the `cross_entropy` kernel family) and the
//! fused distillation loss behind [`super::kd_loss`] (the `kd_loss` family; its CPU twin is
//! the root crate's `kd_loss_cpu`). **Compiled, not run on a GPU.**

use recycle_kernels::kd::{self as kdh, KdScalars, TeacherLogits};
use recycle_kernels::launch as kl;
use recycle_kernels::names;

use super::common::{empty, host_i32, kernel, on_gpu_i32, rows_cfg, run, view};
use super::elementwise::float_inputs;
use super::launch::{Arg, KernelCall};
use super::{common_device, kernel_suffix, KdLossDevice, KdTerm};
use crate::ops::loss::{
    cross_entropy_check_labels_cpu, cross_entropy_grad_scale, CrossEntropyOptions,
};
use crate::{DType, Device, Error, Result, Tape, Tensor, Var};

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Forward: per-row lse and loss, then the mean over `kept` rows into `out[0]`.
#[allow(clippy::too_many_arguments)]
fn cross_entropy_fwd_plan(
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
fn cross_entropy_bwd_plan(
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
            let scale = cross_entropy_grad_scale(g.to_scalar_f32()?, kept);
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
fn kd_loss_plan(
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
    use crate::cuda::common::check_all;

    /// Every plan, for both storage types and a few shapes, matches the kernels' ABI.
    #[test]
    fn every_plan_matches_the_kernel_abi() {
        for dt in [DType::F32, DType::BF16] {
            let opts = CrossEntropyOptions::default();
            check_all(&cross_entropy_fwd_plan(1, 2, 3, 4, 5, 8, 10, 7, &opts, dt).unwrap());
            check_all(&cross_entropy_bwd_plan(1, 2, 3, 4, 8, 10, &opts, 0.1, dt).unwrap());
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
}
