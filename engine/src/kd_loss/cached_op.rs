//! The loss on cached targets on the tape: [`super::kd_loss_cached_cpu`] for student logits on
//! any device. The targets live on the host (they come from the cache's files), so a GPU's
//! student logits are read back once and the gradient uploaded; a kernel arm is not written.

use super::op::{check_student_and_labels, mask_rows, record_with_gradient};
use super::{kd_loss_cached_cpu, CachedTargets, KdLoss, KdLossVars};
use crate::{Result, Tape, Tensor, Var};

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
    let mask_rows = mask_rows(mask)?;
    let device = student.tensor().device();
    let y = labels.to_vec::<i32>()?;
    // On the CPU the logits are read in place (a BERT step's are tens of MB); from a GPU once.
    let out = if device.is_cpu() {
        let s = student.tensor().read_f32()?;
        kd_loss_cached_cpu(cfg, &s, teachers, &y, mask_rows.as_deref(), c)?
    } else {
        let s = student.tensor().to_vec_f32()?;
        kd_loss_cached_cpu(cfg, &s, teachers, &y, mask_rows.as_deref(), c)?
    };
    let grad = Tensor::from_vec(out.grad, &[n, c], device)?;
    record_with_gradient(tape, student, grad, out.total, out.ce, out.kd)
}
