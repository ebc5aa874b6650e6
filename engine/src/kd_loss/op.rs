//! The fused distillation loss on the tape: one op, a CPU arm ([`super::kd_loss_cpu`]) and a
//! CUDA arm (`crate::cuda::kd_loss`, the kernels of `kd_loss.cu`).

use super::{kd_loss_cpu, KdLoss};
use crate::ops::elementwise::scale;
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
    let mask_rows: Option<Vec<bool>> = match mask {
        Some(m) => Some(m.to_vec_f32()?.iter().map(|&v| v != 0.0).collect()),
        None => None,
    };
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
    let total = tape.record(
        Tensor::f32(vec![out.total], &[])?,
        &[student],
        Box::new(move |g, _| {
            let scale = g.to_scalar_f32()?;
            if scale == 1.0 {
                return Ok(vec![Some(grad)]);
            }
            let scaled: Vec<f32> = grad.read_f32()?.iter().map(|v| v * scale).collect();
            Ok(vec![Some(Tensor::f32(scaled, &[n, c])?)])
        }),
    );
    Ok(KdLossVars {
        total,
        total_value: out.total,
        ce: out.ce,
        kd: out.kd,
    })
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
    let out = cuda::kd_loss(
        Some(cfg.kind),
        cfg.weight,
        cfg.ignore_index,
        student.tensor(),
        teachers,
        labels,
        mask,
        1.0,
    )?;
    let device = student.tensor().device();
    let grad = out.grad;
    let total = tape.record(
        Tensor::from_vec(vec![out.total], &[], device)?,
        &[student],
        Box::new(move |g, _| {
            let s = g.to_scalar_f32()?;
            if s == 1.0 {
                return Ok(vec![Some(grad)]);
            }
            let scaled = scale(&Tape::inference(), &Tape::inference().constant(grad), s)?;
            Ok(vec![Some(scaled.into_tensor())])
        }),
    );
    Ok(KdLossVars {
        total,
        total_value: out.total,
        ce: out.ce,
        kd: out.kd,
    })
}
