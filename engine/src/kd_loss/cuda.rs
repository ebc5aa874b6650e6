//! The CUDA arm of the fused distillation loss (`crate::kd_loss`): the kernels of
//! `kd_loss.cu`, with the host-side scalars and row counts of `crate::kd_loss::host`, held
//! to the f64 reference on the kernel simulator. Its CPU twin is `crate::kd_loss::kd_loss_cpu`.

use std::sync::Arc;

use recycle_kernels::kd_loss::TeacherLogits;
use recycle_kernels::launch as kl;
use recycle_kernels::launchers as k;

use crate::cuda::common::{dptr, empty, host_i32, on_gpu_i32, p, rows_cfg, view};
use crate::cuda::launch::{fit_u32, launch};
use crate::cuda::{common_device, CudaContext, KdLossDevice};
use crate::kd_loss::{self as kdh, KdLoss, KdScalars};
use crate::{DType, Device, Error, Result, Tensor};

pub(super) fn storage_of(op: &'static str, dtype: DType) -> Result<kdh::Storage> {
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

/// The labels and the row mask (as i32, non-zero = the row counts) on the host, where the row
/// counts are taken.
pub(super) fn host_labels_and_mask(
    op: &'static str,
    labels: &Tensor,
    mask: Option<&Tensor>,
    rows: usize,
) -> Result<(Vec<i32>, Option<Vec<i32>>)> {
    let labels_host = host_i32(labels)?;
    let mask_host = match mask {
        None => None,
        Some(m) => {
            if m.shape() != [rows] {
                return Err(Error::shape(
                    op,
                    format!("mask {:?} does not match {rows} rows", m.shape()),
                ));
            }
            Some(match m.dtype() {
                DType::I32 => host_i32(m)?,
                _ => m.to_vec_f32()?.iter().map(|&v| (v != 0.0) as i32).collect(),
            })
        }
    };
    Ok((labels_host, mask_host))
}

/// See [`crate::cuda::kd_loss`].
pub(crate) fn kd_loss(
    cfg: &KdLoss,
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
    let (labels_host, mask_host) = host_labels_and_mask(OP, labels, mask, rows)?;
    let (lambda, ignore_index) = (cfg.weight, cfg.ignore_index);
    let ker_term = Some(cfg.kind).filter(|_| !(teachers.is_empty() || lambda == 0.0));
    let (ce_rows, kd_rows) = kdh::row_counts(
        &labels_host,
        mask_host.as_deref(),
        classes,
        ignore_index,
        ker_term.is_some(),
    )?;
    let s = KdScalars::new(ker_term, lambda, ce_rows, kd_rows, classes, upstream)?;
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
    let kernel = kdh::kernel_name(active_term, student_storage, teacher_storage)?;

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
    // The row kernel (the CE-only one reads no teachers and writes no `row_kd`), then the
    // reduction into [ce, kd, total].
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
    let row_kd = ptr(&row_kd)?;
    if let Some(launch_cfg) = rows_cfg(kernel, rows, classes)? {
        let tl = if teacher_ptrs.is_empty() {
            TeacherLogits::default()
        } else {
            TeacherLogits::new(&teacher_ptrs).map_err(|e| Error::invalid(OP, e.to_string()))?
        };
        let args = k::KdRowArgs {
            logits: sv.ptr,
            grad: view(&grad, OP)?.ptr,
            teachers: tl,
            k: teacher_ptrs.len() as u32,
            labels: dptr(&labels_dev, OP)?,
            mask: p(ptr(&mask_dev)?),
            row_ce: dptr(&row_ce, OP)?,
            row_kd: p(row_kd),
            classes: fit_u32(kernel, "the number of classes", classes)?,
            ignore_index,
            inv_t: s.inv_t,
            t_sq: s.t_sq,
            ce_weight: s.grad_ce_weight,
            kd_scale: s.grad_kd_scale,
        };
        let call = k::kd_row_call(kernel, launch_cfg, &args)
            .map_err(|e| Error::invalid(OP, e.to_string()))?;
        launch(&ctx, &call)?;
    }
    let kd_rows = if active_term.is_some() { kd_rows } else { 0 };
    reduce_rows(&ctx, &row_ce, row_kd, &s, grad, (ce_rows, kd_rows))
}

/// The reduction of the rows' terms into `[ce, kd, total]` (`row_kd` 0 for CE alone), read
/// back beside the gradient the row kernel wrote.
pub(super) fn reduce_rows(
    ctx: &Arc<CudaContext>,
    row_ce: &Tensor,
    row_kd: u64,
    s: &KdScalars,
    grad: Tensor,
    (ce_rows, kd_rows): (usize, usize),
) -> Result<KdLossDevice> {
    const OP: &str = "kd_loss";
    let rows = row_ce.elem_count();
    let out = empty(ctx, DType::F32, &[3])?;
    launch(
        ctx,
        &k::kd_loss_reduce(
            kl::single_block(),
            dptr(row_ce, OP)?,
            p(row_kd),
            fit_u32("kd_loss_reduce", "the number of rows", rows)?,
            s.ce_weight,
            s.kd_weight,
            s.lambda,
            dptr(&out, OP)?,
        ),
    )?;
    let totals = out.to_vec::<f32>()?;
    Ok(KdLossDevice {
        ce: totals[0],
        kd: totals[1],
        total: totals[2],
        grad,
        ce_rows,
        kd_rows,
    })
}
