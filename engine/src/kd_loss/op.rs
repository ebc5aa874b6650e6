//! The fused distillation loss on the tape: one op, a CPU arm ([`super::kd_loss_cpu`]) and a
//! CUDA arm (`crate::cuda::kd_loss`, the kernels of `kd_loss.cu`).

use super::{kd_loss_cpu, KdLoss};
use crate::backend::elementwise::scale_fwd;
use crate::{cuda, DType, Device, Error, Result, Tape, Tensor, Var};

/// The three scalars of a distillation step, as values on the tape.
pub struct KdLossVars {
    /// `ce + λ·kd`: call `backward` on this.
    pub total: Var,
    /// The value of `total`, already on the host (reading `total` again from a GPU would be
    /// one more download and wait per step).
    pub total_value: f32,
    pub ce: f32,
    pub kd: f32,
}

/// The fused loss on the tape: `student` `[N, C]` logits, `teachers` frozen `[N, C]` logits
/// (any float dtype, e.g. a bf16 teacher's output; empty for a plain step), `labels` i32 `[N]`,
/// `mask` an optional i32/f32 `[N]` (non-zero = the row counts). The backward scales the
/// precomputed gradient by the upstream gradient, so nothing is recomputed.
pub fn kd_loss(
    tape: &Tape,
    cfg: &KdLoss,
    student: &Var,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<KdLossVars> {
    let op = "kd_loss";
    let (n, c) = check_student_and_labels(op, student, labels)?;
    for (j, t) in teachers.iter().enumerate() {
        if t.shape() != student.shape() {
            return Err(Error::shape(
                op,
                format!(
                    "teacher {j} logits {:?} differ from student logits {:?}",
                    t.shape(),
                    student.shape()
                ),
            ));
        }
    }
    if let Device::Cuda(_) = student.tensor().device() {
        return kd_loss_cuda(tape, cfg, student, teachers, labels, mask);
    }
    let mask_rows = mask_rows(mask)?;
    let s = student.tensor().read_f32()?;
    let t_reads = teachers
        .iter()
        .map(|t| t.read_f32())
        .collect::<Result<Vec<_>>>()?;
    let t_slices: Vec<&[f32]> = t_reads.iter().map(|r| &r[..]).collect();
    let y = labels.read_i32()?;
    let out = kd_loss_cpu(cfg, &s, &t_slices, &y, mask_rows.as_deref(), c)?;
    drop((s, t_reads, y));
    let grad = Tensor::f32(out.grad, &[n, c])?;
    record_with_gradient(tape, student, grad, out.total, out.ce, out.kd)
}

/// The CUDA arm of [`kd_loss`]: the fused kernel (`kd_loss.cu`, through
/// `recycle_engine::cuda::kd_loss`), the gradient left on the GPU.
fn kd_loss_cuda(
    tape: &Tape,
    cfg: &KdLoss,
    student: &Var,
    teachers: &[Tensor],
    labels: &Tensor,
    mask: Option<&Tensor>,
) -> Result<KdLossVars> {
    cfg.validate()?;
    let out = cuda::kd_loss(cfg, student.tensor(), teachers, labels, mask, 1.0)?;
    record_with_gradient(tape, student, out.grad, out.total, out.ce, out.kd)
}

/// The checks both loss ops (online and cached) make: `student` `[N, C]` logits and `labels`
/// i32 `[N]`. Returns `(N, C)`.
pub(super) fn check_student_and_labels(
    op: &'static str,
    student: &Var,
    labels: &Tensor,
) -> Result<(usize, usize)> {
    student.tensor().expect_rank(op, "student logits", 2)?;
    labels.expect_dtype(op, DType::I32)?;
    let (n, c) = (student.shape()[0], student.shape()[1]);
    if labels.shape() != [n] {
        return Err(Error::shape(
            op,
            format!(
                "labels {:?} do not match student logits {:?}",
                labels.shape(),
                student.shape()
            ),
        ));
    }
    Ok((n, c))
}

/// Which rows count (non-zero in `mask`), read to the host; `None` = every row.
pub(super) fn mask_rows(mask: Option<&Tensor>) -> Result<Option<Vec<bool>>> {
    mask.map(|m| Ok(m.to_vec_f32()?.iter().map(|&v| v != 0.0).collect()))
        .transpose()
}

/// Records the loss `total` with its gradient `grad` already computed (on the student's
/// device): the backward scales it by the upstream gradient, so nothing is recomputed.
pub(super) fn record_with_gradient(
    tape: &Tape,
    student: &Var,
    grad: Tensor,
    total: f32,
    ce: f32,
    kd: f32,
) -> Result<KdLossVars> {
    let value = Tensor::from_vec(vec![total], &[], grad.device())?;
    let total_var = tape.record(
        value,
        &[student],
        Box::new(move |g, _| {
            let s = g.to_scalar_f32()?;
            if s == 1.0 {
                return Ok(vec![Some(grad)]);
            }
            Ok(vec![Some(scale_fwd(&grad, s)?)])
        }),
    );
    Ok(KdLossVars {
        total: total_var,
        total_value: total,
        ce,
        kd,
    })
}
