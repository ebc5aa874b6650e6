//! The loss on cached targets on the tape: [`super::kd_loss_cached_cpu`] on the CPU; on a GPU
//! the `kd_loss_cached_*` kernels below k = C, and the online fused kernel on the rows scattered
//! back at k = C (the CPU's route too). The targets come from the cache's files on the host and
//! are uploaded; the student's logits and the gradient stay on the GPU.

use super::cached::{cached_route, CachedRoute};
use super::op::{check_student_and_labels, mask_rows, record_with_gradient};
use super::{kd_loss_cached_cpu, CachedTargets, KdLoss, KdLossVars};
use crate::{cuda, DType, Result, Tape, Tensor, Var};

/// [`super::kd_loss`] with `teachers` read from a cache: `student` `[N, C]` logits, `labels`
/// i32 `[N]`, `mask` an optional i32/f32 `[N]` (non-zero = the row counts).
pub fn kd_loss_cached(
    tape: &Tape,
    cfg: &KdLoss,
    student: &Var,
    teachers: &[CachedTargets],
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<KdLossVars> {
    let (n, c) = check_student_and_labels("kd_loss_cached", student, labels)?;
    let device = student.tensor().device();
    if !device.is_cpu() {
        cfg.validate()?;
        let out = match cached_route(teachers, n, c)? {
            CachedRoute::Buckets(one) => {
                cuda::kd_loss_cached(cfg, student.tensor(), one, labels, mask, 1.0)?
            }
            CachedRoute::Dense => {
                // A bf16 student's kernels take bf16 teacher rows: exact for the cache's bf16
                // values (and a bf16 teacher's logits), as the online step's bf16 teacher.
                let dtype = match student.tensor().dtype() {
                    DType::BF16 => DType::BF16,
                    _ => DType::F32,
                };
                let rows = teachers
                    .iter()
                    .map(|t| {
                        Tensor::f32(t.dense(), &[n, c])?
                            .cast(dtype)?
                            .to_device(device)
                    })
                    .collect::<Result<Vec<_>>>()?;
                // No teachers: the kernel computes CE alone.
                cuda::kd_loss(cfg, student.tensor(), &rows, labels, mask, 1.0)?
            }
        };
        return record_with_gradient(tape, student, out.grad, out.total, out.ce, out.kd);
    }
    let mask_rows = mask_rows(mask)?;
    let y = labels.to_vec::<i32>()?;
    // On the CPU the logits are read in place (a BERT step's are tens of MB).
    let s = student.tensor().read_f32()?;
    let out = kd_loss_cached_cpu(cfg, &s, teachers, &y, mask_rows.as_deref(), c)?;
    drop(s);
    let grad = Tensor::f32(out.grad, &[n, c])?;
    record_with_gradient(tape, student, grad, out.total, out.ce, out.kd)
}
