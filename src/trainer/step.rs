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
//!
//! The targets may instead come from a teacher cache ([`Teachers::Cached`]: no teacher runs,
//! the loss is `kd_loss_cached`), and a step whose teachers run may hand their logits to a
//! cache that records them ([`Teachers::Online`]'s `record`).
//!
//! Non-finite numbers are caught where it costs little: the input batch once (floats only),
//! the loss scalar (which the step reads back anyway) and the gradients' global norm (which
//! clipping needs anyway). Only when the loss is not finite are the teachers' and the
//! student's logits scanned, to say where the NaN or infinity came from. A poisoned step either
//! ends the run ([`OnNonFinite::Stop`]) or is skipped with the weights and optimizer state
//! untouched ([`OnNonFinite::Skip`]).

use std::fmt;

use rayon::prelude::*;

use recycle_engine::cuda::{self, StreamRole};
use recycle_engine::ops::elementwise::{mul, scale, sum};
use recycle_engine::optim::Optimizer;
use recycle_engine::{DType, Error, FlatParams, Result, Tape, Tensor};

use crate::distill::{kd_loss, KdLoss, TeacherPool};
use crate::distributed::GradSync;
pub use crate::recipe::OnNonFinite;
use crate::trainer::model::{Batch, Model};
use recycle_engine::kd_loss::{kd_loss_cached, CachedTargets};

#[derive(Debug, Clone, Copy)]
pub struct StepOutput {
    pub ce: f32,
    /// The distillation term, when this step distilled.
    pub kd: Option<f32>,
    pub loss: f32,
    pub teacher_forwards: usize,
    /// Host seconds in the teachers' forwards: on the CPU the forwards themselves; on a GPU
    /// the time to queue them on the teacher stream (they run beside the student's forward).
    pub teacher_seconds: f64,
    /// The gradients' global L2 norm before clipping (`None` for a step skipped before
    /// backward, and for [`forward_backward`], which leaves the gradients alone).
    pub grad_norm: Option<f32>,
    /// Where the NaN or infinity was, for a step skipped under [`OnNonFinite::Skip`].
    pub skipped: Option<NonFinite>,
}

/// Where a step met a NaN or an infinity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinite {
    /// The batch's inputs (image pixels).
    InputBatch,
    /// The logits of the `index`-th teacher of the pool.
    TeacherLogits { index: usize },
    /// The student's weights themselves (a checkpoint or an update poisoned them).
    StudentWeights,
    /// The student's logits, from finite weights and inputs: its activations overflowed.
    StudentLogits { activations: DType },
    /// The loss, from finite logits (an overflow inside the loss).
    Loss,
    /// The gradients after backward, from a finite loss.
    Gradients,
}

impl fmt::Display for NonFinite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NonFinite::InputBatch => write!(f, "the input batch"),
            NonFinite::TeacherLogits { index } => write!(f, "the logits of teacher {index}"),
            NonFinite::StudentWeights => write!(f, "the student's weights"),
            NonFinite::StudentLogits { activations } => write!(
                f,
                "the student's logits (finite weights and inputs: its {activations} activations \
                 overflowed)"
            ),
            NonFinite::Loss => write!(f, "the loss (from finite logits)"),
            NonFinite::Gradients => write!(f, "the gradients (from a finite loss)"),
        }
    }
}

impl NonFinite {
    /// A short tag for logs: `input`, `teacher-logits`, `weights`, `logits`, `loss`, `gradients`.
    pub fn tag(&self) -> &'static str {
        match self {
            NonFinite::InputBatch => "input",
            NonFinite::TeacherLogits { .. } => "teacher-logits",
            NonFinite::StudentWeights => "weights",
            NonFinite::StudentLogits { .. } => "logits",
            NonFinite::Loss => "loss",
            NonFinite::Gradients => "gradients",
        }
    }
}

/// Where a distilled step's targets come from.
pub enum Teachers<'a> {
    /// The forwards of the teachers the pool selects at this step; `record`, when given, is
    /// handed each one's logits with its index in the pool (a teacher cache recording).
    Online {
        pool: &'a TeacherPool<Model>,
        record: Option<Recorder<'a>>,
    },
    /// The selected teachers' rows read from a teacher cache: no teacher forward runs.
    Cached(&'a [CachedTargets]),
}

/// What receives the teachers' logits of a recorded step: `(teacher index, logits)`.
pub type Recorder<'a> = &'a mut dyn FnMut(usize, &Tensor) -> Result<()>;

impl<'a> Teachers<'a> {
    fn pool(&self) -> Option<&'a TeacherPool<Model>> {
        match self {
            Teachers::Online { pool, .. } => Some(pool),
            Teachers::Cached(_) => None,
        }
    }
}

/// The recipe's guards of a step: gradient clipping and what a non-finite number does.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepGuard {
    /// Clip the gradients to this global L2 norm (`train.clip_grad_norm`); off when `None`.
    pub clip_grad_norm: Option<f32>,
    /// `train.on_nonfinite`.
    pub on_nonfinite: OnNonFinite,
}

/// Runs one step. `teachers` is `None` for a plain step or a step outside the distillation
/// schedule: then no teacher runs at all. A NaN or infinity stops it with an error; no
/// clipping (see [`train_step_guarded`]).
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
    let guard = StepGuard::default();
    train_step_guarded(
        student, teachers, loss, batch, optimizer, lr, step, seed, &guard,
    )
}

/// [`train_step`] with the recipe's guards: the gradients' global norm is computed after
/// backward (and the gradients scaled down to `clip_grad_norm` when they exceed it); a NaN or
/// infinity in the input batch, a teacher's logits, the loss or the gradients either ends the
/// step with an error naming the step and the source, or (`OnNonFinite::Skip`) leaves the
/// weights and optimizer state as they were and returns the output with `skipped` set.
#[allow(clippy::too_many_arguments)]
pub fn train_step_guarded(
    student: &Model,
    teachers: Option<&TeacherPool<Model>>,
    loss: &KdLoss,
    batch: &Batch,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    step: u64,
    seed: u64,
    guard: &StepGuard,
) -> Result<StepOutput> {
    let teachers = teachers.map(|pool| Teachers::Online { pool, record: None });
    train_step_with(
        student, teachers, loss, batch, optimizer, lr, step, seed, guard,
    )
}

/// [`train_step_guarded`] with the targets from any source ([`Teachers`]): the pool's
/// forwards, recorded or not, or a teacher cache's rows.
#[allow(clippy::too_many_arguments)]
pub fn train_step_with(
    student: &Model,
    teachers: Option<Teachers<'_>>,
    loss: &KdLoss,
    batch: &Batch,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    step: u64,
    seed: u64,
    guard: &StepGuard,
) -> Result<StepOutput> {
    train_step_synced(
        student, teachers, loss, batch, optimizer, lr, step, seed, guard, None,
    )
}

/// A data-parallel step's reduction: the gradients are averaged over the ranks during
/// backward (`docs/distributed.md`), this rank's counting with `weight`.
pub struct RankSync<'a> {
    pub sync: &'a mut GradSync,
    /// This rank's share of the global batch's loss terms.
    pub weight: f32,
}

/// [`train_step_with`] on one rank of several: backward hands each bucket of the gradient
/// buffer to `sync` as soon as it is final, and the clipping, the non-finite check and the
/// update see the ranks' average. A rank whose step is poisoned before backward still takes
/// part in the reduction, with NaN gradients, so that every rank sees a non-finite norm and
/// stops or skips the step with it.
#[allow(clippy::too_many_arguments)]
pub fn train_step_synced(
    student: &Model,
    teachers: Option<Teachers<'_>>,
    loss: &KdLoss,
    batch: &Batch,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    step: u64,
    seed: u64,
    guard: &StepGuard,
    mut sync: Option<RankSync<'_>>,
) -> Result<StepOutput> {
    let pool = teachers.as_ref().and_then(Teachers::pool);
    let params = student.params()?;
    // The training forward moves BatchNorm's running statistics before the loss is known; a
    // skipped step must leave them as they were, so keep a copy (on the model's device).
    let saved = match guard.on_nonfinite {
        OnNonFinite::Skip => student
            .buffers()
            .iter()
            .map(|(_, t)| t.deep_copy())
            .collect::<Result<Vec<_>>>()?,
        OnNonFinite::Stop => Vec::new(),
    };
    let poisoned = |out: StepOutput, source: NonFinite| -> Result<StepOutput> {
        params.zero_grad()?;
        match guard.on_nonfinite {
            OnNonFinite::Stop => Err(nonfinite_error(step, source, &out, lr, pool)),
            OnNonFinite::Skip => {
                restore_buffers(student, &saved)?;
                Ok(StepOutput {
                    skipped: Some(source),
                    ..out
                })
            }
        }
    };
    let mut out = match forward_backward_checked(
        student,
        teachers,
        loss,
        batch,
        step,
        seed,
        sync.as_mut(),
    )? {
        Ok(out) => out,
        Err((out, source)) => {
            if let Some(s) = sync.as_mut() {
                let g = params.grads();
                // On a GPU rank too: the others see the NaN and skip or stop with this one.
                g.copy_from(&Tensor::from_vec(
                    vec![f32::NAN; g.elem_count()],
                    g.shape(),
                    g.device(),
                )?)?;
                s.sync.begin(params.grads(), 1.0)?;
                s.sync.finish()?;
            }
            return poisoned(out, source);
        }
    };
    let norm = match guard.clip_grad_norm {
        Some(max) => clip_grad_norm(params, max)?,
        None => grad_norm(params)?,
    };
    out.grad_norm = Some(norm);
    if !norm.is_finite() {
        return poisoned(out, NonFinite::Gradients);
    }
    optimizer.step(params, lr)?;
    params.zero_grad()?;
    Ok(out)
}

/// Puts back the buffers [`train_step_guarded`] saved before a step it then skipped.
fn restore_buffers(student: &Model, saved: &[Tensor]) -> Result<()> {
    for ((_, dst), src) in student.buffers().iter().zip(saved) {
        if dst.dtype() == DType::I32 {
            dst.copy_from_i32(&src.to_vec::<i32>()?)?;
        } else {
            dst.copy_from(src)?;
        }
    }
    Ok(())
}

/// The error of a poisoned step: the step, the source, the losses, and what to try.
fn nonfinite_error(
    step: u64,
    source: NonFinite,
    out: &StepOutput,
    lr: f32,
    teachers: Option<&TeacherPool<Model>>,
) -> Error {
    let culprit = match (source, teachers) {
        (NonFinite::TeacherLogits { index }, Some(pool)) => pool
            .teachers()
            .get(index)
            .map_or(String::new(), |t| format!(" (`{}`)", t.name)),
        _ => String::new(),
    };
    let kd = out.kd.map_or(String::new(), |kd| format!(", kd {kd}"));
    let hint = match source {
        NonFinite::InputBatch => "check the data set's files",
        NonFinite::TeacherLogits { .. } => "check the teacher's checkpoint, or drop the teacher",
        NonFinite::StudentWeights | NonFinite::StudentLogits { .. } | NonFinite::Gradients => {
            "lower the learning rate or set train.clip_grad_norm"
        }
        NonFinite::Loss => "lower the learning rate or the distillation weight",
    };
    Error::invalid(
        "train_step",
        format!(
            "a NaN or infinity at step {step} in {source}{culprit} (loss {}, ce {}{kd}, lr {lr}); \
             {hint}, or set train.on_nonfinite = \"skip\" to skip such steps",
            out.loss, out.ce
        ),
    )
}

/// The first half of [`train_step`]: forwards, the loss, and backward, leaving the gradients
/// in the student's flat gradient buffer (added to what is there) and the parameters as they
/// were. A NaN or infinity in the inputs or the loss is an error naming the step and where it
/// came from; `lr` only appears in that error.
pub fn forward_backward(
    student: &Model,
    teachers: Option<&TeacherPool<Model>>,
    loss: &KdLoss,
    batch: &Batch,
    lr: f32,
    step: u64,
    seed: u64,
) -> Result<StepOutput> {
    let online = teachers.map(|pool| Teachers::Online { pool, record: None });
    match forward_backward_checked(student, online, loss, batch, step, seed, None)? {
        Ok(out) => Ok(out),
        Err((out, source)) => Err(nonfinite_error(step, source, &out, lr, teachers)),
    }
}

/// A step's output so far and where a NaN or infinity stopped it.
type Poisoned = (StepOutput, NonFinite);

/// [`forward_backward`], returning a poisoned step as a value (nothing accumulated into the
/// gradients then) rather than as an error.
fn forward_backward_checked(
    student: &Model,
    teachers: Option<Teachers<'_>>,
    loss: &KdLoss,
    batch: &Batch,
    step: u64,
    seed: u64,
    sync: Option<&mut RankSync<'_>>,
) -> Result<std::result::Result<StepOutput, Poisoned>> {
    let empty = StepOutput {
        ce: f32::NAN,
        kd: None,
        loss: f32::NAN,
        teacher_forwards: 0,
        teacher_seconds: 0.0,
        grad_norm: None,
        skipped: None,
    };
    // On the CPU the scan is cheap; on a GPU it would cost a read-back and a wait every step,
    // so there a poisoned input is found from the non-finite loss below.
    if let Batch::Image { x, .. } = batch {
        if x.device().is_cpu() && !all_finite(x)? {
            return Ok(Err((empty, NonFinite::InputBatch)));
        }
    }
    let (teachers, record, cached) = match teachers {
        None => (None, None, None),
        Some(Teachers::Online { pool, record }) => (Some(pool), record, None),
        Some(Teachers::Cached(rows)) => (None, None, Some(rows)),
    };
    let device = student.params()?.device();
    // Inference tapes: nothing recorded, so each teacher activation is freed (on the teacher
    // stream) as soon as the next op has consumed it; only the logits leave the scope.
    let t0 = std::time::Instant::now();
    let pending = teachers
        .map(|pool| {
            cuda::on_stream(device, StreamRole::Teacher, || {
                pool.logits(step, |t| {
                    Ok(t.logits(&Tape::inference(), batch, false, 0)?.into_tensor())
                })
            })
        })
        .transpose()?;
    let teacher_seconds = if pending.is_some() {
        t0.elapsed().as_secs_f64()
    } else {
        0.0
    };
    let tape = Tape::recording();
    let dropout_seed = recycle_engine::rng::bits_at(seed, step);
    // Should this fail, dropping `pending` joins the teachers' work before freeing their
    // logits on the student stream.
    let logits = student.logits(&tape, batch, true, dropout_seed)?;
    let teacher_logits = match pending {
        Some(p) => p.join()?,
        None => Vec::new(),
    };
    let out = match cached {
        Some(rows) => kd_loss_cached(&tape, loss, &logits, rows, batch.labels(), None)?,
        None => kd_loss(&tape, loss, &logits, &teacher_logits, batch.labels(), None)?,
    };
    let value = out.total_value;
    let result = StepOutput {
        ce: out.ce,
        kd: (!teacher_logits.is_empty() || cached.is_some()).then_some(out.kd),
        loss: value,
        teacher_forwards: teacher_logits.len(),
        teacher_seconds,
        grad_norm: None,
        skipped: None,
    };
    if !value.is_finite() {
        // Only now look for the source: the input batch (on a GPU), the teachers' logits, the
        // student's weights, its logits, else the loss itself.
        if let Batch::Image { x, .. } = batch {
            if !x.device().is_cpu() && !all_finite(x)? {
                return Ok(Err((result, NonFinite::InputBatch)));
            }
        }
        let selected = teachers.map_or(Vec::new(), |pool| pool.select(step));
        for (t, index) in teacher_logits.iter().zip(selected) {
            if !all_finite(t)? {
                return Ok(Err((result, NonFinite::TeacherLogits { index })));
            }
        }
        let source = if !all_finite(student.params()?.values())? {
            NonFinite::StudentWeights
        } else if !all_finite(logits.tensor())? {
            NonFinite::StudentLogits {
                activations: logits.tensor().dtype(),
            }
        } else {
            NonFinite::Loss
        };
        return Ok(Err((result, source)));
    }
    // Recorded only from a step whose loss is finite: a NaN in a teacher's logits never
    // reaches a cache, where it would poison every student that replays it.
    if let (Some(record), Some(pool)) = (record, teachers) {
        for (t, index) in teacher_logits.iter().zip(pool.select(step)) {
            record(index, t)?;
        }
    }
    match sync {
        Some(s) => {
            s.sync.begin(student.params()?.grads(), s.weight)?;
            tape.backward_hooked(&out.total, &mut |g| s.sync.param_ready(g))?;
            s.sync.finish()?;
        }
        None => {
            tape.backward(&out.total)?;
        }
    }
    Ok(Ok(result))
}

/// Whether every element of a float tensor is finite. On the CPU a scan; on a GPU one
/// reduction whose only read-back is a scalar: `sum(0 * x)` is 0 unless some element is NaN or
/// infinite (0 times either is NaN).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    if !t.dtype().is_float() {
        return Ok(true);
    }
    if t.device().is_cpu() {
        return Ok(t.read_f32()?.iter().all(|v| v.is_finite()));
    }
    let tape = Tape::inference();
    let zeroed = scale(&tape, &tape.constant(t.clone()), 0.0)?;
    Ok(sum(&tape, &zeroed)?.tensor().to_scalar_f32()?.is_finite())
}

/// The global L2 norm of the gradient buffer (summed in f64 on the CPU).
pub fn grad_norm(params: &FlatParams) -> Result<f32> {
    let grads = params.grads();
    if grads.device().is_cpu() {
        let g = grads.read_f32()?;
        // Partial sums in parallel, added in chunk order: the same bits on every run (a
        // resumed run clips exactly as the uninterrupted one did).
        let partial: Vec<f64> = g
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&v| v as f64 * v as f64).sum())
            .collect();
        return Ok(partial.iter().sum::<f64>().sqrt() as f32);
    }
    let tape = Tape::inference();
    let g = tape.constant(grads.clone());
    Ok(sum(&tape, &mul(&tape, &g, &g)?)?
        .tensor()
        .to_scalar_f32()?
        .sqrt())
}

/// Scales the gradient buffer so that its global L2 norm is at most `max_norm`, as PyTorch's
/// `clip_grad_norm_`: by `max_norm / (norm + 1e-6)` when that is below 1, else not at all.
/// Returns the norm before clipping; a non-finite norm leaves the gradients alone.
pub fn clip_grad_norm(params: &FlatParams, max_norm: f32) -> Result<f32> {
    let norm = grad_norm(params)?;
    let coef = max_norm / (norm + 1e-6);
    if !norm.is_finite() || coef >= 1.0 {
        return Ok(norm);
    }
    let grads = params.grads();
    if grads.device().is_cpu() && grads.dtype() == DType::F32 {
        grads
            .write_f32()?
            .par_chunks_mut(1 << 16)
            .for_each(|c| c.iter_mut().for_each(|g| *g *= coef));
    } else {
        let tape = Tape::inference();
        let scaled = scale(&tape, &tape.constant(grads.clone()), coef)?;
        grads.copy_from(scaled.tensor())?;
    }
    Ok(norm)
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
