//! The loss on cached targets on the tape: [`super::kd_loss_cached_cpu`] for student logits on
//! any device. The targets live on the host (they come from the cache's files), so a GPU's
//! student logits are read back once and the gradient uploaded; a kernel arm is not written.

use super::{kd_loss_cached_cpu, CachedTargets, KdLoss, KdLossVars};
use crate::{DType, Error, Result, Tape, Tensor, Var};

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
    let op = "kd_loss_cached";
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
    let mask_rows: Option<Vec<bool>> = match mask {
        Some(m) => Some(m.to_vec_f32()?.iter().map(|&v| v != 0.0).collect()),
        None => None,
    };
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
    let total = tape.record(
        Tensor::from_vec(vec![out.total], &[], device)?,
        &[student],
        Box::new(move |g, _| {
            let scale = g.to_scalar_f32()?;
            if scale == 1.0 {
                return Ok(vec![Some(grad)]);
            }
            let scaled: Vec<f32> = grad.to_vec_f32()?.iter().map(|v| v * scale).collect();
            Ok(vec![Some(Tensor::from_vec(scaled, &[n, c], device)?)])
        }),
    );
    Ok(KdLossVars {
        total,
        total_value: out.total,
        ce: out.ce,
        kd: out.kd,
    })
}
