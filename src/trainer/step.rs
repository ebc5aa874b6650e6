//! One training step, shared by the trainer and the overhead benchmarks: student forward,
//! the selected teachers' forwards (only when the schedule says this step distills), the fused
//! loss, backward, optimizer update.

use recycle_engine::optim::Optimizer;
use recycle_engine::{Error, Result, Tape};

use crate::distill::{kd_loss, KdLoss, TeacherPool};
use crate::trainer::model::{Batch, Model};

#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    pub ce: f32,
    /// The distillation term, when this step distilled.
    pub kd: Option<f32>,
    pub loss: f32,
    pub teacher_forwards: usize,
}

/// Runs one step. `teachers` is `None` for a plain step or a step outside the distillation
/// schedule: then no teacher runs at all.
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    student: &Model,
    teachers: Option<&TeacherPool<Model>>,
    loss: &KdLoss,
    batch: &Batch,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    step: u64,
    seed: u64,
) -> Result<StepOutput> {
    let params = student.params()?;
    let out = forward_backward(student, teachers, loss, batch, lr, step, seed)?;
    optimizer.step(params, lr)?;
    params.zero_grad()?;
    Ok(out)
}

/// The first half of [`train_step`]: forwards, the loss, and backward, leaving the gradients
/// in the student's flat gradient buffer (added to what is there) and the parameters as they
/// were. `lr` only appears in the error for a non-finite loss.
pub fn forward_backward(
    student: &Model,
    teachers: Option<&TeacherPool<Model>>,
    loss: &KdLoss,
    batch: &Batch,
    lr: f32,
    step: u64,
    seed: u64,
) -> Result<StepOutput> {
    student.params()?;
    let tape = Tape::recording();
    let dropout_seed = recycle_engine::rng::bits_at(seed, step);
    let logits = student.logits(&tape, batch, true, dropout_seed)?;
    let teacher_logits = match teachers {
        Some(pool) => pool.logits(step, |t| {
            Ok(t.logits(&Tape::inference(), batch, false, 0)?.into_tensor())
        })?,
        None => Vec::new(),
    };
    let out = kd_loss(&tape, loss, &logits, &teacher_logits, batch.labels(), None)?;
    let value = out.total.tensor().to_scalar_f32()?;
    if !value.is_finite() {
        return Err(Error::invalid(
            "train_step",
            format!(
                "the loss is {value} at step {step} (ce {}, kd {}); lower the learning rate \
                 (now {lr}) or the distillation weight",
                out.ce, out.kd
            ),
        ));
    }
    tape.backward(&out.total)?;
    Ok(StepOutput {
        ce: out.ce,
        kd: (!teacher_logits.is_empty()).then_some(out.kd),
        loss: value,
        teacher_forwards: teacher_logits.len(),
    })
}
