//! One training step, shared by the trainer and the overhead benchmarks: the selected
//! teachers' forwards (only when the schedule says this step distills), the student forward,
//! the fused loss, backward, optimizer update.
//!
//! On a GPU the teachers' forwards are queued first, on the teacher stream
//! (`cuda::on_stream(.., StreamRole::Teacher, ..)`), and the student's forward after them on
//! the student stream, so that the two run at the same time; the teachers' logits are joined
//! back (one event) right before the loss, the first thing that reads them. Queued in the
//! other order, the student's forward would be on the device before the teachers' were even
//! queued, and there would be little left to overlap. On the CPU the scope runs the teachers
//! there and then: the same values as running them after the student (nothing they compute
//! depends on the order), one code path for both devices.

use recycle_engine::cuda::{self, StreamRole};
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
    let device = student.params()?.device();
    // Inference tapes: nothing recorded, so each teacher activation is freed (on the teacher
    // stream) as soon as the next op has consumed it; only the logits leave the scope.
    let pending = teachers
        .map(|pool| {
            cuda::on_stream(device, StreamRole::Teacher, || {
                pool.logits(step, |t| {
                    Ok(t.logits(&Tape::inference(), batch, false, 0)?.into_tensor())
                })
            })
        })
        .transpose()?;
    let tape = Tape::recording();
    let dropout_seed = recycle_engine::rng::bits_at(seed, step);
    // Should this fail, dropping `pending` joins the teachers' work before freeing their
    // logits on the student stream.
    let logits = student.logits(&tape, batch, true, dropout_seed)?;
    let teacher_logits = match pending {
        Some(p) => p.join()?,
        None => Vec::new(),
    };
    let out = kd_loss(&tape, loss, &logits, &teacher_logits, batch.labels(), None)?;
    let value = out.total_value;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::{TeacherEntry, TeacherStrategy};
    use crate::trainer::model::Architecture;
    use recycle_engine::DType;
    use recycle_models::BertConfig;

    /// BERT-tiny with dropout (the student's forward draws from its seed), an ensemble of two
    /// bf16 teachers: forward_backward (teachers queued first, through the stream scope) gives
    /// bit for bit the loss and gradients of the order it replaced (student forward first,
    /// then the teachers), and a teacher's inference tape keeps nothing.
    #[test]
    fn teachers_first_changes_no_bit_on_the_cpu() {
        let arch = Architecture::Bert(BertConfig::tiny(64));
        let batch = crate::bench::mlm_batch(2, 16, 64).unwrap();
        let teachers = (0..2)
            .map(|i| TeacherEntry {
                name: format!("t{i}"),
                accuracy: 0.5 + i as f32 / 10.0,
                model: Model::new(&arch, 10 + i)
                    .unwrap()
                    .teacher(DType::BF16)
                    .unwrap(),
            })
            .collect();
        let pool = TeacherPool::new(teachers, TeacherStrategy::Ensemble { k: 2 }, 1).unwrap();
        let loss = KdLoss::kl(4.0, 0.7);
        let (step, seed) = (3, 9);

        let student = Model::new(&arch, 1).unwrap();
        let out = forward_backward(&student, Some(&pool), &loss, &batch, 0.1, step, seed).unwrap();
        assert_eq!(out.teacher_forwards, 2);
        let grads = student.params().unwrap().grads().to_vec_f32().unwrap();

        // The previous order, by hand.
        let reference = Model::new(&arch, 1).unwrap();
        let tape = Tape::recording();
        let logits = reference
            .logits(
                &tape,
                &batch,
                true,
                recycle_engine::rng::bits_at(seed, step),
            )
            .unwrap();
        let teacher_logits = pool
            .logits(step, |t| {
                let inference = Tape::inference();
                let l = t.logits(&inference, &batch, false, 0)?.into_tensor();
                assert!(inference.is_empty(), "an inference tape records nothing");
                Ok(l)
            })
            .unwrap();
        let o = kd_loss(&tape, &loss, &logits, &teacher_logits, batch.labels(), None).unwrap();
        tape.backward(&o.total).unwrap();
        let want = reference.params().unwrap().grads().to_vec_f32().unwrap();

        assert_eq!(
            out.loss.to_bits(),
            o.total.tensor().to_scalar_f32().unwrap().to_bits()
        );
        assert_eq!(out.kd.unwrap().to_bits(), o.kd.to_bits());
        assert_eq!(grads.len(), want.len());
        let differ = grads
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{differ} gradient elements differ");
        assert!(grads.iter().any(|&g| g != 0.0));
    }
}
