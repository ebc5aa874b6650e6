//! The CUDA arm of the loss on cached teacher targets below k = C (`crate::kd_loss::
//! kd_loss_cached`): the `kd_loss_cached_*` row kernels of `kd_loss.cu` and `kd_loss_reduce`.
//! The cached rows come from the cache's files on the host and are uploaded per step (k
//! indices and values and one f32 per row: a few KB, where the student's logits stay on the
//! GPU). Its CPU twin is `crate::kd_loss::kd_loss_buckets_cpu`.

use recycle_kernels::kd_loss::{cached_kernel_name, check_cached_row};
use recycle_kernels::launchers as k;

use super::cuda::{host_labels_and_mask, reduce_rows, storage_of};
use crate::cuda::common::{dptr, empty, on_gpu_i32, p, rows_cfg, view};
use crate::cuda::launch::{fit_u32, launch};
use crate::cuda::KdLossDevice;
use crate::kd_loss::{self as kdh, CachedTargets, KdKind, KdLoss, KdScalars};
use crate::{DType, Device, Error, Result, Tensor};

const OP: &str = "kd_loss_cached";

/// The kernel's scalars: those of the online loss, except that MSE averages over the k cached
/// classes (`λ·2/(rows·k)`, in the CPU twin's order), not over C.
fn cached_scalars(
    cfg: &KdLoss,
    ce_rows: usize,
    kd_rows: usize,
    classes: usize,
    k: usize,
    upstream: f32,
) -> Result<KdScalars> {
    let per_row = match cfg.kind {
        KdKind::Mse => k,
        KdKind::Kl { .. } => classes,
    };
    KdScalars::new(
        Some(cfg.kind),
        cfg.weight,
        ce_rows,
        kd_rows,
        per_row,
        upstream,
    )
}

/// See [`crate::cuda::kd_loss_cached`].
pub(crate) fn kd_loss_cached(
    cfg: &KdLoss,
    student: &Tensor,
    teacher: &CachedTargets,
    labels: &Tensor,
    mask: Option<&Tensor>,
    upstream: f32,
) -> Result<KdLossDevice> {
    cfg.validate()?;
    student.expect_rank(OP, "student logits", 2)?;
    labels.expect_dtype(OP, DType::I32)?;
    let (rows, classes) = (student.shape()[0], student.shape()[1]);
    if labels.shape() != [rows] || teacher.rows != rows || teacher.classes != classes {
        return Err(Error::shape(
            OP,
            format!(
                "student logits {:?}, labels {:?} and cached targets of {} rows of {} classes \
                 do not match: the cache is not of this step's batch",
                student.shape(),
                labels.shape(),
                teacher.rows,
                teacher.classes
            ),
        ));
    }
    teacher.validate()?;
    let (labels_host, mask_host) = host_labels_and_mask(OP, labels, mask, rows)?;
    let (ce_rows, kd_rows) = kdh::row_counts(
        &labels_host,
        mask_host.as_deref(),
        classes,
        cfg.ignore_index,
        true,
    )?;
    let s = cached_scalars(cfg, ce_rows, kd_rows, classes, teacher.k, upstream)?;
    if !s.kd_active() {
        // λ = 0 or no row counts: CE alone, as the CPU twin.
        return super::cuda::kd_loss(cfg, student, &[], labels, mask, upstream);
    }
    let bf16 = storage_of(OP, student.dtype())? == kdh::Storage::Bf16;
    let kernel = cached_kernel_name(cfg.kind == KdKind::Mse, bf16);

    let sv = view(student, OP)?;
    let ctx = sv.ctx.clone();
    let dev = Device::Cuda(ctx.ordinal());
    let labels_dev = on_gpu_i32(&ctx, labels, &labels_host)?;
    let mask_dev = match &mask_host {
        Some(m) => Some(Tensor::from_slice(m, &[rows], dev)?),
        None => None,
    };
    // Classes fit i32 (the kernel takes at most 65,536); the kernel reads them as u32.
    let indices: Vec<i32> = teacher.indices.iter().map(|&j| j as i32).collect();
    let indices = Tensor::from_vec(indices, &[rows, teacher.k], dev)?;
    let values = Tensor::from_slice(&teacher.values, &[rows, teacher.k], dev)?;
    let tail_lse = Tensor::from_slice(&teacher.tail_lse, &[rows], dev)?;
    let grad = empty(&ctx, student.dtype(), student.shape())?;
    let row_ce = empty(&ctx, DType::F32, &[rows])?;
    let row_kd = empty(&ctx, DType::F32, &[rows])?;
    // The row kernel, then the reduction into [ce, kd, total].
    if let Some(launch_cfg) = rows_cfg(kernel, rows, classes)? {
        let k = fit_u32(kernel, "k, the cached classes per row", teacher.k)?;
        let classes = fit_u32(kernel, "the number of classes", classes)?;
        check_cached_row(kernel, k, classes).map_err(|e| Error::invalid(OP, e.0))?;
        let args = k::KdCachedRowArgs {
            logits: sv.ptr,
            grad: view(&grad, OP)?.ptr,
            indices: dptr(&indices, OP)?,
            values: dptr(&values, OP)?,
            tail_lse: dptr(&tail_lse, OP)?,
            k,
            labels: dptr(&labels_dev, OP)?,
            mask: mask_dev.as_ref().map_or(Ok(p(0)), |m| dptr(m, OP))?,
            row_ce: dptr(&row_ce, OP)?,
            row_kd: dptr(&row_kd, OP)?,
            classes,
            ignore_index: cfg.ignore_index,
            inv_t: s.inv_t,
            t_sq: s.t_sq,
            ce_weight: s.grad_ce_weight,
            kd_scale: s.grad_kd_scale,
        };
        let call = k::kd_cached_row_call(kernel, launch_cfg, &args)
            .map_err(|e| Error::invalid(OP, e.to_string()))?;
        launch(&ctx, &call)?;
    }
    reduce_rows(
        &ctx,
        &row_ce,
        view(&row_kd, OP)?.ptr,
        &s,
        grad,
        (ce_rows, kd_rows),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MSE averages over the k cached classes, KL's scale is the online loss's.
    #[test]
    fn cached_scalars_follow_the_cpu_twin() {
        let (lambda, w_kd) = (0.6f32, 1.0 / 7.0f32);
        let s = cached_scalars(&KdLoss::mse(lambda), 3, 7, 100, 4, 1.0).unwrap();
        assert_eq!(
            s.grad_kd_scale.to_bits(),
            (lambda * 2.0 * w_kd / 4.0).to_bits()
        );
        let s = cached_scalars(&KdLoss::kl(3.0, lambda), 3, 7, 100, 4, 1.0).unwrap();
        assert_eq!(s.grad_kd_scale.to_bits(), (lambda * 3.0 * w_kd).to_bits());
        assert_eq!(s.t_sq, 9.0);
    }
}
